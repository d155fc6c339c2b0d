"""Every suite trains: for each suite, the oracle's episodes on two train items, played
through the runner with the suite's real tools (code in a plain subprocess sandbox, as in
`test_suite_metrics.py`), earn a positive outcome reward; grouped with a wrong answer on the
same item, GRPO gives their turns nonzero advantages; and one full fine-tuning `Learner.step`
of the tiny model on them runs (not skipped) and moves its weights.

This is the path a warm-started or RL run takes on each suite: tool calls, observations,
followups, long tool outputs and all. A suite whose episodes cannot be trained on (their
tokens do not line up, a reward reads a metric the grader never emits, every advantage is 0)
fails here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from pydantic import TypeAdapter
from transformers import PreTrainedTokenizerBase

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.model import load_model, tiny_model_dir
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode
from turnrl.agent.runner import Budget, EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.rl.advantages import GrpoConfig
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig
from turnrl.rl.rewards import RewardConfig
from turnrl.rl.scoring import score
from turnrl.rollout import collect
from turnrl.sandboxes.config import SubprocessConfig, open_sandbox
from turnrl.suites import oracle_policies
from turnrl.tasks.registry import SUITE_KINDS, TaskConfig
from turnrl.tasks.suite_config import BuildContext

SMALL: dict[str, dict[str, Any]] = {
    "search_qa": {"n_train": 10, "n_test": 4},
    "humaneval": {},
    "gsm_symbolic": {"n_train": 4, "n_test": 2},
    "bfcl_multi_turn": {"categories": ["base"]},
    "bfcl_single": {},
    "embodied_search": {"n_train": 2, "n_test": 2, "ambiguity": 2, "hint_rate": 0.0},
}
"""Each suite's config: few items (the same choices as `test_suite_metrics.py`)."""
N_ITEMS = {"bfcl_multi_turn": 1, "humaneval": 1}
"""Train items per suite (default 2): one where an episode is thousands of tokens (the
learner's passes dominate this file's time)."""

BUDGET = Budget(max_turns=48, max_tool_calls=40, max_new_tokens=2048, max_context_tokens=65536)
"""The oracle's room: HumanEval's answer with its tests, BFCL's long simulator outputs."""
REWARDS = RewardConfig.model_validate({"components": [{"kind": "outcome", "metric": "correct"}]})


def _rollouts(kind: str, tokenizer: PreTrainedTokenizerBase) -> list[Episode]:
    """The oracle's episode and a wrong answer's on each of the first train items, graded;
    each item's two episodes form one group (the oracle's first)."""
    cfg: TaskConfig = TypeAdapter(TaskConfig).validate_python({"kind": kind, **SMALL[kind]})
    renderer = ChatML(HFTokenizer(tokenizer))
    eot = str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))

    async def main() -> list[Episode]:
        sandbox = open_sandbox(SubprocessConfig(pool_size=2, warm=0)) if cfg.runs_code else None
        try:
            suite = cfg.build(BuildContext(encode=renderer.tokenizer.encode, sandbox=sandbox))
            items = list(suite.items("train"))[: N_ITEMS.get(kind, 2)]
            wrong = ScriptedPolicy(lambda _: f"<answer>wrong</answer>{eot}", renderer.tokenizer)
            runner = EpisodeRunner(
                wrong, renderer, suite.tools(), BUDGET, SamplingParams(temperature=0.0)
            )
            oracle = oracle_policies(suite, renderer, eot)
            gold = await collect(runner, suite, items, 1, 0, 0, 2, tag="o", policy_for=oracle)
            bad = await collect(runner, suite, items, 1, 0, 0, 2, tag="w")
            return gold + bad
        finally:
            if sandbox is not None:
                await sandbox.close()

    gold_and_bad = asyncio.run(main())
    # One group per item: the wrong answer joins the oracle's group.
    return [
        e.model_copy(update={"group_id": e.group_id.replace("w/", "o/", 1)}) for e in gold_and_bad
    ]


@pytest.mark.parametrize("kind", SUITE_KINDS)
def test_oracle_episodes_train(kind: str, tokenizer: PreTrainedTokenizerBase) -> None:
    episodes = _rollouts(kind, tokenizer)
    n = len(episodes) // 2
    gold = episodes[:n]
    assert [e.outcome["correct"] for e in episodes] == [1.0] * n + [0.0] * n, kind
    scored, returns = score(episodes, REWARDS, GrpoConfig())
    assert all(e.turns[-1].rewards["outcome"] > 0 for e in scored[:n])
    assert returns == [1.0] * n + [0.0] * n
    # GRPO within each item's pair: +1 on every oracle turn, -1 on every wrong turn (1e-6 eps).
    for e in scored:
        sign = 1.0 if e.outcome["correct"] else -1.0
        assert all(abs(t.advantage - sign) < 1e-5 for t in e.turns if t.advantage is not None)
    assert all(t.advantage is not None for e in scored for t in e.turns)
    assert all(t.completion_ids for e in gold for t in e.turns)

    learner = Learner(load_model(tiny_model_dir()), LearnerConfig(lr=1e-3))
    # The oracle is a script with no model: score its tokens under the tiny model, so the
    # step is on-policy (ratio 1), as a rollout by that model would be.
    measured = learner.logprobs(scored)
    on_policy = [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"completion_logprobs": lp})
                    for t, lp in zip(e.turns, lps, strict=True)
                ]
            }
        )
        for e, lps in zip(scored, measured, strict=True)
    ]
    before = [p.detach().clone() for p in learner.trainable_parameters]
    result = learner.step(on_policy)
    assert not result.skipped and result.policy_updated and result.version == 1
    assert result.scalars["n_tokens"] == sum(
        len(t.completion_ids) for e in on_policy for t in e.turns
    )
    after = [p.detach() for p in learner.trainable_parameters]
    moved = sum(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert moved == len(before), f"{kind}: {moved} of {len(before)} tensors moved"
