"""The `Policy` protocol: token ids in, sampled token ids and their logprobs out.

The shape follows an OpenAI-compatible completions server that accepts prompts as token ids
and returns `token_ids` and per-token logprobs (vLLM's `/v1/completions` with
`return_token_ids`): one request is one continuation of one episode's context. Batching across
episodes is the backend's business: the in-process transformers policy batches concurrent
requests; a vLLM server does continuous batching itself.

Logprob convention (shared with the learner): the logprob of each sampled id under
softmax(logits / temperature), before top-p truncation. The learner scores the same tokens
with the same temperature, so the PPO ratio starts at 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation."""

    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 256
    """Most ids to sample."""
    stop: tuple[str, ...] = ()
    """Stop strings: sampling ends after the first id whose decoded text completes one (the
    id is kept, so what was sampled is what is stored)."""
    stop_token_ids: tuple[int, ...] = ()
    """Ids that end sampling (kept in the output). The backend adds its end-of-sequence id."""
    seed: int | None = None
    """Seed for this request's sampler; None draws from the backend's generator."""


@dataclass(frozen=True)
class Completion:
    """One sampled continuation."""

    token_ids: tuple[int, ...]
    """The sampled ids, exactly."""
    logprobs: tuple[float, ...]
    """Logprob of each sampled id (see the module docstring for the convention)."""
    finish_reason: Literal["stop", "length"]
    """`stop`: a stop id or stop string ended it; `length`: `max_tokens` did."""
    policy_version: int
    """Version of the weights that sampled it."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Backend timings (queue, prefill, decode seconds) for this request."""


@runtime_checkable
class Policy(Protocol):
    """Anything that continues a token context."""

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Sample a continuation of `prompt_ids`. Raises on backend failure; the runner turns
        that into a `POLICY_ERROR` stop."""
        ...


class WeightSync(Protocol):
    """How a learner's new weights reach the policy that samples rollouts.

    The loop brackets every weight change: `begin_update` returns once nothing is being
    sampled (requests submitted meanwhile wait), the learner changes the weights, then
    `end_update(version)` makes them live, stamped with `version`. Every completion therefore
    comes from exactly one version. In-process backends share the learner's module and only
    pause; a server backend reloads weights between the two calls.
    """

    @property
    def version(self) -> int:
        """Version of the weights later completions are sampled with."""
        ...

    async def begin_update(self) -> None:
        """Hold generation until `end_update`; returns once no row is being sampled."""
        ...

    async def end_update(self, version: int) -> None:
        """The new weights are in place: stamp later completions with `version`, resume.
        Called after a failed update too (with the version that is still current)."""
        ...


class PolicyError(Exception):
    """A policy backend failed to produce a completion."""
