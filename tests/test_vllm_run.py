"""`model.kind: vllm` end to end against the fake server (`fake_vllm.py`, in a thread of its
own): `turnrl train` samples every turn on the server, stores the ids the server sent, writes
the learner's weights into the run after each step and pushes them (full reload or a LoRA
adapter per version), and later turns carry the new version. The real server is exercised in
`test_vllm_real.py`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_vllm import FakeVLLM, alternating_server
from rich.console import Console

from turnrl.agent.store import RunStore
from turnrl.config import RunConfig, load_config
from turnrl.train import run_eval, run_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake() -> Iterator[FakeVLLM]:
    """A fake server whose replies alternate between a well-formed answer and text without one
    (so a group's format rewards differ and the learner takes a real step)."""
    with alternating_server() as server:
        yield server


def config(run_dir: Path, url: str, sync: str) -> RunConfig:
    overrides: dict[str, object] = {
        "run_dir": str(run_dir),
        "model": {"kind": "vllm", "weights": {"kind": "tiny"}, "url": url, "weight_sync": sync},
        "train.steps": 2,
        "sampling.temperature": 1.0,
    }
    if sync == "reload":
        overrides["learner.adaptation"] = {"kind": "full"}
    return load_config(ROOT / "examples" / "tiny.yaml", overrides)


@pytest.mark.parametrize("sync", ["reload", "lora"])
def test_train_samples_on_the_server_and_pushes_each_version(
    fake: FakeVLLM, tmp_path: Path, sync: str
) -> None:
    run_dir = tmp_path / "run"
    cfg = config(run_dir, fake.url, sync)
    out = run_train(cfg, Console(width=120, record=True), with_eval=False)
    assert len(out["rows"]) == 2
    with RunStore.open_readonly(run_dir) as store:
        train = [e for e in store.episodes() if e.step >= 0]
    # Tokens are the truth: every stored turn is exactly a reply the server sent.
    replies = {tuple(ids): lps for ids, lps in fake.replies}
    for e in train:
        for t in e.turns:
            assert tuple(t.completion_ids) in replies
            assert t.completion_logprobs == replies[tuple(t.completion_ids)]
    # Step 0 trained (the alternating replies make a group's rewards differ), so version 1
    # went to the server before step 1's rollouts, and step 1's turns carry it.
    assert {t.policy_version for e in train if e.step == 0 for t in e.turns} == {0}
    assert {t.policy_version for e in train if e.step == 1 for t in e.turns} == {1}
    last = max(t.policy_version for e in train for t in e.turns)
    with RunStore.open_readonly(run_dir) as store:
        versions = [int(m["policy_version"]) for m in store.metrics()]
    newest = max(versions)
    assert newest >= last >= 1
    if sync == "reload":
        assert fake.weights == str(run_dir / "vllm_weights" / f"v{newest}")
        assert (run_dir / "vllm_weights" / f"v{newest}" / "model.safetensors").is_file()
        assert fake.log.count("POST /pause") == fake.log.count("POST /resume") == newest
    else:
        assert set(fake.adapters) <= {f"turnrl-v{v}" for v in range(1, newest + 1)}
        assert f"turnrl-v{newest}" in fake.adapters
        assert "POST /pause" not in fake.log
        assert all(c["model"] == "turnrl-v1" for c in fake.completions[-4:])
    written = sorted(int(p.name[1:]) for p in (run_dir / "vllm_weights").iterdir())
    assert written == list(range(max(1, newest - 1), newest + 1))


def test_eval_runs_on_the_server_and_a_dead_url_is_a_clear_error(
    fake: FakeVLLM, tmp_path: Path
) -> None:
    cfg = config(tmp_path / "eval", fake.url, "reload")
    summary = run_eval(cfg, Console(width=120, record=True), None)
    assert summary["episodes"] == 2 and len(fake.completions) >= 2
    dead = config(tmp_path / "dead", "http://127.0.0.1:9", "reload")
    with pytest.raises(ConnectionError, match=r"model\.url"):
        run_eval(dead, Console(width=120, record=True), None)


def test_eval_starts_the_server_for_the_run_and_stops_it(tmp_path: Path) -> None:
    """Without `model.url` turnrl starts the server (here a stand-in interpreter serving the
    fake), logs it into the run folder, samples on it, and leaves no process of it behind."""
    from test_vllm_server import WRAPPER

    python = tmp_path / "fake-vllm-python"
    python.write_text(WRAPPER.format(python=sys.executable, tests=str(ROOT / "tests")))
    python.chmod(0o755)
    run_dir = tmp_path / "run"
    model = {"kind": "vllm", "weights": {"kind": "tiny"}, "server": {"python": str(python)}}
    cfg = load_config(ROOT / "examples" / "tiny.yaml", {"run_dir": str(run_dir), "model": model})
    summary = run_eval(cfg, Console(width=120, record=True), None)
    assert summary["episodes"] == 2
    log = (run_dir / "vllm.log").read_text()
    assert "--served-model-name turnrl" in log and "--logprobs-mode raw_logprobs" in log
    assert "fake vllm starting" in log
    assert not _tagged_fakes(python), "a server outlived its run"


def _tagged_fakes(python: Path) -> list[int]:
    """Live processes running the stand-in interpreter."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(python).encode() in cmd and state != "Z":
            found.append(int(entry.name))
    return found


def test_configs_the_server_cannot_score_are_refused() -> None:
    """Raw logprobs score temperature 1 only; processed ones are cut by top-p; LoRA sync needs
    LoRA adapters and no warm start. Each is refused at load, naming the field."""
    from turnrl.config import ConfigError

    example = ROOT / "examples" / "vllm.yaml"
    cases = {
        "sampling.temperature 0.7": {"model.logprobs_mode": "raw_logprobs"},
        "sampling.top_p: 1": {"sampling.top_p": 0.9},
        "learner.adaptation": {"model.weight_sync": "lora"},
        "cannot carry a warm start": {
            "model.weight_sync": "lora",
            "learner.adaptation": {"kind": "lora"},
        },
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(example, overrides)
    load_config(
        example,
        {"model.weight_sync": "lora", "learner.adaptation": {"kind": "lora"}, "warm_start": None},
    )
