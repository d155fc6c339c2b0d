"""Shared fixtures: the embedded tokenizer and the tiny random-weight model built on it, and
the sandbox backend and leftover checks of the attack suites (helpers in `sandbox_attacks`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Tests never reach the network: every model and tokenizer loads from the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from sandbox_attacks import RUNS, Backend, Kind, settled_leftovers, why_unusable
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


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """The sandbox backend an attack is parametrised over (`indirect=True`); skips the test
    where that backend is not usable on this machine."""
    kind: Kind = request.param
    why = why_unusable(kind)
    if why is not None:
        pytest.skip(f"{kind} backend not usable here: {why}")
    return Backend(kind)


@pytest.fixture(scope="module")
def attack_suite_leaves_nothing() -> Iterator[None]:
    """At the end of an attack module, no run the attack suites opened has anything left."""
    yield
    assert settled_leftovers(RUNS) == []


@pytest.fixture
def leaves_nothing(attack_suite_leaves_nothing: None) -> Iterator[None]:
    """The runs a test opened have nothing left once it ends (and, through the module-scoped
    check it depends on, none of the module's runs at the module's end). An attack module
    requests it for every test: `pytestmark = pytest.mark.usefixtures("leaves_nothing")`."""
    before = set(RUNS)
    yield
    assert settled_leftovers({r: k for r, k in RUNS.items() if r not in before}) == []
