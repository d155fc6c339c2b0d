"""Fault suite: 10,000 concurrent episodes on two cores (issue 15, item 4).

10,000 episodes are started at once through the real `EpisodeRunner.run_many` (concurrency
10,000), each streamed into the real `RunStore` as it ends. The policy is the real
`VLLMPolicy` against the fake vLLM server in its own process, which answers at once (zero
latency): one search-free call to a no-op tool (`EchoTool`), then the answer, 20,000
completion requests in all. The server rather than an in-process fake policy because it runs
more of the path a training run takes: the HTTP client's pool (64 keep-alive connections that
10,000 episodes queue on, each request under its timeout), the JSON payloads, the response
checks. It is also the only way file descriptors mean anything: an in-process policy opens
none, a leaking connection pool opens one per request.

Asserted: all 10,000 episodes answered and were recorded once (unique ids, read back from the
store); the growth of the resident set (VmRSS sampled every 20 ms, and VmHWM after a reset
through `/proc/self/clear_refs`) and of open descriptors (`/proc/self/fd` sampled) during the
run stay under bounds with wide margins over what was measured here (the figures are printed;
see the constants), and every descriptor the run opened is closed at its end. ~15 s here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fakes import CharTokenizer, EchoTool

from turnrl.agent.chat import ChatML
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, StopReason
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.store import RunStore
from turnrl.agent.vllm_policy import VLLMPolicy

N = 10_000
CONNECTIONS = 64
"""The policy's connection pool (`VLLMPolicy.max_connections`, its default)."""
MAX_RSS_GROWTH_MB = 1024
"""Bound on the resident set's growth over the run. Measured here: +430 MiB (~43 KiB per
episode: its records, ~16 KiB, are all held, as `run_many` returns them; each context and
its queued request, ~8 KiB in the payload, its JSON and the bytes written, are all alive at
once at this concurrency)."""
MAX_FD_GROWTH = CONNECTIONS + 32
"""Bound on open descriptors over the run: the pool's connections, the store's files, slack.
Measured here: +63 (the pool's 64 connections, one of them open before)."""
TESTS = Path(__file__).resolve().parent
TOK = CharTokenizer()
END = 2  # CharTokenizer's <|im_end|>
CALL = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call><|im_end|>'
ANSWER = "<answer>42</answer><|im_end|>"


def status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def reset_peak_rss() -> None:
    """VmHWM := VmRSS from here on (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


@dataclass
class Sampler:
    """Samples this process's resident set and open descriptors in a thread."""

    interval_s: float = 0.02
    rss_kb: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss_kb.append(status_kb("VmRSS"))
            self.fds.append(open_fds())
            self._stop.wait(self.interval_s)


def start_server() -> tuple[subprocess.Popen[str], int]:
    """The fake server in its own process, playing the call then the answer."""
    replies = [TOK.encode(CALL, parse_special=True), TOK.encode(ANSWER, parse_special=True)]
    server = subprocess.Popen(
        [sys.executable, str(TESTS / "fake_vllm.py"), "--replies", json.dumps(replies)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith("port "), line
    return server, int(line.split()[1])


def test_10000_concurrent_episodes_are_all_recorded_in_bounded_memory(tmp_path: Path) -> None:
    server, port = start_server()
    run_dir = tmp_path / "run"
    try:
        report = asyncio.run(run(port, run_dir))
    finally:
        server.terminate()
        server.wait(10)
    episodes, sampler, base_rss_kb, base_fds, hwm_kb, wall_s = report
    assert len(episodes) == N
    assert all(e.stop_reason == StopReason.ANSWERED for e in episodes)
    assert all(len(e.turns) == 2 and e.turns[0].tool_results[0].text == "hi" for e in episodes)
    with RunStore.open_readonly(run_dir) as store:
        ids = [e.episode_id for e in store.episodes()]
    assert len(ids) == len(set(ids)) == N
    assert set(ids) == {e.episode_id for e in episodes}

    peak_rss_kb = max([*sampler.rss_kb, hwm_kb])
    rss_growth_mb = (peak_rss_kb - base_rss_kb) / 1024
    fd_growth = max(sampler.fds) - base_fds
    print(
        f"\n{N} episodes in {wall_s:.1f} s: RSS {base_rss_kb / 1024:.0f} MiB before, peak "
        f"{peak_rss_kb / 1024:.0f} MiB (+{rss_growth_mb:.0f} MiB; VmHWM {hwm_kb / 1024:.0f} MiB); "
        f"open fds {base_fds} before, peak {max(sampler.fds)} (+{fd_growth}); "
        f"{len(sampler.fds)} samples"
    )
    assert len(sampler.fds) > 10, "the run was too short to sample"
    assert rss_growth_mb < MAX_RSS_GROWTH_MB
    assert fd_growth <= MAX_FD_GROWTH
    assert open_fds() <= base_fds + 2  # everything the run opened is closed again


async def run(port: int, run_dir: Path) -> tuple[list[Episode], Sampler, int, int, int, float]:
    specs = [
        EpisodeSpec(f"e{i}", f"g{i // 8}", "t", "Be brief.", "Q?", seed=i * 10) for i in range(N)
    ]
    budget = Budget(max_context_tokens=100_000, wall_clock_s=600.0)
    async with VLLMPolicy(f"http://127.0.0.1:{port}", "fake-model", timeout_s=600.0) as policy:
        runner = EpisodeRunner(policy, ChatML(TOK), [EchoTool()], budget, SamplingParams())
        # Warm up: one episode opens a connection and the store's files exist before the base.
        store = RunStore(run_dir)
        await runner.run_episode(EpisodeSpec("warm", "w", "t", "Be brief.", "Q?"))
        base_fds = open_fds()
        reset_peak_rss()
        base_rss_kb = status_kb("VmRSS")
        t0 = time.perf_counter()
        with Sampler() as sampler:
            episodes = await runner.run_many(specs, N, store.append_episode)
            store.flush()
        wall_s = time.perf_counter() - t0
        hwm_kb = status_kb("VmHWM")
        store.close()
    return episodes, sampler, base_rss_kb, base_fds, hwm_kb, wall_s
