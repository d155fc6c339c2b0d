"""Config files: examples validate, round-trip through YAML, and bad ones name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnrl.config import ConfigError, RunConfig, load_config

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
