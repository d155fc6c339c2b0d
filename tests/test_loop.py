"""`turnrl.loop.train_step` with injected parts: a two-item suite graded on exact answers, a
scripted policy over the real tokenizer, the tiny model's learner, and a weight sync that
records what the loop asks of it. The stages run in order, the episodes are stored before the
learner starts, the learner's new version reaches the policy through `WeightSync` only, and
the ids the learner trains on are the ids the policy sampled."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.model import load_model, tiny_model_dir
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode
from turnrl.agent.runner import Budget, EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.store import RunStore
from turnrl.config import RunConfig
from turnrl.loop import Rollouts, StepHooks, train_step
from turnrl.rl.learner import Learner
from turnrl.tasks.base import BaseSuite, Split, TaskItem
from turnrl.tools.base import AnyTool

ITEMS = (TaskItem("a", "Capital of France?", ("Paris",)), TaskItem("b", "2 + 2?", ("4",)))


class ExactSuite(BaseSuite):
    name = "exact"
    source = "generated"
    license = "MIT"
    system_prompt = "Answer inside <answer></answer>."

    def items(self, split: Split) -> Sequence[TaskItem]:
        return ITEMS

    def tools(self) -> Sequence[AnyTool]:
        return ()

    async def grade(self, item: TaskItem, answer: str | None) -> dict[str, float]:
        return {"correct": float(answer in item.answers)}


class RecordingSync:
    """A `WeightSync` over the scripted policy that notes each call and what the store held."""

    def __init__(self, policy: ScriptedPolicy, store: RunStore) -> None:
        self.policy = policy
        self.store = store
        self.calls: list[tuple[str, int, int]] = []
        """(call, version, episodes stored at that moment)."""

    @property
    def version(self) -> int:
        return self.policy.version

    async def begin_update(self) -> None:
        self.calls.append(("begin", self.version, _stored(self.store.run_dir)))

    async def end_update(self, version: int) -> None:
        await self.policy.end_update(version)
        self.calls.append(("end", version, _stored(self.store.run_dir)))


def _stored(run_dir: Path) -> int:
    with RunStore.open_readonly(run_dir) as store:
        return len(list(store.episodes()))


def test_one_step_runs_the_stages_in_order(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    renderer = ChatML(HFTokenizer(tokenizer))
    eot = str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))
    # Each group gets a right and a wrong answer: a learning signal in every group.
    replies = itertools.cycle(
        ["<answer>Paris</answer>", "<answer>4</answer>", "<answer>no</answer>"]
    )
    policy = ScriptedPolicy(lambda _: next(replies) + eot, renderer.tokenizer, logprob=-2.0)
    config = RunConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"kind": "tiny"},
            "rewards": {"components": [{"kind": "outcome", "metric": "correct"}]},
            "train": {"group_size": 3, "tasks_per_step": 2},
            "learner": {"lr": 1e-3},
        }
    )
    learner = Learner(load_model(tiny_model_dir()), config.learner)
    runner = EpisodeRunner(
        policy, renderer, [], Budget(max_turns=1, max_new_tokens=16), SamplingParams()
    )
    stages: list[str] = []
    sampled: list[Episode] = []
    with RunStore(config.run_dir) as store:
        sync = RecordingSync(policy, store)
        hooks = StepHooks(on_episode=sampled.append, on_stage=stages.append)
        report = asyncio.run(
            train_step(
                0,
                ITEMS,
                Rollouts(runner, ExactSuite(), concurrency=1),
                config,
                learner,
                sync,
                store,
                renderer.tokenizer.encode,
                hooks,
            )
        )
    assert stages == ["rollout", "grade", "measure", "score", "store", "learn", "sync"]
    # Stored (all 6 episodes) before the learner ran; the new version reached the policy
    # through the sync, and only after the learner's step.
    assert sync.calls == [("begin", 0, 6), ("end", 1, 6)]
    assert report.learn.policy_updated and not report.learn.skipped
    assert report.learn.version == learner.version == policy.version == 1
    scored = report.scored.episodes
    assert [e.outcome["correct"] for e in scored] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert all(t.advantage is not None for e in scored for t in e.turns)
    # Tokens are the truth: what was scored and trained is what the policy sampled.
    by_id = {e.episode_id: e for e in sampled}
    for e in scored:
        assert [t.completion_ids for t in e.turns] == [
            t.completion_ids for t in by_id[e.episode_id].turns
        ]
    row = report.row()
    assert row["skipped"] == 0.0 and row["policy_updated"] == 1.0 and row["policy_version"] == 1
    assert row["reward"] == report.reward == 1 / 3
    assert {"rollout_s", "learn_s", "measure_s", "loss", "episodes"} <= set(row)
