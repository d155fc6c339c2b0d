"""`turnrl.async_loop`: the asynchronous loop with a staleness bound.

With `max_staleness: 0` it is the synchronous loop: a `turnrl train` run stores the same
episodes and ends with the same weights in both modes. With a bound of 1 or 2, on injected
parts (a scripted policy over the real tokenizer, a slow tool, the tiny model's learner):
rollouts of later batches start before earlier steps end, episodes span weight updates with
each turn keeping its version, no turn is more than the bound behind the learner that trains
it, every episode is stored once, and every step has its row. Scheduling is checked by the
order of the loop's events, never by timings."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.model import load_model, tiny_model_dir
from turnrl.agent.policy import Completion, SamplingParams
from turnrl.agent.records import Episode
from turnrl.agent.runner import Budget, EpisodeRunner
from turnrl.agent.store import RunStore
from turnrl.async_loop import AsyncHooks, run_async
from turnrl.config import RunConfig
from turnrl.loop import Rollouts
from turnrl.rl.learner import Learner, StepResult
from turnrl.rollout import episode_specs
from turnrl.tasks.base import BaseSuite, Split, TaskItem
from turnrl.tools.base import AnyTool
from turnrl.tools.function import tool
from turnrl.train import run_train

ROOT = Path(__file__).resolve().parents[1]
ITEMS = (TaskItem("a", "Capital of France?", ("Paris",)), TaskItem("b", "2 + 2?", ("4",)))
STEPS = 4
GROUP = 2


# ---- staleness 0 is the synchronous loop ---------------------------------------------------


def tiny_config(tmp_path: Path, name: str, mode: str) -> RunConfig:
    """The tiny model, two steps of GAE over a value head (its returns are all equal, so the
    value baseline gives the turns nonzero advantages and every step trains). One episode in
    flight: the in-process policy batches concurrent requests by arrival, and rows batched
    differently round differently (~1e-6 in a logprob, enough to flip a draw now and then), so
    with more in flight not even two synchronous runs are bit-equal."""
    cfg: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    cfg |= {
        "run_dir": str(tmp_path / name),
        "concurrency": 1,
        "train": {
            "steps": 2,
            "tasks_per_step": 2,
            "group_size": 2,
            "estimator": {"kind": "gae"},
            "mode": mode,
            "max_staleness": 0,
            "checkpoint_every": 1,
        },
    }
    cfg["learner"] |= {"value_head": {}}
    return RunConfig.model_validate(cfg)


def stored(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stored episodes and journaled rollouts, without their wall times."""
    timing: Any = {"wall_s": True, "turns": {"__all__": {"generate_s", "tools_s"}}}
    with RunStore.open_readonly(run_dir) as store:
        return (
            [e.model_dump(exclude=timing) for e in store.episodes()],
            [e.model_dump(exclude=timing) for e in store.rollouts()],
        )


def final_weights(run_dir: Path, checkpoint: str = "final") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "checkpoints" / checkpoint / "merged").glob("*.safetensors")):
        out |= load_file(str(f))
    assert out
    return out


def test_staleness_0_is_the_synchronous_loop(tmp_path: Path) -> None:
    console = Console(width=160, record=True)
    sync = run_train(tiny_config(tmp_path, "sync", "sync"), console, with_eval=False)
    run = run_train(tiny_config(tmp_path, "async", "async"), console, with_eval=False)
    episodes, journal = stored(tmp_path / "sync")
    assert len(episodes) == len(journal) == 8
    assert stored(tmp_path / "async") == (episodes, journal)
    for checkpoint in ("step-1", "step-2", "final"):  # `train.checkpoint_every: 1`
        w_sync = final_weights(tmp_path / "sync", checkpoint)
        w_async = final_weights(tmp_path / "async", checkpoint)
        assert w_sync.keys() == w_async.keys()
        assert all(torch.equal(w_sync[k], w_async[k]) for k in w_sync), checkpoint
    w_first = final_weights(tmp_path / "async", "step-1")
    assert any(not torch.equal(w_first[k], w_async[k]) for k in w_async), "step 2 trained"
    # The same rows, timings aside, and the async figures besides.
    assert [r["skipped"] for r in run["rows"]] == [0.0, 0.0]
    for a, b in zip(sync["rows"], run["rows"], strict=True):
        same = {k for k in a if not k.endswith("_s") and k not in ("seconds", "wall_s_per_episode")}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
        assert b["batch_lag_mean"] == b["batch_lag_max"] == 0.0
        assert set(b) - set(a) == {"batch_lag_mean", "batch_lag_max", "learner_wait_s"}


# ---- staleness 1 and 2 on injected parts -----------------------------------------------------


class ExactSuite(BaseSuite):
    """Two items; an answer is right when it says `right`."""

    name = "exact"
    source = "generated"
    license = "MIT"
    system_prompt = "Answer inside <answer></answer>."

    def items(self, split: Split) -> Sequence[TaskItem]:
        return ITEMS

    def tools(self) -> Sequence[AnyTool]:
        return ()

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        return {"correct": float(answer == "right")}


class SeededScript:
    """A `Policy` and `WeightSync` (version stamps only) whose replies follow the request seed,
    laid out by `episode_specs` as seed + 1e6 (batch + 1) + 1e4 rollout + turn: turn 0 calls
    `slow` with the episode's batch, turn 1 answers `right` on even rollouts and `wrong` on
    odd ones (every group has a learning signal), or always `right` without `signal`."""

    def __init__(self, tokenizer: HFTokenizer, eot: str, signal: bool = True) -> None:
        self.tokenizer = tokenizer
        self.eot = eot
        self.signal = signal
        self.version = 0
        self.log: list[str] = []
        """`begin` and `end` as the loop calls them (the learner adds its own)."""

    async def begin_update(self) -> None:
        self.log.append("begin")

    async def end_update(self, version: int) -> None:
        self.log.append("end")
        self.version = version

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        assert params.seed is not None
        batch, rest = divmod(params.seed, 1_000_000)
        rollout, turn = divmod(rest, 10_000)
        if turn == 0:
            call = {"name": "slow", "arguments": {"batch": batch - 1}}
            text = f"<tool_call>{json.dumps(call)}</tool_call>"
        else:
            right = rollout % 2 == 0 or not self.signal
            text = f"<answer>{'right' if right else 'wrong'}</answer>"
        ids = self.tokenizer.encode(text + self.eot, parse_special=True)
        return Completion(tuple(ids), (-2.0,) * len(ids), "stop", self.version)


def slow_tool(steps_done: list[asyncio.Event], seed: int) -> AnyTool:
    """A tool with a seeded heavy-tailed latency (lognormal, median 5 ms, capped at 0.1 s); a
    call from batch b >= 1 also returns only after step b - 1 is done, so every such episode
    spans a weight update whatever the timings."""
    rng = random.Random(seed)

    @tool(timeout_s=120)
    async def slow(batch: int) -> str:
        """Look something up, slowly.

        Args:
            batch: The batch of the episode that calls.
        """
        await asyncio.sleep(min(rng.lognormvariate(math.log(0.005), 1.0), 0.1))
        if batch >= 1:
            await steps_done[batch - 1].wait()
        return "found it"

    return slow


class Run:
    """The injected parts of one async run, and what it recorded."""

    def __init__(
        self,
        tmp_path: Path,
        tokenizer: PreTrainedTokenizerBase,
        max_staleness: int,
        signal: bool = True,
    ) -> None:
        self.config = RunConfig.model_validate(
            {
                "run_dir": str(tmp_path / "run"),
                "model": {"kind": "tiny"},
                "rewards": {"components": [{"kind": "outcome", "metric": "correct"}]},
                "train": {
                    "steps": STEPS,
                    "group_size": GROUP,
                    "tasks_per_step": len(ITEMS),
                    "mode": "async",
                    "max_staleness": max_staleness,
                },
                "learner": {"lr": 1e-3},
            }
        )
        self.renderer = ChatML(HFTokenizer(tokenizer))
        eot = str(tokenizer.convert_ids_to_tokens(self.renderer.end_of_turn_id()))
        self.policy = SeededScript(self.renderer.tokenizer, eot, signal)
        self.steps_done = [asyncio.Event() for _ in range(STEPS)]
        runner = EpisodeRunner(
            self.policy,
            self.renderer,
            [slow_tool(self.steps_done, seed=max_staleness)],
            Budget(max_turns=2, max_new_tokens=48),
            SamplingParams(),
        )
        self.rollouts = Rollouts(runner, ExactSuite(), concurrency=16)
        self.learner = Learner(load_model(tiny_model_dir()), self.config.learner)
        self.events: list[tuple[str, int]] = []
        # Steps 0..3 draw from the two items in the order a run's `random.Random(seed)` would.
        rng = random.Random(self.config.seed)
        self.batches = [rng.sample(ITEMS, len(ITEMS)) for _ in range(STEPS)]

    def on_event(self, name: str, step: int) -> None:
        self.events.append((name, step))
        if name == "learned":
            self.steps_done[step].set()

    def run(self, shared_weights: bool = True) -> list[dict[str, float]]:
        async def main() -> list[dict[str, float]]:
            with RunStore(self.config.run_dir) as store:
                # A bound that stalled admission would hang: fail instead.
                async with asyncio.timeout(300):
                    return await run_async(
                        self.batches,
                        self.rollouts,
                        self.config,
                        self.learner,
                        self.policy,
                        store,
                        self.renderer.tokenizer.encode,
                        shared_weights=shared_weights,
                        hooks=AsyncHooks(on_event=self.on_event),
                    )

        return asyncio.run(main())

    def stored(self) -> tuple[list[Episode], list[Episode], list[dict[str, Any]]]:
        with RunStore.open_readonly(self.config.run_dir) as store:
            return list(store.episodes()), list(store.rollouts()), store.metrics()

    def spec_ids(self) -> list[str]:
        return [
            spec.episode_id
            for step, items in enumerate(self.batches)
            for spec in episode_specs(ExactSuite(), items, GROUP, step, 0, f"s{step}")
        ]


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_rollouts_overlap_learning_within_the_bound(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path, max_staleness: int
) -> None:
    run = Run(tmp_path, tokenizer, max_staleness)
    rows = run.run()
    episodes, journal, metrics = run.stored()
    at = run.events.index
    for b in range(STEPS - 1):
        # Batch b + 1 starts before step b ends ...
        assert at(("start", b + 1)) < at(("learned", b))
        # ... and batch b + 1 + bound only once step b has ended (admission control).
        if b + 1 + max_staleness < STEPS:
            assert at(("admit", b + 1 + max_staleness)) > at(("learned", b))
    # Trained in order, every step learned (the scripted groups all carry a signal).
    assert [e for e in run.events if e[0] == "learn"] == [("learn", b) for b in range(STEPS)]
    assert [r["policy_updated"] for r in rows] == [1.0] * STEPS
    assert [r["policy_version"] for r in rows] == [b + 1.0 for b in range(STEPS)]
    # Every spec's episode stored exactly once, and journaled once, whatever the end order.
    assert Counter(e.episode_id for e in episodes) == Counter(run.spec_ids())
    assert Counter(e.episode_id for e in journal) == Counter(run.spec_ids())
    assert [m["step"] for m in metrics] == [r["step"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    for e in episodes:
        step = e.step
        versions = [t.policy_version for t in e.turns]
        # Learner version at training time is `step` (each step updated once).
        assert all(0 <= step - v <= max_staleness for v in versions), (e.episode_id, versions)
        if step >= 1:
            # Partial rollout: the answer came after the update the tool waited for.
            assert versions[0] < versions[1] == step
        assert e.outcome["correct"] == float(e.episode_id.endswith("/0"))
    for b, row in enumerate(rows):
        assert row["batch_lag_max"] == min(b, max_staleness)
        assert 0.0 <= row["batch_lag_mean"] <= row["batch_lag_max"]
        assert row["learner_wait_s"] >= 0.0 and row["episodes"] == len(ITEMS) * GROUP
    assert max(r["batch_lag_max"] for r in rows) == max_staleness


def test_skipped_steps_do_not_stall_admission(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Every answer right: no signal, every step skipped, the version stays 0. Admission counts
    steps taken, not versions, so the run still ends (a version count would wait forever)."""
    run = Run(tmp_path, tokenizer, max_staleness=1, signal=False)
    rows = run.run()
    assert [r["skipped"] for r in rows] == [1.0] * STEPS
    assert [r["batch_lag_max"] for r in rows] == [0.0] * STEPS
    assert run.events.index(("start", 3)) < run.events.index(("learned", 2))
    assert len(run.stored()[0]) == STEPS * len(ITEMS) * GROUP


class FailingLearner(Learner):
    """Notes each step in `log` (the policy's); its second step raises."""

    log: list[str]

    def step(
        self,
        episodes: Sequence[Episode],
        value_targets: Sequence[Sequence[float | None]] | None = None,
    ) -> StepResult:
        self.log.append("step")
        if self.log.count("step") == 2:
            raise RuntimeError("the learner broke")
        return super().step(episodes, value_targets)


@pytest.mark.parametrize("shared_weights", [True, False])
def test_learner_error_ends_the_loop(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path, shared_weights: bool
) -> None:
    """In-process weights are held from before the step to after it; a server's only while
    the step's weights are pushed. A failing step ends the run with its own error (not an
    exception group), the version unchanged, the rollouts in flight cancelled."""
    run = Run(tmp_path, tokenizer, max_staleness=2)
    learner = FailingLearner(load_model(tiny_model_dir()), run.config.learner)
    learner.log = run.policy.log
    run.learner = learner
    with pytest.raises(RuntimeError, match="the learner broke"):
        run.run(shared_weights)
    if shared_weights:
        assert run.policy.log == ["begin", "step", "end", "begin", "step", "end"]
    else:
        assert run.policy.log == ["step", "begin", "end", "step"]
    assert run.policy.version == 1
    episodes, _, metrics = run.stored()
    assert [m["step"] for m in metrics] == [0.0]
    assert {e.step for e in episodes} == {0, 1}
