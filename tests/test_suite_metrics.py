"""Regression lock (issue 11): the metrics each suite declares (`SuiteConfig.metrics`) are
exactly the scores its grader returns, and every example config loads.

A run config is checked against the declared metrics at load: a reward that reads a metric
the suite does not emit is refused (`examples/humaneval.yaml` and `gsm_symbolic.yaml` once
trained on `outcome_metric: f1`, which their graders never emit, and read it as 0 on every
episode). That check is only as good as the declarations, so here each suite grades real
episodes of a real item, played through the runner with its real tools (code in a plain
subprocess sandbox): the oracle's gold solution, and a wrong answer. Do not change this test
without a decision.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter
from transformers import PreTrainedTokenizerBase

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode
from turnrl.agent.runner import Budget, EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.config import load_config
from turnrl.rollout import collect
from turnrl.sandboxes.config import SubprocessConfig, open_sandbox
from turnrl.suites import oracle_policies
from turnrl.tasks.registry import SUITE_CONFIGS, SUITE_KINDS, TaskConfig
from turnrl.tasks.suite_config import BuildContext

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMALL: dict[str, dict[str, Any]] = {
    "search_qa": {"n_train": 10, "n_test": 4},
    "humaneval": {},
    "gsm_symbolic": {"n_train": 4, "n_test": 2},
    "bfcl_multi_turn": {"categories": ["base"]},
    "bfcl_single": {},
    "embodied_search": {"n_train": 2, "n_test": 2, "ambiguity": 2, "hint_rate": 0.0},
}
"""Each suite's config for this test: few items, and items that exercise its tools (an
embodied item only asking resolves, so the oracle asks)."""

BUDGET = Budget(max_turns=48, max_tool_calls=40, max_new_tokens=2048, max_context_tokens=65536)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    config = load_config(path)
    emitted = config.task.metrics
    assert all(metric in emitted for _, metric in config.rewards.metrics_read())


def test_every_suite_declares_its_metrics() -> None:
    assert set(SUITE_KINDS) == set(SMALL)
    for config in SUITE_CONFIGS:
        assert config.metrics[0] == "correct", config.__name__
        assert len(set(config.metrics)) == len(config.metrics), config.__name__


def _graded(kind: str, tokenizer: PreTrainedTokenizerBase) -> tuple[Episode, Episode]:
    """The oracle's episode and a wrong answer's on the first test item of `kind`, graded."""
    cfg: TaskConfig = TypeAdapter(TaskConfig).validate_python({"kind": kind, **SMALL[kind]})
    renderer = ChatML(HFTokenizer(tokenizer))
    eot = str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))

    async def main() -> tuple[Episode, Episode]:
        sandbox = open_sandbox(SubprocessConfig(pool_size=2, warm=0)) if cfg.runs_code else None
        try:
            suite = cfg.build(BuildContext(encode=renderer.tokenizer.encode, sandbox=sandbox))
            item = suite.items("test")[0]
            wrong = ScriptedPolicy(lambda _: f"<answer>wrong</answer>{eot}", renderer.tokenizer)
            runner = EpisodeRunner(
                wrong, renderer, suite.tools(), BUDGET, SamplingParams(temperature=0.0)
            )
            oracle = oracle_policies(suite, renderer, eot)
            (gold,) = await collect(
                runner, suite, [item], 1, -1, 0, 1, tag="gold", policy_for=oracle
            )
            (bad,) = await collect(runner, suite, [item], 1, -1, 0, 1, tag="wrong")
            return gold, bad
        finally:
            if sandbox is not None:
                await sandbox.close()

    return asyncio.run(main())


@pytest.mark.parametrize("kind", SUITE_KINDS)
def test_declared_metrics_are_what_the_grader_returns(
    kind: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    config = next(c for c in SUITE_CONFIGS if c.kind_name() == kind)
    gold, bad = _graded(kind, tokenizer)
    assert gold.outcome["correct"] == 1.0, (gold.stop_reason, gold.outcome)
    assert bad.outcome["correct"] == 0.0, bad.outcome
    assert set(gold.outcome) == set(bad.outcome) == set(config.metrics)
