"""Shared fixtures: the embedded tokenizer and the tiny random-weight model built on it."""

from __future__ import annotations

import os

# Tests never reach the network: every model and tokenizer loads from the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent.model import load_model, load_tokenizer, tiny_model_dir


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer with its ChatML template (extracted from the GGUF once, cached)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model() -> PreTrainedModel:
    """A 2-layer random-weight Llama with SmolLM2's vocabulary, untied, in eval mode."""
    return load_model(tiny_model_dir())
