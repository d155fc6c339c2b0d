"""Harness overhead of the episode runner per turn, against a bare asyncio loop.

2,000 episodes x 5 turns (4 tool calls, then an answer) with a zero-latency policy that
returns pre-tokenized replies and a no-op tool, 64 episodes in flight. Everything measured is
turnrl's own work per turn: decoding the sample, parsing calls, dispatching them (argument
checks, limits, timeout, result checks, cost), rendering and tokenizing the observation,
keying the turn's trajectory-graph state, building the turn record.

The peer is a bare asyncio loop doing the same awaits (one policy await and one tool await
per turn, under the same semaphore) with no bookkeeping: the floor any harness pays.
Target: <= 100 us per turn.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import Sequence

from pydantic import BaseModel

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.model import load_tokenizer
from turnrl.agent.policy import Completion, SamplingParams
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.tools.base import ToolOutput, ToolSpec

TURNS = 5
CONCURRENCY = 64


class NoopArgs(BaseModel):
    query: str


class NoopTool:
    spec = ToolSpec(name="noop", description="Does nothing.", args_model=NoopArgs)

    async def __call__(self, args: NoopArgs) -> ToolOutput:
        return ToolOutput(text="ok")


class ZeroLatencyPolicy:
    """Replies with a tool call for TURNS-1 turns, then answers. The turn index is read off the
    context: two end-of-turn ids for the system and user messages, then two per turn."""

    def __init__(self, call_ids: list[int], answer_ids: list[int], marker_id: int) -> None:
        self.call, self.answer, self.marker = tuple(call_ids), tuple(answer_ids), marker_id

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        ids = self.call if prompt_ids.count(self.marker) < 2 + 2 * (TURNS - 1) else self.answer
        return Completion(ids, (-0.5,) * len(ids), "stop", 0)


async def bare(n_episodes: int) -> float:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def policy() -> int:
        return 0

    async def tool() -> int:
        return 0

    async def episode() -> None:
        async with gate:
            for _ in range(TURNS):
                await policy()
                await tool()

    t0 = time.perf_counter()
    await asyncio.gather(*(episode() for _ in range(n_episodes)))
    return time.perf_counter() - t0


async def harness(n_episodes: int, tok: HFTokenizer) -> tuple[float, int]:
    renderer = ChatML(tok)
    call = '<tool_call>{"name": "noop", "arguments": {"query": "x"}}</tool_call><|im_end|>'
    answer = tok.encode("<answer>x</answer><|im_end|>", parse_special=True)
    policy = ZeroLatencyPolicy(
        tok.encode(call, parse_special=True), answer, renderer.end_of_turn_id()
    )
    runner = EpisodeRunner(
        policy,
        renderer,
        [NoopTool()],
        Budget(max_turns=TURNS, max_tool_calls=TURNS, max_context_tokens=8192),
        SamplingParams(),
    )
    specs = [EpisodeSpec(f"e{i}", f"g{i // 8}", "t", "Answer.", "Q?") for i in range(n_episodes)]
    t0 = time.perf_counter()
    episodes = await runner.run_many(specs, CONCURRENCY)
    elapsed = time.perf_counter() - t0
    turns = sum(len(e.turns) for e in episodes)
    assert all(e.stop_reason == "answered" for e in episodes), episodes[0].stop_reason
    return elapsed, turns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--episodes", type=int, default=None)
    args = ap.parse_args()
    n = args.episodes or (400 if args.quick else 2000)
    tok = HFTokenizer(load_tokenizer())
    # As `turnrl train` does after start-up: move the import-time heap (torch, transformers)
    # out of the collector's view, so gen-2 collections triggered by per-turn allocations do
    # not rescan hundreds of thousands of long-lived objects.
    gc.freeze()
    asyncio.run(harness(50, tok))  # warm-up
    h_s, turns = asyncio.run(harness(n, tok))
    b_s = min(asyncio.run(bare(n)) for _ in range(3))
    us_turn = h_s / turns * 1e6
    bare_us = b_s / (n * TURNS) * 1e6
    print(f"episodes {n}, turns {turns}: turnrl {us_turn:.1f} us/turn, bare {bare_us:.2f} us/turn")
    print(
        json.dumps(
            {
                "bench": "runner",
                "value": round(us_turn, 1),
                "unit": "us/turn",
                "ratio": round(us_turn / bare_us, 1),
                "ratio_of": "turnrl/bare-asyncio",
                "target": "<= 100 us/turn",
                "ok": us_turn <= 100,
            }
        )
    )


if __name__ == "__main__":
    main()
