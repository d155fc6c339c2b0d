"""Config files: examples validate, round-trip through YAML, and bad ones name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnrl.config import ConfigError, RunConfig, load_config
from turnrl.tasks.humaneval import OUTCOMES
from turnrl.tasks.registry import SUITE_CONFIGS, SUITE_KINDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg


def test_bad_field_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  group_size: 1\nbudget:\n  max_turnz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "train.group_size" in msg and "budget.max_turnz" in msg and str(bad) in msg


def test_bad_variant_and_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: gpt5\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(bad)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")


def test_overrides() -> None:
    cfg = load_config(ROOT / "examples" / "demo.yaml", {"train.steps": 1, "seed": 7})
    assert cfg.train.steps == 1 and cfg.seed == 7
    assert isinstance(cfg, RunConfig)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_a_metric_the_suite_does_not_emit_is_refused_naming_field_and_metrics(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        "task: {kind: humaneval}\nrewards: {weights: {outcome: 1.0}, outcome_metric: f1}\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "rewards.components[0] (outcome).metric: 'f1' is not a metric of task 'humaneval'" in msg
    assert "(it emits: correct, wrong, syntax_error, crashed, timed_out, sandbox_error)" in msg
    # Every field that names a metric is checked: a component's, and success_metric.
    path = _write(
        tmp_path,
        "task: {kind: search_qa}\n"
        "rewards: {components: [{kind: outcome}, {kind: otc, metric: close}]}\n",
    )
    with pytest.raises(ConfigError, match=r"\(otc\)\.metric: 'close' is not a metric"):
        load_config(path)
    path = _write(tmp_path, "task: {kind: bfcl_single}\nrewards: {success_metric: f1}\n")
    with pytest.raises(ConfigError, match=r"rewards\.success_metric: 'f1' is not a metric"):
        load_config(path)
    # The same metric on a suite that emits it loads.
    path = _write(tmp_path, "task: {kind: search_qa}\nrewards: {outcome_metric: f1}\n")
    assert load_config(path).rewards.outcome().metric == "f1"


def test_answer_text_rewards_need_a_suite_with_gold_answer_text(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "task: {kind: bfcl_multi_turn}\n"
        "rewards: {weights: {outcome: 1.0, saturation: 0.5}, outcome_metric: correct}\n",
    )
    with pytest.raises(ConfigError, match="need gold answer text"):
        load_config(path)


def test_suite_capabilities_are_declared_on_the_config_classes() -> None:
    facts = {c.kind_name(): (c.runs_code, c.gold_answer_text, c.metrics) for c in SUITE_CONFIGS}
    assert facts == {
        "search_qa": (False, True, ("correct", "exact_match", "f1")),
        "humaneval": (True, True, OUTCOMES),
        "gsm_symbolic": (True, True, ("correct", "close", "parsed")),
        "bfcl_multi_turn": (False, False, ("correct", "turns_correct", "finished")),
        "bfcl_single": (False, False, ("correct",)),
        "embodied_search": (False, True, ("correct", "picked", "answer_correct", "asked")),
    }
    assert tuple(facts) == SUITE_KINDS


def test_every_tool_kind_loads_and_a_code_tool_opens_the_sandbox(tmp_path: Path) -> None:
    tools = [
        {"kind": "web_fetch", "fetch": {"allow_hosts": ["example.org"]}},
        {"kind": "mcp", "server": {"transport": "stdio", "command": "server"}},
        {"kind": "search", "search_k": 2},
        {"kind": "python", "stateful": False, "limits": {"wall_s": 5}},
        {"kind": "ask", "expert": {"model": {"kind": "tiny"}}, "max_questions": 2},
    ]
    cfg = load_config(_write(tmp_path, "task: {kind: search_qa}\n"), {"tools": tools})
    assert [t.kind for t in cfg.tools] == ["web_fetch", "mcp", "search", "python", "ask"]
    again = _write(tmp_path, cfg.to_yaml())
    assert load_config(again) == cfg
    assert cfg.needs_sandbox()
    without_python = load_config(again, {"tools": [tools[2], tools[4]]})
    assert not without_python.needs_sandbox()
    assert load_config(again, {"tools": [], "task": {"kind": "humaneval"}}).needs_sandbox()
    with pytest.raises(ConfigError, match=r"tools\.0\.ask\.prompt"):
        load_config(again, {"tools": [{"kind": "ask", "prompt": "no field"}]})
