"""Routed runs end to end on the tiny model and the search QA suite: `turnrl eval` and
`turnrl train` with priced models in `models:` and a router."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from turnrl.agent.store import RunStore
from turnrl.config import load_config
from turnrl.rl.step_router import scored
from turnrl.train import run_eval, run_train

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "small": {"model": {"kind": "trained"}, "price": {"output_per_mtok": 100.0}},
    "big": {"model": {"kind": "oracle"}, "price": {"per_call": 0.01}},
}


def _config(run_dir: Path, router: dict[str, object], **extra: object) -> object:
    return load_config(
        ROOT / "examples" / "tiny.yaml",
        # Room for the oracle's two searches and its answer on a two-hop question.
        {
            "run_dir": str(run_dir),
            "models": MODELS,
            "router": router,
            "budget.max_turns": 3,
            **extra,
        },
    )


def test_always_expensive_is_the_oracle_priced_per_turn(tmp_path: Path) -> None:
    config = _config(tmp_path / "big", {"kind": "fixed", "model": "big"}, **{"eval.n_items": 4})
    summary = run_eval(config, Console(width=120, record=True), None)  # type: ignore[arg-type]
    with RunStore.open_readonly(tmp_path / "big") as store:
        episodes = list(store.episodes())
    # The oracle solves every item (a search per hop, then the answer).
    assert summary["success"] == 1.0
    routed = [e for e in episodes if e.episode_id.startswith("eval/")]
    assert len(routed) == 4
    for e in routed:
        assert all(t.foreign and t.route is not None and t.route.model == "big" for t in e.turns)
        assert e.cost["model_usd"] == pytest.approx(0.01 * len(e.turns))
        assert e.cost["turns:big"] == len(e.turns)
    assert summary["cost/model_usd"] == pytest.approx(sum(e.cost["model_usd"] for e in routed) / 4)
    # Each model alone on the same items, and the plane they span.
    alone = {e.group_id.split("/")[0] for e in episodes} - {"eval"}
    assert alone == {"eval-always-small", "eval-always-big"}
    plane = json.loads((tmp_path / "big" / "eval.frontier.json").read_text())
    assert set(plane["summaries"]) == {"router (fixed)", "always small", "always big"}
    big = plane["summaries"]["always big"]
    assert big["success"] == 1.0
    assert big["cost/model_usd"] == pytest.approx(summary["cost/model_usd"])


def test_a_budget_too_small_for_the_expensive_model_refuses_its_turns(tmp_path: Path) -> None:
    config = _config(
        tmp_path / "poor",
        {"kind": "fixed", "model": "big"},
        **{"eval.n_items": 2, "budget.max_cost": {"model_usd": 0.015}},
    )
    summary = run_eval(config, Console(width=120, record=True), None)  # type: ignore[arg-type]
    with RunStore.open_readonly(tmp_path / "poor") as store:
        episodes = [e for e in store.episodes() if e.group_id.startswith("eval/")]
    # One oracle turn fits ($0.01), the second ($0.02 in all) is refused: no answer.
    assert summary["success"] == 0.0
    assert all(e.stop_reason == "budget_exhausted" and len(e.turns) == 1 for e in episodes)


def test_a_routed_training_run_trains_the_trained_policy(tmp_path: Path) -> None:
    config = _config(tmp_path / "train", {"kind": "delegate", "to": "big"})
    out = run_train(config, Console(width=120, record=True), with_eval=False)  # type: ignore[arg-type]
    assert len(out["rows"]) == 1
    with RunStore.open_readonly(tmp_path / "train") as store:
        train = [e for e in store.episodes() if e.step >= 0]
    assert train
    for e in train:
        for t in e.turns:
            assert t.route is not None and t.route.router == "delegate"
            # A turn after a delegate call is the oracle's, never trained.
            assert (t.advantage is None) == t.foreign
        # The tiny model's turns are priced per output token.
        own = sum(len(t.completion_ids) for t in e.turns if not t.foreign)
        big = sum(t.foreign for t in e.turns)
        assert e.cost["model_usd"] == pytest.approx(own * 100 / 1e6 + 0.01 * big)


@pytest.mark.parametrize("kind", ["learned", "bandit"])
def test_a_learned_router_logs_its_propensities_and_learns_each_step(
    tmp_path: Path, kind: str
) -> None:
    run_dir = tmp_path / kind
    config = _config(run_dir, {"kind": kind}, **{"train.steps": 2, "eval.n_items": 2})
    out = run_train(config, Console(width=120, record=True), with_eval=True)  # type: ignore[arg-type]
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
        rows = store.metrics()
    train = [e for e in episodes if e.step >= 0]
    evals = [e for e in episodes if e.group_id.startswith("eval-after/")]
    assert len(train) == 2 * 2 * 2 and len(evals) == 2
    # Every decision is logged with its propensity; exploration never gives a model 0.
    decisions = (
        [t.route for e in train for t in e.turns] if kind == "learned" else [e.route for e in train]
    )
    assert decisions and all(d is not None and d.router == kind for d in decisions)
    for d in decisions:
        assert d is not None and set(d.probabilities) == {"small", "big"}
        assert 0 < d.propensity == d.probabilities[d.model] < 1
        assert sum(d.probabilities.values()) == pytest.approx(1.0)
    if kind == "bandit":
        # One model runs the whole episode.
        assert all(
            {t.route.model for t in e.turns if t.route} <= {e.route.model} for e in train if e.route
        )
    # Each step's decisions (of episodes whose reward means something) reached the router.
    for step, row in enumerate(rows):
        mine = [e for e in train if e.step == step and scored(e)]
        n = sum(len(e.turns) for e in mine) if kind == "learned" else len(mine)
        assert row["router_decisions"] == n
    # Evaluation picks greedily.
    greedy = (
        [t.route for e in evals for t in e.turns] if kind == "learned" else [e.route for e in evals]
    )
    assert all(g is not None and g.propensity == 1.0 for g in greedy)
    assert len(out["rows"]) == 2


def test_eval_of_a_bandit_router_sets_its_off_policy_estimates_beside_its_value(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "bandit"
    config = _config(
        run_dir,
        {"kind": "bandit", "exploration": {"kind": "epsilon_greedy", "epsilon": 0.5}},
        **{"eval.n_items": 4},
    )
    run_train(config, Console(width=120, record=True), with_eval=False)  # type: ignore[arg-type]
    console = Console(width=160, record=True)
    run_eval(config, console, None)  # type: ignore[arg-type]
    assert "refitted on" in console.export_text()
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
    explored = [e for e in episodes if e.group_id.startswith("eval-explore/")]
    greedy = [e for e in episodes if e.group_id.startswith("eval/")]
    assert len(explored) == len(greedy) == 4
    assert {e.task_id for e in explored} == {e.task_id for e in greedy}
    assert all(e.route is not None and e.route.propensity == 1.0 for e in greedy)
    assert all(e.route is not None and 0 < e.route.propensity < 1 for e in explored)
    ope = json.loads((run_dir / "eval.ope.json").read_text())
    assert set(ope) == {"on_policy", "ips", "snips", "dr"}
    assert ope["on_policy"]["n"] == 4
    for name in ("ips", "snips", "dr"):
        assert ope[name]["low"] <= ope[name]["value"] <= ope[name]["high"]
