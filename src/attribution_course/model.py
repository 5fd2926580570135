"""Loading the model every chapter uses: the shipped IOI model by default."""

from __future__ import annotations

import json
import os
from pathlib import Path

#: The course's own GPT-2-architecture model, trained by ``python -m attribution_course.train``.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "shipped_model"
#: A variant for chapter 6: the shipped model's training plus a phase with hedged labels, in which two
#: appended blocks learn alone (``python -m attribution_course.train --variant hedging``).
HEDGING_VARIANT_DIR = Path(__file__).resolve().parent / "hedging_variant_model"

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ModelLoadError(RuntimeError):
    """A model directory or hub id could not be loaded; the message names it."""


def check_model_dir(path: Path) -> None:
    """Raise ``ModelLoadError`` naming ``path`` unless it holds a loadable HF model."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"model directory {path} is missing {', '.join(missing)}")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"model directory {path}: config.json is not valid JSON ({err})") from err


def load_model(name_or_path: str | os.PathLike | None = None, *, device: str = "cpu"):
    """Load a ``TransformerBridge`` in eval mode with compatibility mode on.

    ``None`` loads the shipped model (offline). A local directory in Hugging Face
    format or a hub id such as ``"gpt2"`` works too; hub ids need network access
    unless the model is already in the local Hugging Face cache.

    Compatibility mode gives the legacy hook names (``blocks.0.attn.hook_z``) and
    folds LayerNorm weights and value biases (so ``hook_z = 0`` does not
    silence a head; each head's value bias is recorded first, see
    :mod:`zero_ablation`); eval mode switches dropout off, which would
    otherwise make every ablation and gradient noisy.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if name_or_path is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        name_or_path = SHIPPED_MODEL_DIR
    as_path = Path(name_or_path).expanduser()
    is_local = as_path.exists() or isinstance(name_or_path, Path) or str(name_or_path).startswith((".", "/", "~"))
    if is_local:
        check_model_dir(as_path)
        source = str(as_path.resolve())
    else:
        source = str(name_or_path)
    try:
        model = TransformerBridge.boot_transformers(source, device=device)
    except Exception as err:  # the hub, safetensors and transformers raise many kinds
        where = f"model directory {source}" if is_local else f"model {source!r}"
        raise ModelLoadError(f"could not load {where}: {type(err).__name__}: {err}") from err
    from .zero_ablation import record_value_bias

    record_value_bias(model)  # compatibility mode folds the value biases away; true zero ablation needs them
    model.enable_compatibility_mode()
    model.eval()
    # where the bare twin of attribution_engine loads from (attribution at the cost floor)
    setattr(model, "course_model_source", source)
    return model


def head_labels(model) -> list[str]:
    """``"L{layer}H{head}"`` for every attention head, layer-major."""
    return [f"L{l}H{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


#: GPT-2 small's sizes (12 layers, 12 heads, d_model 768, 50,257-token vocabulary).
GPT2_SMALL_SIZES = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)


def save_random_gpt2(directory: str | os.PathLike, *, seed: int = 0, n_positions: int = 64, **sizes) -> Path:
    """Save a randomly initialised GPT-2-architecture model with a made-up tokenizer to ``directory``.

    ``sizes`` are ``GPT2Config`` fields (default :data:`GPT2_SMALL_SIZES`). The tokenizer is
    word-level over made-up words (``w0`` .. ``w{vocab_size - 1}``), so the model has the
    vocabulary size asked for without any download. For tests and the benchmark's
    model-size runs; load it with :func:`load_model`.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory = Path(directory)
    torch.manual_seed(seed)
    config = GPT2Config(**{**GPT2_SMALL_SIZES, **sizes}, n_positions=n_positions, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(config.vocab_size)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w0", eos_token="w0", unk_token="w1").save_pretrained(directory)
    return directory
