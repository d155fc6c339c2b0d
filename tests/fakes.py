"""Injected fakes for unit tests of turnrl's own logic (never patched in by module path)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from pydantic import BaseModel

from turnrl.agent.records import Episode
from turnrl.sandboxes.base import ExecResult, Limits, SandboxSession
from turnrl.tools.base import CostModel, ToolOutput, ToolSpec

SPECIALS = ("<|im_start|>", "<|im_end|>")
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIALS))


class CharTokenizer:
    """One id per character; ChatML markers are single ids, as in the real tokenizer."""

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        if not parse_special:
            return [ord(c) + 10 for c in text]
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            ids += [ord(c) + 10 for c in text[pos : m.start()]]
            ids.append(SPECIALS.index(m.group()) + 1)
            pos = m.end()
        return ids + [ord(c) + 10 for c in text[pos:]]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(SPECIALS[i - 1] if i <= len(SPECIALS) else chr(i - 10) for i in ids)


class EchoArgs(BaseModel):
    text: str
    times: int = 1


class EchoTool:
    """Echoes its argument; optionally sleeps or raises."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False, timeout_s: float = 5.0) -> None:
        self.delay_s, self.fail = delay_s, fail
        self.calls = 0
        self._spec = ToolSpec(
            name="echo",
            description="Echo text.",
            args_model=EchoArgs,
            cost=CostModel(per_call={"calls": 1.0, "money_usd": 0.5}),
            timeout_s=timeout_s,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def __call__(self, args: EchoArgs) -> ToolOutput:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("echo broke")
        return ToolOutput(text=args.text * args.times)


class UnusedSandbox:
    """A `Sandbox` to build a code suite with (its python tool, its grader) where the test runs
    no code: every use raises."""

    @property
    def name(self) -> str:
        return "unused"

    async def session(self) -> SandboxSession:
        raise AssertionError("the test ran code")

    async def run(
        self, argv: list[str], stdin: bytes = b"", limits: Limits | None = None
    ) -> ExecResult:
        raise AssertionError("the test ran code")

    async def python(self, code: str, limits: Limits | None = None) -> ExecResult:
        raise AssertionError("the test ran code")

    async def close(self) -> None:
        return None


def with_advantages(
    episodes: Sequence[Episode], advantages: Sequence[Sequence[float | None]]
) -> list[Episode]:
    """Copies of `episodes` with `advantages[i][j]` as turn j's `Turn.advantage` of episode
    i, which is what the learner trains on."""
    return [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"advantage": a}) for t, a in zip(e.turns, adv, strict=True)
                ]
            }
        )
        for e, adv in zip(episodes, advantages, strict=True)
    ]
