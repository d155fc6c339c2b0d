"""Warm start: what is collected, what is kept, what is trained on, and the `turnrl sft` run."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from turnrl.agent.records import Episode, StopReason, ToolCall, ToolResult, Turn
from turnrl.agent.store import RunStore
from turnrl.config import ConfigError, load_config
from turnrl.sft import (
    WARM_START_DIR,
    answer_supported,
    batches,
    filter_successes,
    sft_targets,
)
from turnrl.sft_config import OracleSource, RejectionSource, RunSource, WarmStartConfig
from turnrl.train import run_sft

ROOT = Path(__file__).resolve().parents[1]


def _turn(text: str, answer: str | None = None, observed: str | None = None, **kw: object) -> Turn:
    calls, results = [], []
    if observed is not None:
        calls = [ToolCall(id="c0", name="search", raw="{}", arguments={"query": "q"})]
        results = [ToolResult(call_id="c0", text=observed)]
    return Turn(
        index=0,
        prompt_ids=[1, 2],
        completion_ids=[3, 4],
        completion_logprobs=[0.0, 0.0],
        observation_ids=[5],
        text=text,
        finish_reason="stop",
        tool_calls=calls,
        tool_results=results,
        answer=answer,
        **kw,  # type: ignore[arg-type]
    )


def _episode(task: str, turns: list[Turn], correct: float, eid: str = "e") -> Episode:
    answer = next((t.answer for t in reversed(turns) if t.answer is not None), None)
    turns = [t.model_copy(update={"index": i}) for i, t in enumerate(turns)]
    return Episode(
        episode_id=eid,
        task_id=task,
        group_id=task,
        turns=turns,
        stop_reason=StopReason.ANSWERED,
        answer=answer,
        outcome={"correct": correct},
    )


def test_answer_supported_needs_the_gold_in_an_observation_before_the_answer() -> None:
    searched = _episode(
        "a",
        [_turn("call", observed="Capital: Hanoi (Ha Noi)"), _turn("ans", answer="Hanoi")],
        1.0,
    )
    guessed = _episode("a", [_turn("ans", answer="Hanoi")], 1.0)
    wrong_page = _episode(
        "a", [_turn("call", observed="Capital: Hue"), _turn("ans", answer="Hanoi")], 1.0
    )
    assert answer_supported(searched, ["Hanoi"])
    assert not answer_supported(guessed, ["Hanoi"])
    assert not answer_supported(wrong_page, ["Hanoi"])
    # Whole words after normalisation: "Hanoi" does not support "Han".
    assert not answer_supported(
        _episode("a", [_turn("c", observed="Hanoi"), _turn("a", answer="Han")], 1.0), ["Han"]
    )


def test_filters_keep_successes_and_the_cheapest_per_item() -> None:
    two_calls = _episode(
        "a", [_turn("c", observed="x"), _turn("c", observed="y"), _turn("a", answer="y")], 1, "a2"
    )
    one_call = _episode("a", [_turn("c", observed="y"), _turn("a", answer="y")], 1, "a1")
    failed = _episode("b", [_turn("a", answer="n")], 0, "b0")
    eps = [two_calls, one_call, failed]
    assert [e.episode_id for e in filter_successes(eps, "all", "correct")] == ["a2", "a1"]
    assert [e.episode_id for e in filter_successes(eps, "best", "correct")] == ["a1"]
    assert [e.episode_id for e in filter_successes(eps, "cheapest_success", "correct")] == ["a1"]


def test_sft_targets_train_wellformed_turns_only() -> None:
    e = _episode(
        "a",
        [
            _turn("bad", format_error="neither call nor answer"),
            _turn("c", observed="y", replayed=True),
            _turn("a", answer="y"),
        ],
        1,
    )
    assert [t.advantage for t in sft_targets(e).turns] == [None, None, 1.0]


def test_batches_cover_every_episode_once_per_epoch() -> None:
    eps = [_episode(str(i), [_turn("a", answer="x")], 1, str(i)) for i in range(7)]
    plan = batches(eps, 3, 2, seed=0)
    assert [len(b) for b in plan] == [3, 3, 1, 3, 3, 1]
    for epoch in (plan[:3], plan[3:]):
        assert sorted(e.episode_id for b in epoch for e in b) == [str(i) for i in range(7)]


def test_warm_start_config_loads_and_names_bad_fields(tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "examples" / "tiny.yaml",
        {
            "warm_start": {
                "sources": [
                    {"kind": "oracle", "n_items": 8},
                    {"kind": "rejection", "samples": 2},
                    {"kind": "run", "path": str(tmp_path)},
                ],
                "evidence": "flag",
            }
        },
    )
    assert cfg.warm_start == WarmStartConfig(
        sources=[
            OracleSource(n_items=8),
            RejectionSource(samples=2),
            RunSource(path=tmp_path),
        ],
        evidence="flag",
    )
    with pytest.raises(ConfigError, match=r"warm_start\.sources\.0"):
        load_config(ROOT / "examples" / "tiny.yaml", {"warm_start": {"sources": [{"kind": "x"}]}})


def test_turnrl_sft_clones_oracle_traces_on_train_items(tmp_path: Path) -> None:
    run_dir = tmp_path / "sft"
    cfg = load_config(
        ROOT / "examples" / "tiny.yaml",
        {
            "run_dir": str(run_dir),
            # Room for the oracle's whole tool call (cut at 24 tokens, it calls nothing and
            # its answers would be dropped as unsupported).
            "budget.max_new_tokens": 64,
            # A two-hop question takes the oracle three turns: search the clue, search the
            # bridge entity, answer; two observations need more than 1024 tokens of context.
            "budget.max_turns": 4,
            "budget.max_context_tokens": 2048,
            "warm_start": {"sources": [{"kind": "oracle", "n_items": 6}], "batch_episodes": 4},
        },
    )
    out = run_sft(cfg, Console(width=120, record=True), with_eval=False)
    report = out["report"]
    assert report.data.collected == {"oracle": 6}
    assert len(report.data.episodes) == 6 and report.data.unsupported == 0
    # 6 episodes in batches of 4: two optimizer steps, each moving the weights.
    assert len(report.rows) == 2 and report.version == 2
    test_ids = {it.id for it in _suite_items(cfg, "test")}
    with RunStore.open_readonly(run_dir / WARM_START_DIR) as store:
        stored = list(store.episodes())
        metrics = store.metrics()
    assert len(stored) == 6 and not {e.task_id for e in stored} & test_ids
    # Every trained token is one the oracle's turns produced: the stored completion ids.
    assert all(t.advantage == 1.0 for e in stored for t in e.turns)
    assert all(e.n_tool_calls >= 1 for e in stored)
    assert [m["sft_step"] for m in metrics] == [0.0, 1.0]
    assert (run_dir / "checkpoints" / "warm_start" / "merged" / "config.json").is_file()


def _suite_items(cfg: object, split: str) -> list[object]:
    from turnrl.suites import build_suite

    suite = build_suite(cfg.task, None, None, chat=cfg.chat)  # type: ignore[attr-defined]
    return list(suite.items(split))


@pytest.mark.parametrize(
    "example",
    ["bfcl_single", "bfcl_multi_turn", "embodied", "gsm_symbolic", "humaneval"],
)
def test_turnrl_sft_works_on_every_suite_with_an_oracle(example: str, tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "examples" / f"{example}.yaml",
        {
            "run_dir": str(tmp_path / example),
            "model": {"kind": "tiny"},
            "learner.adaptation": {"kind": "full"},
            "warm_start": {"sources": [{"kind": "oracle", "n_items": 2}], "batch_episodes": 2},
        },
    )
    report = run_sft(cfg, Console(width=120, record=True), with_eval=False)["report"]
    assert report.data.collected == {"oracle": 2}
    assert len(report.data.episodes) == 2, "the oracle solves its items, with evidence"
    assert report.version == 1 and report.rows[0]["n_tokens"] > 0
