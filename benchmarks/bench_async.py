"""Synchronous vs asynchronous training: the same learner steps, wall time of each mode.

Three runs of `turnrl train`'s RL loop on the search demo task, each from the same start
(model, seed, items, episode seeds): `train.mode: sync`, then `async` with `max_staleness` 1
and 2. The episodes call a tool whose latency is heavy-tailed (lognormal, `--sigma`, seeded:
the runs draw the same latencies in call order), so a few episodes run far longer than the
rest, as agent episodes that wait on searches, sandboxes or APIs do. The synchronous loop waits
for each step's longest episode and then for the learner; the asynchronous one keeps later
batches' episodes running meanwhile. Ratio = sync wall time / async wall time at staleness 1
(target >= 1.5); also reported: staleness 2; `steady_ratio`, the same once the first step is
done (the asynchronous pipeline fills during the first step and gains nothing there, so few
steps understate it); the mean and max version lag of the batches' turns; the learner's wait
for its batches; each mode's training reward (mean of the last half of the steps; the three
should agree within noise).

Untrained models rarely write a valid tool call (the base SmolLM2 makes ~0.06 search calls
per episode, the tiny random model none), so the run reads every reply that neither answers
nor calls as a call to the slow `lookup` tool (`EveryReplyCalls`): the sampled ids, their
logprobs and what the learner trains are the model's own; only the episode's waits come from
the benchmark. Steps train (GAE over a value head, LoRA), so the learner has real work.

`--quick` uses the tiny random-weight model (~45 s on 2 cores); the full run the embedded
SmolLM2-135M (fp32, ~14 min). torch runs one intra-op thread (`--threads`, 0 for torch's
default): on this shared 2-core machine, with two threads, turns took 10-50x longer while
another job held a core (oversubscribed OpenMP threads), which drowned the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from turnrl.agent.parse import ParsedTurn
from turnrl.agent.records import ToolCall
from turnrl.agent.tool_formats import ToolFormat
from turnrl.async_loop import train_async
from turnrl.config import RunConfig
from turnrl.session import open_session
from turnrl.tools.base import AnyTool
from turnrl.tools.function import tool
from turnrl.train import train_steps

MODES = (("sync", 0), ("async", 1), ("async", 2))


class EveryReplyCalls:
    """The run's tool format, except that a reply with neither an answer nor a call is read
    as a call to `lookup` (module docstring)."""

    def __init__(self, inner: ToolFormat) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def parse(self, text: str, turn_index: int) -> ParsedTurn:
        parsed = self.inner.parse(text, turn_index)
        if parsed.answer is not None or parsed.tool_calls:
            return parsed
        raw = '{"name": "lookup", "arguments": {}}'
        return ParsedTurn(
            tool_calls=[ToolCall(id=f"t{turn_index}c0", name="lookup", raw=raw, arguments={})]
        )


def lookup_tool(seed: int, median_s: float, sigma: float) -> AnyTool:
    """A service whose latency is lognormal around `median_s` (p99 ~ median * e^(2.33 sigma))."""
    rng = random.Random(seed)

    @tool(timeout_s=600)
    async def lookup(query: str = "") -> str:
        """Look something up in a slow service.

        Args:
            query: What to look up.
        """
        await asyncio.sleep(median_s * rng.lognormvariate(0.0, sigma))
        return "nothing found"

    return lookup


def config(args: argparse.Namespace, run_dir: Path, mode: str, staleness: int) -> RunConfig:
    per_step = args.tasks * args.group
    return RunConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": args.seed,
            "model": {"kind": args.model},
            "task": {"kind": "search_qa", "n_train": 40, "n_test": 10},
            "budget": {
                "max_turns": args.turns,
                "max_tool_calls": args.turns,
                "max_new_tokens": args.new_tokens,
                "max_context_tokens": 2048,
            },
            # Room for every admitted batch: the bound, not the slots, limits async.
            "concurrency": per_step * 3,
            "policy": {"torch_threads": args.threads or None},
            "learner": {
                "lr": 1e-4,
                "adaptation": {"kind": "lora", "r": 8, "alpha": 16},
                "value_head": {},
            },
            "train": {
                "steps": args.steps,
                "tasks_per_step": args.tasks,
                "group_size": args.group,
                "estimator": {"kind": "gae"},
                "mode": mode,
                "max_staleness": staleness,
            },
        }
    )


def run_mode(args: argparse.Namespace, root: Path, mode: str, staleness: int) -> dict[str, Any]:
    cfg = config(args, root / f"{mode}-{staleness}", "async" if staleness else "sync", staleness)
    console = Console(file=io.StringIO(), width=160)
    stamps: list[float] = []
    with open_session(cfg, console, train=True) as s:

        async def main() -> tuple[float, list[dict[str, float]]]:
            try:
                await s.open_tools()
                s.extra_tools.append(lookup_tool(args.seed, args.latency, args.sigma))
                renderer: Any = s.renderer
                renderer.tool_format = EveryReplyCalls(renderer.tool_format)
                append = s.store.append_metrics

                def stamped(row: dict[str, float]) -> None:
                    stamps.append(time.monotonic())  # both loops store one row per step
                    append(row)

                s.store.append_metrics = stamped  # type: ignore[method-assign]
                t0 = time.monotonic()
                rows = await (train_async(s) if cfg.train.mode == "async" else train_steps(s))
                return time.monotonic() - t0, rows
            finally:
                await s.close_sandbox()

        wall, rows = asyncio.run(main())
    half = rows[len(rows) // 2 :]
    out = {
        "mode": f"async-{staleness}" if mode == "async" else mode,
        "wall_s": wall,
        "reward": statistics.fmean(r["reward"] for r in half),
        "rollout_s": statistics.fmean(r["rollout_s"] for r in rows),
        "learn_s": statistics.fmean(r["learn_s"] + r.get("measure_s", 0.0) for r in rows),
        "calls_per_episode": statistics.fmean(r["tool_calls_per_episode"] for r in rows),
        "lag_mean": statistics.fmean(r.get("batch_lag_mean", 0.0) for r in rows),
        "lag_max": max(r.get("batch_lag_max", 0.0) for r in rows),
        "wait_s": statistics.fmean(r.get("learner_wait_s", 0.0) for r in rows),
        "trained": sum(r["skipped"] == 0.0 for r in rows),
        # Steady state: per step once the first step is done (the pipeline is full).
        "step_s": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1),
    }
    print(
        f"{out['mode']:>8}: {wall:6.1f} s for {len(rows)} steps ({out['trained']} trained), "
        f"{out['step_s']:.2f} s/step after the first; "
        f"per step rollout {out['rollout_s']:.2f} s, measure+learn {out['learn_s']:.2f} s, "
        f"learner waited {out['wait_s']:.2f} s; lag mean {out['lag_mean']:.2f} max "
        f"{out['lag_max']:.0f}; calls/ep {out['calls_per_episode']:.2f}; reward "
        f"{out['reward']:+.3f}",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the tiny model (under 45 s)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tasks", type=int, default=None, help="task items per step")
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--latency", type=float, default=None, help="median tool latency (s)")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the latency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default, all cores)"
    )
    args = ap.parse_args()
    args.model = "tiny" if args.quick else "embedded"
    args.steps = args.steps or 5
    args.tasks = args.tasks or 2
    args.new_tokens = args.new_tokens or (24 if args.quick else 32)
    args.latency = args.latency or (0.3 if args.quick else 4.0)
    print(
        f"model {args.model}, {args.steps} steps of {args.tasks} tasks x {args.group}, "
        f"{args.turns} turns of <= {args.new_tokens} tokens, tool latency lognormal "
        f"(median {args.latency} s, sigma {args.sigma})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_async-") as tmp:
        # Untimed: the process's first forward and backward passes pay one-off costs (~10 s
        # here) that would otherwise all land on the first mode measured.
        cheap = {"steps": 1, "tasks": 1, "turns": 1, "new_tokens": 8, "latency": 0.01}
        warm = argparse.Namespace(**(vars(args) | cheap))
        run_mode(warm, Path(tmp), "warm-up", 0)
        results = {f"{m}-{s}": run_mode(args, Path(tmp), m, s) for m, s in MODES}
    sync, one, two = results["sync-0"], results["async-1"], results["async-2"]
    ratio = sync["wall_s"] / one["wall_s"]
    print(
        json.dumps(
            {
                "bench": "async",
                "value": round(one["wall_s"], 2),
                "unit": "s",
                "ratio": round(ratio, 2),
                "ratio_of": "sync/async(staleness 1)",
                "target": ">= 1.5",
                "ok": ratio >= 1.5,
                "sync_s": round(sync["wall_s"], 2),
                "async2_s": round(two["wall_s"], 2),
                "ratio_staleness_2": round(sync["wall_s"] / two["wall_s"], 2),
                "steady_ratio": round(sync["step_s"] / one["step_s"], 2),
                "steady_ratio_staleness_2": round(sync["step_s"] / two["step_s"], 2),
                "lag_mean_1": round(one["lag_mean"], 3),
                "lag_mean_2": round(two["lag_mean"], 3),
                "reward_sync": round(sync["reward"], 4),
                "reward_async_1": round(one["reward"], 4),
                "reward_async_2": round(two["reward"], 4),
                "steps": args.steps,
                "model": args.model,
            }
        )
    )


if __name__ == "__main__":
    main()
