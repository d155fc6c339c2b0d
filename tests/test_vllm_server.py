"""`start_server` and `reap_servers` on real processes: the "vLLM interpreter" is a small
script that answers `python -m vllm.entrypoints.openai.api_server ...` by serving the fake
server (`fake_vllm`) on the requested port, or by misbehaving as its `--fake-mode` says."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_vllm import VOCAB, default_rule, logprob_of

from turnrl.agent.policy import SamplingParams
from turnrl.agent.vllm_policy import PolicyUnavailableError, VLLMPolicy
from turnrl.agent.vllm_server import (
    RUN_ENV,
    ServerStartError,
    VLLMServer,
    VLLMServerConfig,
    group_members,
    reap_servers,
    server_command,
    start_server,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

WRAPPER = """\
#!{python}
import argparse, asyncio, json, os, subprocess, sys, time
sys.path.insert(0, {tests!r})
import fake_vllm

ap = argparse.ArgumentParser()
ap.add_argument("-m")
ap.add_argument("--port", type=int)
ap.add_argument("--served-model-name")
ap.add_argument("--fake-mode", default="serve")
ap.add_argument("--fake-dump")
args, _ = ap.parse_known_args()
if args.fake_dump:
    with open(args.fake_dump, "w") as f:
        json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, f)
print(f"fake vllm starting on port {{args.port}}", flush=True)
if args.fake_mode == "exit3":
    print("RuntimeError: no model here", file=sys.stderr, flush=True)
    sys.exit(3)
if args.fake_mode.startswith("busy-once:") and not os.path.exists(args.fake_mode[10:]):
    open(args.fake_mode[10:], "w").close()  # as if another process took the port first
    print("OSError: [Errno 98] error while attempting to bind: address already in use")
    sys.exit(1)
if args.fake_mode == "child":  # a worker in the same process group, like vLLM's engine core
    subprocess.Popen(["sleep", "600"])
if args.fake_mode == "hang":  # never listens, ignores SIGTERM
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


class Server(fake_vllm.FakeVLLM):
    async def _route(self, method, path, body, writer):
        if method == "GET" and path == "/v1/models":
            fake_vllm._send(writer, 200, {{"object": "list", "data": [{{"id": self.model}}]}})
            return True
        return await super()._route(method, path, body, writer)


async def main():
    await Server(model=args.served_model_name, port=args.port).start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """An executable standing in for the vLLM virtualenv's interpreter."""
    path = tmp_path / "fake-vllm-python"
    path.write_text(WRAPPER.format(python=sys.executable, tests=str(TESTS)))
    path.chmod(0o755)
    return path


def config(python: Path, *extra: str, **kwargs: object) -> VLLMServerConfig:
    return VLLMServerConfig.model_validate({"python": python, "extra_args": extra, **kwargs})


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def group_gone(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_start_generate_stop_leaves_nothing(fake_python: Path, tmp_path: Path) -> None:
    log = tmp_path / "run" / "vllm.log"

    async def main() -> VLLMServer:
        async with await start_server(tmp_path, "tiny", config(fake_python), log) as server:
            assert server.alive() and server.url == f"http://127.0.0.1:{server.port}"
            async with VLLMPolicy(server.url, "tiny", vocab_size=VOCAB) as policy:
                c = await policy.generate([5, 6, 7, 10], SamplingParams(max_tokens=16, seed=1))
            ids = default_rule([5, 6, 7, 10], "base")
            assert c.token_ids == tuple(ids)
            assert c.logprobs == tuple(logprob_of(t, i) for i, t in enumerate(ids))
        assert not server.alive()
        await server.stop()  # idempotent
        return server

    server = asyncio.run(main())
    group_gone(server.pgid)
    assert server.process.returncode is not None
    text = log.read_text()
    assert "# turnrl: starting" in text and "-m vllm.entrypoints.openai.api_server" in text
    assert f"fake vllm starting on port {server.port}" in text  # the server's own output


def test_command_line_and_environment(
    fake_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dump = tmp_path / "dump.json"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.setenv("TURNRL_SECRET_TOKEN", "must-not-leak")
    cfg = config(
        fake_python,
        "--fake-dump",
        str(dump),
        enable_lora=True,
        max_lora_rank=16,
        kv_cache_gb=3,
        max_model_len=512,
        seed=7,
        logprobs_mode="processed_logprobs",
        extra_env={"OMP_NUM_THREADS": "1"},
    )

    async def main() -> None:
        server = await start_server(tmp_path / "m", "tiny", cfg, tmp_path / "log", run_id="abc123")
        await server.stop()

    asyncio.run(main())
    seen = json.loads(dump.read_text())
    argv, env = seen["argv"], seen["env"]
    port = argv[argv.index("--port") + 1]
    assert argv == [
        *("-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "m")),
        *("--served-model-name", "tiny", "--host", "127.0.0.1", "--port", port),
        *("--dtype", "float32", "--enforce-eager", "--enable-lora", "--max-lora-rank", "16"),
        *("--logprobs-mode", "processed_logprobs", "--max-model-len", "512", "--seed", "7"),
        *("--no-enable-chunked-prefill", "--max-num-batched-tokens", "512"),
        *("--fake-dump", str(dump)),
    ]
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG" and env["OMP_NUM_THREADS"] == "1"
    assert env[RUN_ENV] == "abc123" and env["PATH"] == os.environ["PATH"]
    assert "TURNRL_SECRET_TOKEN" not in env  # only the listed variables are inherited


def test_defaults_leave_lora_off() -> None:
    cfg = VLLMServerConfig()
    assert (cfg.dtype, cfg.kv_cache_gb, cfg.enforce_eager, cfg.enable_lora) == (
        "float32",
        2,
        True,
        False,
    )
    with pytest.raises(ValueError, match="enable_lora"):
        VLLMServerConfig(max_lora_rank=8)
    with pytest.raises(ValueError, match="extra"):
        VLLMServerConfig.model_validate({"dtpye": "float16"})


def test_missing_interpreter_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TURNRL_VLLM_PYTHON", raising=False)
    with pytest.raises(ServerStartError, match=r"\.venv-vllm/bin/python.*TURNRL_VLLM_PYTHON"):
        asyncio.run(start_server(tmp_path, "m", VLLMServerConfig(), tmp_path / "log"))
    monkeypatch.setenv("TURNRL_VLLM_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(ServerStartError, match=r"nope \(\$TURNRL_VLLM_PYTHON\)"):
        VLLMServerConfig().interpreter()


def test_server_that_exits_at_once_raises_with_its_log(fake_python: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with pytest.raises(ServerStartError) as info:
        asyncio.run(start_server(tmp_path, "m", config(fake_python, "--fake-mode", "exit3"), log))
    assert "exited with status 3" in str(info.value)
    assert "RuntimeError: no model here" in info.value.log_tail
    assert "RuntimeError: no model here" in log.read_text()


def test_server_never_healthy_times_out_and_its_group_is_killed(
    fake_python: Path, tmp_path: Path
) -> None:
    cfg = config(fake_python, "--fake-mode", "hang", startup_timeout_s=3)
    with pytest.raises(ServerStartError, match="not healthy after 3 s") as info:
        asyncio.run(start_server(tmp_path, "m", cfg, tmp_path / "log"))
    assert "fake vllm starting" in info.value.log_tail
    assert leftovers(tmp_path) == []


def leftovers(model_dir: Path) -> list[int]:
    """Live fake servers started for `model_dir` (each test has its own)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(model_dir).encode() in argv and not dead(int(entry)):
            found.append(int(entry))
    return found


def test_a_port_taken_meanwhile_is_retried_once_on_another(
    fake_python: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    cfg = config(fake_python, "--fake-mode", f"busy-once:{tmp_path / 'taken'}")

    async def main() -> None:
        async with await start_server(tmp_path, "m", cfg, log) as server:
            assert server.alive()

    asyncio.run(main())
    assert log.read_text().count("# turnrl: starting") == 2


def test_a_given_port_in_use_is_not_retried(fake_python: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerStartError, match="exited with status"):
            asyncio.run(start_server(tmp_path, "m", config(fake_python), log, port=port))
    assert log.read_text().count("# turnrl: starting") == 1
    assert "address already in use" in log.read_text().lower()


def test_stop_kills_the_servers_workers_too(fake_python: Path, tmp_path: Path) -> None:
    async def main() -> int:
        server = await start_server(
            tmp_path, "m", config(fake_python, "--fake-mode", "child"), tmp_path / "log"
        )
        assert len(group_members(server.pgid)) == 2  # the server and its `sleep` worker
        await server.stop()
        return server.pgid

    pgid = asyncio.run(main())
    assert group_members(pgid) == []


def test_wrong_served_name_is_a_start_error(fake_python: Path, tmp_path: Path) -> None:
    # the wrapper serves the name it is given; an extra --served-model-name overrides it
    cfg = config(fake_python, "--served-model-name", "other")
    with pytest.raises(ServerStartError, match=r"serves \['other'\], not 'tiny'"):
        asyncio.run(start_server(tmp_path, "tiny", cfg, tmp_path / "log"))
    assert leftovers(tmp_path) == []


def test_server_dying_mid_run_makes_the_policy_unavailable(
    fake_python: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        server = await start_server(tmp_path, "m", config(fake_python), tmp_path / "log")
        async with server, VLLMPolicy(server.url, "m", vocab_size=VOCAB) as policy:
            os.killpg(server.pgid, signal.SIGKILL)
            await server.process.wait()
            assert not server.alive()
            with pytest.raises(PolicyUnavailableError):
                await policy.generate([5, 6], SamplingParams(max_tokens=4))

    asyncio.run(main())


CHILD = """\
import asyncio, sys, time
from pathlib import Path
from turnrl.agent.vllm_server import VLLMServerConfig, start_server

async def main():
    cfg = VLLMServerConfig(python=Path(sys.argv[1]))
    server = await start_server(Path(sys.argv[2]), "m", cfg, Path(sys.argv[2]) / "log")
    print(server.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_server_dies_with_the_trainer(fake_python: Path, tmp_path: Path) -> None:
    trainer = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fake_python), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    pid = 0
    try:
        assert trainer.stdout is not None
        pid = int(trainer.stdout.readline())
        assert not dead(pid)
        trainer.kill()
        trainer.wait()
        assert wait_dead(pid), "the server outlived its trainer"
    finally:
        trainer.kill()
        trainer.wait()
        if pid and not dead(pid):  # the failure above: leave nothing behind either way
            os.killpg(pid, signal.SIGKILL)


def test_reaper_kills_dead_runs_servers_and_spares_live_ones(
    fake_python: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        cfg = config(fake_python)
        live = await start_server(tmp_path, "m", cfg, tmp_path / "a", run_id="liverun1")
        gone = await start_server(tmp_path, "m", cfg, tmp_path / "b", run_id="deadrun1")
        try:
            asked: list[str] = []

            def is_alive(run: str) -> bool:
                asked.append(run)
                return run != "deadrun1"

            killed = reap_servers(is_alive)
            assert gone.pid in killed and live.pid not in killed
            assert {"liverun1", "deadrun1"} <= set(asked)
            await asyncio.wait_for(gone.process.wait(), 10)
            assert gone.process.returncode == -signal.SIGKILL
            assert live.alive()
        finally:
            await live.stop()
            await gone.stop()

    asyncio.run(main())


def test_prompts_are_never_split_unless_asked(tmp_path: Path) -> None:
    """Chunked prefill is off by default (a seeded request cut mid-prefill kills vLLM's CPU
    engine), with the batch budget raised to the context length vLLM then requires."""
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    python = Path("/bin/python3")

    def tail(cfg: VLLMServerConfig) -> list[str]:
        argv = server_command(python, tmp_path, "m", cfg, 1)
        return argv[argv.index("--logprobs-mode") + 2 :]

    assert tail(VLLMServerConfig()) == [
        *("--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192")
    ]
    assert tail(VLLMServerConfig(max_model_len=1024)) == [
        *("--max-model-len", "1024", "--no-enable-chunked-prefill"),
        *("--max-num-batched-tokens", "1024"),
    ]
    assert tail(VLLMServerConfig(chunked_prefill=True)) == []
    assert tail(VLLMServerConfig(chunked_prefill=True, max_num_batched_tokens=4096)) == [
        *("--max-num-batched-tokens", "4096")
    ]
    (tmp_path / "config.json").unlink()  # unreadable: vLLM's own budget
    assert tail(VLLMServerConfig()) == ["--no-enable-chunked-prefill"]
