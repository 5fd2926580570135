"""Shared fixtures: the shipped model is loaded once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def model():
    from attribution_course.model import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def test_prompts(model):
    from attribution_course.prompts import make_ioi_prompts

    return make_ioi_prompts(model, 64, split="test", corruption="abc", seed=0)


@pytest.fixture(scope="module")
def prompts(test_prompts):
    """Sixteen held-out prompts for the method tests; a module may override it with another subset."""
    return test_prompts.subset(range(16))


@pytest.fixture(scope="module")
def metric(prompts):
    """The logit difference on whichever ``prompts`` the requesting module uses."""
    from attribution_course.metrics import logit_diff

    return lambda logits: logit_diff(logits, prompts)


@pytest.fixture(scope="session")
def sandbox_or_skip():
    """Skip where bubblewrap cannot run, except with REQUIRE_SANDBOX=1 (CI), where that is an error."""
    from attribution_course.grading import sandbox

    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailable as err:
        if os.environ.get("REQUIRE_SANDBOX") == "1":
            raise
        pytest.skip(str(err))


GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)


@pytest.fixture(scope="session")
def gpt2_small_sized(tmp_path_factory):
    """A TransformerBridge over a randomly initialised GPT-2-small-sized model, built offline.

    The tokenizer is word-level over made-up words (``w0`` .. ``w50256``), so the
    vocabulary has GPT-2's 50,257 entries without any download.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from attribution_course.model import load_model

    directory = tmp_path_factory.mktemp("gpt2_small_sized")
    torch.manual_seed(0)
    config = GPT2Config(**GPT2_SMALL, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(config.vocab_size)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w0", eos_token="w0", unk_token="w1").save_pretrained(directory)
    return load_model(directory)
