"""An evaluation whose policy is a model behind an OpenAI-compatible API (`model.kind: openai`).

The backend builds the `OpenAIPolicy` (the key read from the environment variable the config
names, never from the config itself, so that no run folder holds it), and after each rollout
charges the episodes with what the provider counted (`Ledger.charge`: each turn's
`api_usage`, the episode's `model_usd` and token counts in `Episode.cost`). The evaluation's
summary then reports dollars per episode (`cost/model_usd`) and per success
(`cost_per_success/model_usd`) like any other cost kind (`turnrl.report.summarize`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from turnrl.agent.chat import Renderer
from turnrl.agent.model_config import OpenAIModel
from turnrl.agent.openai_policy import OpenAIPolicy
from turnrl.agent.records import Episode, StopReason


def api_key(cfg: OpenAIModel) -> str | None:
    """The key in `cfg.api_key_env`; a clear error when the variable is unset or empty."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ValueError(
            f"model.api_key_env: the environment variable {cfg.api_key_env} is not set (set "
            "it to the API key, or set api_key_env: null for a server that needs none)"
        )
    return key


class OpenAIBackend:
    """The policy of a `model.kind: openai` evaluation, and its cost accounting."""

    def __init__(self, cfg: OpenAIModel, renderer: Renderer, seed: int) -> None:
        self.cfg = cfg
        self.policy = OpenAIPolicy(cfg, renderer, api_key(cfg), seed=seed)

    def charge(self, episodes: Sequence[Episode]) -> list[Episode]:
        """The episodes with the provider's usage and price filled in (module docstring)."""
        return [self.policy.ledger.charge(e) for e in episodes]

    def describe(self) -> str:
        """One line naming the endpoint and the price (never the key)."""
        p = self.cfg.price
        cached = "" if p.cached_input_per_mtok is None else f", cached ${p.cached_input_per_mtok}"
        return (
            f"{self.cfg.model} at {self.cfg.base_url} (${p.input_per_mtok} in{cached}, "
            f"${p.output_per_mtok} out per Mtok)"
        )

    async def aclose(self) -> None:
        """Close the connections, in the event loop that opened them. Idempotent."""
        await self.policy.__aexit__(None, None, None)


def cost_line(summary: dict[str, float], episodes: Sequence[Episode]) -> str:
    """Dollars per episode and per success, and the first policy error when some episode
    ended on one (the key was refused, the provider kept failing)."""
    per_success = summary.get("cost_per_success/model_usd")
    line = (
        f"model cost ${summary.get('cost/model_usd', 0.0):.6f}/episode, "
        + (f"${per_success:.6f}/success" if per_success is not None else "no success")
        + f" ({summary.get('cost/model_input_tokens', 0.0):.0f} input, "
        f"{summary.get('cost/model_output_tokens', 0.0):.0f} output tokens/episode)"
    )
    failed = [e for e in episodes if e.stop_reason == StopReason.POLICY_ERROR]
    if failed:
        first = (failed[0].error or "").splitlines()[0][:300]
        line += f"; {len(failed)} episode(s) ended on a policy error, e.g. {first}"
    return line
