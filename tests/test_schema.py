"""Stored records keep loading across layout changes.

The run folders in `tests/fixtures/runs/` were written by turnrl before `Episode` records had
a schema version (version 1: `Turn.signals` a dict of floats, the initial gold probability and
the bootstrap value on the first and last turns, `rewards: {weights: ...}`): `v0_a` trains with
GiGPO and every reward component (gold probabilities, `gold_seen`), `v0_b` with GAE and a
value head (values), `v0_c` is an oracle evaluation of the embodied suite (tool calls, results,
cost vectors). Regression lock: do not regenerate these fixtures with newer code; add new ones
beside them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from turnrl.agent.records import SCHEMA_VERSION, Episode, upgrade_episode
from turnrl.agent.store import RunStore
from turnrl.replay import load_run, replay

FIXTURES = Path(__file__).parent / "fixtures" / "runs"


def _episodes(name: str) -> list[Episode]:
    with RunStore.open_readonly(FIXTURES / name) as store:
        return list(store.episodes())


def test_version_1_signals_become_typed_fields() -> None:
    trained = [e for e in _episodes("v0_a") if e.step >= 0]
    assert trained and all(e.schema_version == SCHEMA_VERSION for e in trained)
    for e in trained:
        assert e.gold_prob_initial is not None and 0.0 < e.gold_prob_initial <= 1.0
        assert all(t.signals.gold_prob is not None for t in e.turns)
        assert all(t.signals.gold_seen is False for t in e.turns)  # the tiny model finds nothing
        assert all(t.signals.value is None for t in e.turns)
    valued = [e for e in _episodes("v0_b") if e.step >= 0]
    assert valued and all(e.value_after is not None for e in valued)
    assert all(t.signals.value is not None for e in valued for t in e.turns)
    oracle = _episodes("v0_c")
    assert oracle and all(e.turns[0].tool_results and e.cost for e in oracle)


def test_upgrade_is_exact_on_what_it_moves() -> None:
    raw = {
        "episode_id": "e",
        "task_id": "t",
        "group_id": "g",
        "stop_reason": "max_turns",
        "turns": [
            {"signals": {"gold_prob_initial": 0.25, "gold_prob": 0.5, "gold_seen": 1.0}},
            {"signals": {"gold_prob": 0.75, "value": -0.5, "value_after": 0.125}},
        ],
    }
    up = upgrade_episode(raw)
    assert up["gold_prob_initial"] == 0.25 and up["value_after"] == 0.125
    assert up["turns"][0]["signals"] == {"gold_prob": 0.5, "gold_seen": True}
    assert up["turns"][1]["signals"] == {"gold_prob": 0.75, "value": -0.5}
    assert up["schema_version"] == SCHEMA_VERSION
    assert upgrade_episode(up) is up
    with pytest.raises(ValueError, match="unknown record schema version 99"):
        upgrade_episode({**raw, "schema_version": 99})
    with pytest.raises(ValueError, match=r"version-1 signals \['mystery'\]"):
        upgrade_episode({**raw, "turns": [{"signals": {"mystery": 1.0}}]})


def test_current_records_round_trip_through_the_store(tmp_path: Path) -> None:
    episodes = _episodes("v0_b")
    with RunStore(tmp_path / "run") as store:
        for e in episodes:
            store.append_episode(e)
    again = _episodes_at(tmp_path / "run")
    assert again == episodes
    payload = (tmp_path / "run" / "episodes.rec").read_bytes()
    assert b'"schema_version":2}' in payload and b'"value_after"' in payload


def _episodes_at(run_dir: Path) -> list[Episode]:
    with RunStore.open_readonly(run_dir) as store:
        return list(store.episodes())


@pytest.mark.parametrize("name", ["v0_a", "v0_b", "v0_c"])
def test_runs_written_before_the_schema_version_replay_with_no_difference(
    name: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / name
    shutil.copytree(FIXTURES / name, run_dir)
    config, episodes = load_run(run_dir)
    out = replay(run_dir)
    assert out["episodes"] == len(episodes)
    assert out["advantages_differing"] == 0 and out["grades_differing"] == 0
    if name != "v0_c":
        assert out["turns_compared"] > 0
    # The weights-form reward config still means what it meant: its `outcome_metric` (f1 by
    # default there) is the outcome's metric.
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())["rewards"]
    assert config.rewards.outcome().metric == stored.get("outcome_metric", "f1")
