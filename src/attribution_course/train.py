"""Train the course's shipped IOI model: ``python -m attribution_course.train``.

A small GPT-2 (``GPT2LMHeadModel``: LayerNorm, MLPs, several heads per layer)
with a word-level tokenizer, trained from scratch on synthetic IOI sentences
(training names and templates only) mixed with filler sentences that mention
every name. Names get random embeddings that training never updates and that
are drawn afresh at every step: the model cannot memorise a per-name answer and
has to learn a mechanism that works for any name vector, which is what lets it
handle the held-out names it never saw in an IOI sentence. The saved model
carries one more seeded draw. Seeded; takes a few minutes on 2 CPU cores. Writes the Hugging Face
files and ``MODEL_CARD.md`` (whose numbers come from this run's evaluation).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from . import corpus
from .model import SHIPPED_MODEL_DIR
from .prompts import fill_template

#: Architecture of the shipped model.
ARCHITECTURE = dict(n_layer=4, n_head=4, n_embd=128, n_positions=32)
#: Standard deviation of the fixed random embedding of every name.
NAME_EMBEDDING_STD = 0.1


def build_tokenizer():
    """A word-level tokenizer over the corpus vocabulary, GPT-2-like special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {corpus.BOS_TOKEN: 0, corpus.UNK_TOKEN: 1}
    for word in corpus.all_words():
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=corpus.UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=corpus.BOS_TOKEN,
        eos_token=corpus.BOS_TOKEN,
        pad_token=corpus.BOS_TOKEN,
        unk_token=corpus.UNK_TOKEN,
    )


def training_sentence(rng: random.Random) -> str:
    """One training sentence: an IOI sentence with its answer (80%) or a filler sentence."""
    if rng.random() < 0.8:
        template = rng.choice(corpus.TRAIN_TEMPLATES)
        io, s = rng.sample(corpus.TRAIN_NAMES, 2)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        text = fill_template(template, a, b, s, rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS))
        return f"{text} {io} ."
    template = rng.choice(corpus.FILLER_TEMPLATES)
    name = rng.choice(corpus.TRAIN_NAMES + corpus.TEST_NAMES)
    return template.format(A=name, PLACE=rng.choice(corpus.PLACES), OBJECT=rng.choice(corpus.OBJECTS))


def encode_batch(tokenizer, sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS-prefixed, right-padded token ids and a mask of positions to predict."""
    ids = torch.full((len(sentences), length), tokenizer.pad_token_id)
    mask = torch.zeros((len(sentences), length), dtype=torch.bool)
    for row, sentence in enumerate(sentences):
        tokens = [tokenizer.bos_token_id, *tokenizer.encode(sentence, add_special_tokens=False)]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, 1 : len(tokens)] = True
    return ids, mask


@torch.no_grad()
def evaluate(model, tokenizer, n_prompts: int = 600, seed: int = 1234) -> dict:
    """Accuracy and logit difference on held-out and training-distribution IOI prompts."""
    from .metrics import accuracy, logit_diff
    from .prompts import make_ioi_prompts

    results = {}
    for split in ("test", "train"):
        prompts = make_ioi_prompts(tokenizer, n_prompts, split=split, seed=seed)
        clean = model(prompts.clean_tokens).logits
        corrupt = model(prompts.corrupted_tokens).logits
        per_prompt = logit_diff(clean, prompts, per_prompt=True)
        results[split] = {
            "n_prompts": n_prompts,
            "top1_accuracy": accuracy(clean, prompts),
            "io_over_s_accuracy": (per_prompt > 0).float().mean().item(),
            "mean_logit_diff": per_prompt.mean().item(),
            "min_logit_diff": per_prompt.min().item(),
            "abc_corrupted_mean_logit_diff": logit_diff(corrupt, prompts).item(),
        }
    return results


def train(out_dir: Path, *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    # One thread: the same seed then gives the same weights on any machine,
    # whatever its core count (parallel reductions change the rounding).
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **ARCHITECTURE,
    )
    model = GPT2LMHeadModel(config)
    name_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(corpus.TRAIN_NAMES + corpus.TEST_NAMES)))
    embedding = model.transformer.wte.weight  # tied with the unembedding
    fixed_name_embeddings = torch.randn(len(name_ids), config.n_embd) * NAME_EMBEDDING_STD
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    length = corpus.N_POSITIONS + 2  # prompt, answer and the full stop
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        with torch.no_grad():
            embedding[name_ids] = torch.randn(len(name_ids), config.n_embd) * NAME_EMBEDDING_STD
        ids, mask = encode_batch(tokenizer, [training_sentence(rng) for _ in range(batch_size)], length)
        logits = model(ids).logits[:, :-1]
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        embedding[name_ids] = fixed_name_embeddings
    model.eval()
    results = evaluate(model, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "architecture": ARCHITECTURE,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "evaluation": results,
    }
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(info))
    return info


def model_card(info: dict) -> str:
    test, train_ = info["evaluation"]["test"], info["evaluation"]["train"]
    a = info["architecture"]
    return f"""# The course's IOI model

Written by `python -m attribution_course.train` (do not edit by hand; rerun the script).

## What it is
A GPT-2-architecture language model (`transformers.GPT2LMHeadModel`) with {a['n_layer']} layers,
{a['n_head']} attention heads per layer, width {a['n_embd']}, LayerNorm, GELU MLPs and tied
embeddings: {info['n_parameters']:,} parameters. Its tokenizer is word-level
({info['vocab_size']} tokens, whitespace-separated words, `<|endoftext|>` as beginning of sequence),
so every name is a single token.

## What it was trained on
Synthetic sentences generated on the fly (`attribution_course.corpus`, seed {info['seed']}):
80% indirect-object-identification (IOI) sentences from {len(corpus.TRAIN_TEMPLATES)} training templates with
{len(corpus.TRAIN_NAMES)} training names, both ABBA and BABA orders, {len(corpus.PLACES)} places and {len(corpus.OBJECTS)} objects,
each followed by its answer; 20% filler sentences (such as "a bag was given to Joe .") that
mention every name, including the {len(corpus.TEST_NAMES)} held-out names, which never appear in a
training IOI sentence. Every name has a random embedding (standard deviation
{NAME_EMBEDDING_STD}) that training never updates and redraws at every step, so the model
cannot memorise per-name answers and must learn a mechanism that works for any name
vector; the saved weights carry one more seeded draw. The {len(corpus.TEST_TEMPLATES)} test templates never appear in training.
Next-token cross-entropy on every position, AdamW (lr {info['lr']}, one-cycle schedule),
{info['steps']} steps of {info['batch_size']} sentences, no dropout: {info['train_seconds']} s on
{info['torch_threads']} CPU threads (torch {info['torch_version']}).

## How well it does
On {test['n_prompts']} held-out prompts (test names in test templates, alternating ABBA/BABA, seed 1234):

| | held-out | training distribution |
|---|---|---|
| top-1 prediction is the IO name | {test['top1_accuracy']:.1%} | {train_['top1_accuracy']:.1%} |
| IO logit > subject logit | {test['io_over_s_accuracy']:.1%} | {train_['io_over_s_accuracy']:.1%} |
| mean logit difference (IO - S) | {test['mean_logit_diff']:.2f} | {train_['mean_logit_diff']:.2f} |
| smallest logit difference | {test['min_logit_diff']:.2f} | {train_['min_logit_diff']:.2f} |
| mean logit difference on ABC-corrupted prompts | {test['abc_corrupted_mean_logit_diff']:.2f} | {train_['abc_corrupted_mean_logit_diff']:.2f} |

## Limits
It knows only this tiny vocabulary and these sentence shapes; it is a teaching object for
localisation methods, not a language model. Its circuit need not match GPT-2 small's IOI circuit.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR, help="output directory (default: the shipped model)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(json.dumps(info["evaluation"], indent=2))


if __name__ == "__main__":
    main()
