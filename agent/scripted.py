"""A scripted policy: replies come from a script, not a model. For tests and benchmarks.

The script sees the episode's context ids and the turn index and returns the reply text (or
ids); replies are tokenized once and returned with fixed logprobs, so runner logic can be
exercised exactly and fast.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from turnrl.agent.chat import Tokenizer
from turnrl.agent.policy import Completion, SamplingParams

Script = Callable[[Sequence[int]], str | Sequence[int]]
"""Maps the context ids to the reply (text, or ids taken as sampled)."""


class ScriptedPolicy:
    """Implements `Policy` (and `WeightSync`, as version stamps only) by replaying a script."""

    def __init__(
        self,
        script: Script,
        tokenizer: Tokenizer,
        logprob: float = -1.0,
        delay_s: float = 0.0,
    ) -> None:
        self.script = script
        self.tokenizer = tokenizer
        self.logprob = logprob
        self.delay_s = delay_s
        self.policy_version = 0
        self.prompts: list[list[int]] = []
        """Every context this policy was asked to continue, in call order."""

    @property
    def version(self) -> int:
        return self.policy_version

    def set_version(self, version: int) -> None:
        self.policy_version = version

    async def begin_update(self) -> None:
        """`WeightSync`: a script has no weights; nothing to hold."""

    async def end_update(self, version: int) -> None:
        self.policy_version = version

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        self.prompts.append(list(prompt_ids))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        reply = self.script(prompt_ids)
        ids = (
            self.tokenizer.encode(reply, parse_special=True)
            if isinstance(reply, str)
            else list(reply)
        )
        finish: str = "length"
        for i, tok in enumerate(ids):
            if tok in params.stop_token_ids:
                ids, finish = ids[: i + 1], "stop"
                break
        if len(ids) > params.max_tokens:
            ids, finish = ids[: params.max_tokens], "length"
        return Completion(
            token_ids=tuple(ids),
            logprobs=(self.logprob,) * len(ids),
            finish_reason="stop" if finish == "stop" else "length",
            policy_version=self.policy_version,
        )
