"""Shared fixtures: the shipped model is loaded once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


WORKER_SUMMARIES: list[str] = []  # lines the pytest-xdist workers hand back (the browser tests' summary)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    WORKER_SUMMARIES.extend(getattr(node, "workeroutput", {}).get("browser_summary", []))


def pytest_terminal_summary(terminalreporter):
    for line in WORKER_SUMMARIES:
        terminalreporter.write_line(line)


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


@pytest.fixture(scope="session")
def gpt2_small_sized(tmp_path_factory):
    """A TransformerBridge over a randomly initialised GPT-2-small-sized model, built offline
    (:func:`attribution_course.model.save_random_gpt2`: GPT-2's 50,257-token vocabulary, made-up words)."""
    from attribution_course.model import load_model, save_random_gpt2

    return load_model(save_random_gpt2(tmp_path_factory.mktemp("gpt2_small_sized")))
