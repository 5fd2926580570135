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
