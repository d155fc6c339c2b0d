"""Fault suite: a weight sync that fails or hangs (issue 15, item 4).

A sync pushes the learner's weights to the vLLM server (`VLLMPolicy.load_checkpoint`): a full
reload (`/pause` -> `/collective_rpc reload_weights` -> `/reset_prefix_cache` -> `/resume`) or
a LoRA load (`/v1/load_lora_adapter`). Runs that hang forever at this point are a known failure
of RL trainers (TRL #6797, #7103; slime #1484). Here the fake server fails (HTTP 500) or
never answers one sync call, and:

- the policy raises `WeightSyncError` naming the version, the call and the cause, within
  `sync_timeout_s` of the hung call, and leaves the server resumed and its live weights or
  adapter as they were;
- through `turnrl train` (the fake at `model.url`, in a thread): the run stops with that
  error within `model.sync_timeout_s` plus a small margin, the episodes stored up to the
  failure are all there and intact, and the server is left serving (not paused);
- when turnrl started the server itself (a stand-in interpreter running `fake_vllm.py` with a
  hung reload), the run stops within the timeout and no process of the server is left.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_vllm import (
    FakeVLLM,
    Fault,
    alternating_server,
    default_rule,
    parse_path_fault,
)
from rich.console import Console

from turnrl.agent.policy import PolicyError, SamplingParams
from turnrl.agent.records import StopReason
from turnrl.agent.store import RecordFile, RunStore
from turnrl.agent.vllm_policy import VLLMPolicy, WeightSyncError
from turnrl.config import RunConfig, load_config
from turnrl.train import run_train

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PROMPT = [5, 6, 7, 10]
SYNC_TIMEOUT_S = 2.0
"""`sync_timeout_s` of every test here."""
MARGIN_S = 5.0
"""Allowed past the timeout: the `/resume` after a failed reload and the run's teardown
(closing connections and the store), on a loaded two-core machine."""

HANG = Fault("hold")
FAIL = Fault("status", status=500)


def serve(test: Any, **policy_kwargs: Any) -> FakeVLLM:
    """Run `test(server, policy)` against a fresh fake; returns the server."""

    async def main() -> FakeVLLM:
        async with FakeVLLM() as server:
            kwargs = {"sync_timeout_s": SYNC_TIMEOUT_S, **policy_kwargs}
            async with VLLMPolicy(server.url, server.model, **kwargs) as policy:
                async with asyncio.timeout(60):  # a hang fails the test
                    await test(server, policy)
        return server

    return asyncio.run(main())


async def timed_failure(policy: VLLMPolicy, folder: str, version: int) -> tuple[str, float]:
    """The message of the `WeightSyncError` an update raises, and how long it took."""
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError) as info:
        await policy.update_weights(folder, version)
    return str(info.value), time.monotonic() - t0


# -- the policy -------------------------------------------------------------------------------


def test_a_hung_reload_is_given_up_after_the_timeout_and_the_server_resumed() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject_path("/collective_rpc", HANG)
        message, took = await timed_failure(policy, "/ckpt/1", 1)
        assert SYNC_TIMEOUT_S <= took < SYNC_TIMEOUT_S + MARGIN_S
        assert "version 1" in message and "POST /collective_rpc" in message
        assert f"no response within {SYNC_TIMEOUT_S:g} s" in message
        assert server.log.count("POST /resume") == 1 and not server.paused
        assert server.weights == "base" and policy.version == 0
        # The reload may still land: nothing is sampled until a later one succeeds.
        with pytest.raises(PolicyError, match="weights are unknown"):
            await policy.generate(PROMPT, SamplingParams())
        await policy.update_weights("/ckpt/2", 2)
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.policy_version == 2 and server.weights == "/ckpt/2"

    serve(test)


def test_a_hung_pause_is_followed_by_resume_and_sampling_goes_on() -> None:
    """A `/pause` that timed out may still reach the server: `/resume` follows it. No reload
    was sent, so the old weights stay live."""

    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject_path("/pause", HANG)
        message, took = await timed_failure(policy, "/ckpt/1", 1)
        assert SYNC_TIMEOUT_S <= took < SYNC_TIMEOUT_S + MARGIN_S
        assert "POST /pause" in message and "version 1" in message
        assert "POST /collective_rpc" not in server.log and "POST /resume" in server.log
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.policy_version == 0 and c.token_ids == tuple(default_rule(PROMPT, "base"))

    serve(test)


def test_a_refused_pause_is_not_followed_by_resume() -> None:
    """A server that answers `/pause` with an error did not pause: nothing else is sent and
    the old weights stay live."""

    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject_path("/pause", FAIL)
        message, _ = await timed_failure(policy, "/ckpt/1", 1)
        assert "POST /pause: HTTP 500" in message and "then" not in message
        assert [x for x in server.log if x != "POST /v1/completions"] == ["POST /pause"]
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.policy_version == 0 and c.token_ids == tuple(default_rule(PROMPT, "base"))

    serve(test)


def test_a_failed_resume_after_a_failed_reload_reports_both() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject_path("/collective_rpc", FAIL)
        server.inject_path("/resume", HANG)
        message, took = await timed_failure(policy, "/ckpt/1", 1)
        assert SYNC_TIMEOUT_S <= took < SYNC_TIMEOUT_S + MARGIN_S
        first, _, then = message.partition("; then ")
        assert "POST /collective_rpc: HTTP 500" in first
        assert "POST /resume: no response" in then and "may still be paused" in then

    serve(test)


@pytest.mark.parametrize("fault", [FAIL, HANG], ids=["fails", "hangs"])
def test_a_lora_load_that_fails_or_hangs_keeps_the_live_adapter(fault: Fault) -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        await policy.update_weights("/lora/1", 1)
        server.inject_path("/v1/load_lora_adapter", fault)
        message, took = await timed_failure(policy, "/lora/2", 2)
        assert took < SYNC_TIMEOUT_S + MARGIN_S
        assert "version 2" in message and "POST /v1/load_lora_adapter" in message
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.policy_version == 1 and server.completions[-1]["model"] == "turnrl-v1"

    serve(test, weight_sync="lora")


def test_a_dropped_sync_call_is_resent_once() -> None:
    """Sync calls are idempotent (pausing, reloading one folder, resuming): a connection lost
    before any answer is retried once on a new one, and the sync succeeds."""

    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject_path("/collective_rpc", Fault("drop"))
        await policy.update_weights("/ckpt/1", 1)
        assert server.log.count("POST /collective_rpc") == 2 and server.weights == "/ckpt/1"

    serve(test)


def test_path_faults_parse_from_the_command_line() -> None:
    path, fault, nth = parse_path_fault("/collective_rpc=hold@1")
    assert (path, fault.kind, nth) == ("/collective_rpc", "hold", 1)
    path, fault, nth = parse_path_fault("/v1/load_lora_adapter=status:503")
    assert (path, fault.kind, fault.status, nth) == ("/v1/load_lora_adapter", "status", 503, 0)


# -- through turnrl train ---------------------------------------------------------------------

SYNC_PATH = {"reload": "/collective_rpc", "lora": "/v1/load_lora_adapter"}


@pytest.fixture
def fake() -> Iterator[FakeVLLM]:
    """A fake whose replies alternate between an answer and text without one, so that every
    step trains and pushes a new version."""
    with alternating_server() as server:
        yield server


def train_config(
    run_dir: Path,
    model: dict[str, Any],
    steps: int,
    mode: str = "sync",
    extra: dict[str, Any] | None = None,
) -> RunConfig:
    sync = model.get("weight_sync", "reload")
    overrides: dict[str, Any] = {
        **(extra or {}),
        "run_dir": str(run_dir),
        "model": {"kind": "vllm", "weights": {"kind": "tiny"}, **model},
        "train": {"steps": steps, "tasks_per_step": 2, "group_size": 4, "mode": mode},
        "sampling.temperature": 1.0,
    }
    if sync == "reload":
        overrides["learner.adaptation"] = {"kind": "full"}
    return load_config(ROOT / "examples" / "tiny.yaml", overrides)


def stored_intact(run_dir: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """The run's episodes and metrics; asserts no record file has a torn or corrupt tail
    (a writer's open truncates a torn tail and reports it; corruption raises)."""
    for name in (RunStore.EPISODES, RunStore.METRICS, RunStore.ROLLOUTS):
        with RecordFile(run_dir / name) as f:
            assert f.dropped_bytes == 0, name
    with RunStore.open_readonly(run_dir) as store:
        return list(store.episodes()), list(store.metrics())


@pytest.mark.parametrize(
    ("sync", "fault", "mode"),
    [
        ("reload", FAIL, "sync"),
        ("reload", HANG, "sync"),
        ("lora", HANG, "sync"),
        ("reload", HANG, "async"),
        ("lora", HANG, "async"),
    ],
    ids=[
        "reload-fails",
        "reload-hangs",
        "lora-hangs",
        "reload-hangs-async",
        "lora-hangs-async",
    ],
)
def test_train_stops_with_a_clear_error_when_a_sync_fails_or_hangs(
    fake: FakeVLLM, tmp_path: Path, sync: str, fault: Fault, mode: str
) -> None:
    """The second sync (version 2, after step 1) fails or hangs (a refused LoRA load is the
    same path as a hung one past the policy, tested above): the run stops there with the
    error, within the timeout; steps 0 and 1 are stored whole; the server still serves
    version 1's weights (or adapter) and is not paused. In `async` mode step 2's rollouts
    may be under way (journaled, not stored): the run stops all the same."""
    path = SYNC_PATH[sync]
    fake.inject_path(path, fault, nth=1)
    run_dir = tmp_path / "run"
    model = {"url": fake.url, "weight_sync": sync, "sync_timeout_s": SYNC_TIMEOUT_S}
    cfg = train_config(run_dir, model, steps=4, mode=mode)
    with pytest.raises(WeightSyncError) as info:
        run_train(cfg, Console(width=120, record=True), with_eval=False)
    stopped = time.monotonic()
    message = str(info.value)
    assert f"({sync}) of version 2" in message and f"POST {path}" in message
    assert str(run_dir / "vllm_weights" / "v2") in message
    took = stopped - fake.arrived_at[path]
    if fault is HANG:
        assert SYNC_TIMEOUT_S <= took < SYNC_TIMEOUT_S + MARGIN_S, took
        assert f"no response within {SYNC_TIMEOUT_S:g} s" in message
    else:
        assert "HTTP 500" in message
    # The episodes of steps 0 and 1 are stored, whole and once; step 1's metrics are not
    # (the step did not finish), and nothing after it ran.
    episodes, metrics = stored_intact(run_dir)
    assert sorted(e.step for e in episodes) == [0] * 8 + [1] * 8
    assert len({e.episode_id for e in episodes}) == 16
    assert all(e.stop_reason != StopReason.POLICY_ERROR for e in episodes)
    assert [(m["step"], m["policy_version"]) for m in metrics] == [(0.0, 1.0)]
    # The server serves version 1 and is not paused.
    v1 = str(run_dir / "vllm_weights" / "v1")
    assert not fake.paused
    if sync == "reload":
        assert fake.weights == v1
        assert fake.log.count("POST /pause") == fake.log.count("POST /resume") == 2
    else:
        assert fake.adapters == {"turnrl-v1": v1}
    stored_turns = sum(len(e.turns) for e in episodes)
    if mode == "sync":
        assert len(fake.completions) == stored_turns
    print(f"\n{mode} {sync} {fault.kind}: stopped {took:.2f} s after the call was sent: {message}")


def test_train_with_its_own_server_stops_and_leaves_no_process(tmp_path: Path) -> None:
    """turnrl starts the server (a stand-in interpreter serving the fake, whose first reload
    never answers): the run stops within the timeout and the server's process is gone."""
    python = tmp_path / "fake-vllm-python"
    tag = f"--fake-tag={tmp_path}"  # ignored by the fake: finds its process afterwards
    python.write_text(
        f"#!/bin/sh\nexec {sys.executable} {TESTS / 'fake_vllm.py'} {tag} "
        '--path-fault /collective_rpc=hold "$@"\n'
    )
    python.chmod(0o755)
    run_dir = tmp_path / "run"
    model = {"sync_timeout_s": SYNC_TIMEOUT_S, "server": {"python": str(python)}}
    # The fake's default replies give a group equal rewards: a KL term makes the step real.
    cfg = train_config(run_dir, model, steps=2, extra={"learner.kl_coef": 0.01})
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"version 1 .*POST /collective_rpc: no response"):
        run_train(cfg, Console(width=120, record=True), with_eval=False)
    took = time.monotonic() - t0
    assert took < 120, "the run did not stop near its sync timeout"
    print(f"\nown server, hung reload: the whole run took {took:.1f} s")
    assert not live_processes(tag), "the server outlived its run"
    assert "port" in (run_dir / "vllm.log").read_text()
    episodes, metrics = stored_intact(run_dir)
    assert sorted(e.step for e in episodes) == [0] * 8 and metrics == []


def live_processes(tag: str) -> list[int]:
    """Live processes whose command line carries `tag`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if tag.encode() in cmd.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def test_the_cli_says_how_to_go_on_after_a_failed_sync_and_resume_finishes(
    fake: FakeVLLM, tmp_path: Path
) -> None:
    """`turnrl train` reports a failed weight sync in one block with the way on (`--resume`),
    and the resumed run finishes once the server answers again."""
    from typer.testing import CliRunner

    from turnrl.cli import app

    fake.inject_path(SYNC_PATH["reload"], FAIL, nth=1)
    run_dir = tmp_path / "run"
    model = {"url": fake.url, "weight_sync": "reload", "sync_timeout_s": SYNC_TIMEOUT_S}
    config = tmp_path / "run.yaml"
    config.write_text(train_config(run_dir, model, steps=3).to_yaml())
    runner = CliRunner()
    failed = runner.invoke(app, ["train", str(config), "--no-eval"])
    assert failed.exit_code == 1, failed.output
    assert "weight sync (reload) of version 2" in failed.output
    assert "after RL step 1" in failed.output and "--resume" in failed.output
    assert "Traceback" not in failed.output
    resumed = runner.invoke(app, ["train", str(config), "--no-eval", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    episodes, metrics = stored_intact(run_dir)
    assert [m["step"] for m in metrics] == [0.0, 1.0, 2.0]
    assert len({e.episode_id for e in episodes}) == len(episodes) == 3 * 8
