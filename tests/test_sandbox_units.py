"""Unit tests of the sandbox machinery that needs no sandbox: output sanitising and capping,
the worker's capture and framing, cgroup detection on fake trees, run locks, and the warm pool
and its sessions driven through fake `WorkerHandle`s (fakes of our own protocol).

Some are regression locks of pool and reaper races this suite found (a health check and an
acquire sharing a worker, concurrent first calls, a double release, foreign cgroup names).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnrl.sandboxes.base import ExecResult, Limits, SandboxError
from turnrl.sandboxes.cgroups import CgroupDriver, CgroupLimits, detect
from turnrl.sandboxes.output import join_capture, sanitize
from turnrl.sandboxes.pool import BACKSTOP_S, PoolSession, WorkerDied, WorkerPool, to_result
from turnrl.sandboxes.reaper import RunLock, cgroup_run_id, reap, run_is_alive
from turnrl.sandboxes.worker_child import descendants
from turnrl.sandboxes.worker_wire import Capture, read_frame, write_frame

FORBIDDEN = {chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]} - {"\n", "\t"}
"""C0 and C1 controls and DEL: never in sanitised text (newline and tab excepted)."""


# --- output ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"plain text\n\twith tab", "plain text\n\twith tab"),
        (b"nul\x00byte", "nulbyte"),
        (b"\x1b[1;31mred\x1b[0m", "red"),  # CSI colour
        (b"\x1b[2J\x1b[Hcleared", "cleared"),  # CSI clear + home
        (b"\x1b]0;window title\x07after", "after"),  # OSC ended by BEL
        (b"\x1b]8;;http://x\x1b\\link", "link"),  # OSC ended by ST
        (b"\x1bPq#0;2;0;0;0\x1b\\sixel", "sixel"),  # DCS
        (b"\x1bMreverse index", "reverse index"),  # two-byte escape
        ("\u009b31mc1".encode(), "c1"),  # the 8-bit CSI, UTF-8 encoded
        (b"bell\x07back\x08\x0bvt\x0cff\x7fdel", "bellbackvtffdel"),
        ("next\u0085line".encode(), "nextline"),  # C1 NEL
        (b"crlf\r\nlone\rcr", "crlf\nlonecr"),
        (b"bad \xff\xfe utf8", "bad \ufffd\ufffd utf8"),
        (b"cut \xe2\x82", "cut \ufffd"),  # a truncated 3-byte sequence
        ("unicode ✓ é 日本".encode(), "unicode ✓ é 日本"),
        (b"\x1b", ""),
    ],
)
def test_sanitize(raw: bytes, text: str) -> None:
    assert sanitize(raw) == text


@given(st.binary(max_size=2000))
def test_sanitize_never_raises_and_leaves_no_control_characters(data: bytes) -> None:
    out = sanitize(data)
    assert not FORBIDDEN & set(out)


@given(st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs", "Cf"]), max_size=200))
def test_sanitize_keeps_printable_text(text: str) -> None:
    """Format characters (Cf) are left out: the invisible ones are stripped
    (`test_sandbox_output.py`)."""
    assert sanitize(text.encode()) == text


def test_join_capture_without_a_cut_is_the_whole_stream() -> None:
    assert join_capture(b"ab", b"cd", 4) == ("abcd", False)
    # A character split between head and tail is decoded whole: they are joined first.
    assert join_capture("é".encode()[:1], "é".encode()[1:], 2) == ("é", False)


def test_join_capture_marks_the_cut_with_its_size() -> None:
    # 10 bytes written, 2 + 3 kept: 5 cut.
    assert join_capture(b"ab", b"xyz", 10) == ("ab\n…[5 bytes cut]…\nxyz", True)
    # 100 written, 7 + 3 kept: 90 cut; each end is sanitised on its own.
    assert join_capture(b"\x1b[31mab", b"yz\x00", 100) == ("ab\n…[90 bytes cut]…\nyz", True)


# --- the worker's capture and framing ---------------------------------------------------------


@given(chunks=st.lists(st.binary(max_size=300), max_size=20), cap=st.integers(1, 400))
def test_capture_keeps_head_and_tail_and_counts_everything(chunks: list[bytes], cap: int) -> None:
    capture = Capture(cap)
    for chunk in chunks:
        capture.feed(chunk)
    data = b"".join(chunks)
    half = max(cap // 2, 1)
    assert capture.total == len(data)
    assert bytes(capture.head) == data[:half]
    assert bytes(capture.tail) == data[half:][-half:]
    dumped = capture.dump()
    head, tail, total = dumped["head"], dumped["tail"], dumped["total"]
    assert isinstance(head, str) and isinstance(tail, str) and isinstance(total, int)
    text, truncated = join_capture(base64.b64decode(head), base64.b64decode(tail), total)
    assert truncated == (len(data) > 2 * half)
    if not truncated:
        assert text == sanitize(data)
    else:
        assert f"…[{len(data) - 2 * half} bytes cut]…" in text


def test_frames_round_trip_and_end_at_eof() -> None:
    sent = {"op": "exec", "code": "print('é')", "n": [1, 2]}
    r, w = os.pipe()
    try:
        write_frame(w, sent)
        write_frame(w, {"op": "ping"})
        os.write(w, b"\x00\x00")  # half a header, then the writer goes away
        os.close(w)
        assert json.loads(read_frame(r) or b"") == sent
        assert read_frame(r) == b'{"op": "ping"}'
        assert read_frame(r) is None
    finally:
        os.close(r)


def test_descendants_walks_the_whole_tree() -> None:
    kids = {1: [2, 3], 2: [4], 4: [5], 3: [], 9: [10]}
    assert sorted(descendants(1, kids)) == [2, 3, 4, 5]
    assert descendants(5, kids) == []


# --- cgroups: detection on fake trees ---------------------------------------------------------


def _v1_tree(root: Path, controllers: tuple[str, ...] = ("memory", "pids", "cpu")) -> None:
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("")  # hybrid: v2 without controllers
    for c in controllers:
        (root / c).mkdir()
        (root / c / "cgroup.procs").write_text("1\n")


def test_detect_v1_hybrid_layout(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    driver = detect(tmp_path)
    assert driver is not None and driver.version == 1
    assert driver.bases == {c: tmp_path / c for c in ("memory", "pids", "cpu")}


def test_detect_v1_without_cpu_still_bounds_memory_and_pids(tmp_path: Path) -> None:
    _v1_tree(tmp_path, ("memory", "pids"))
    driver = detect(tmp_path)
    assert driver is not None and set(driver.bases) == {"memory", "pids"}


def test_detect_v1_without_pids_is_unusable(tmp_path: Path) -> None:
    _v1_tree(tmp_path, ("memory", "cpu"))
    assert detect(tmp_path) is None


def test_detect_nothing(tmp_path: Path) -> None:
    assert detect(tmp_path) is None


@pytest.mark.parametrize(
    ("controllers", "enabled"),
    [("cpuset cpu io memory hugetlb pids", "+memory +pids +cpu"), ("memory pids", "+memory +pids")],
)
def test_detect_v2_enables_controllers_under_a_turnrl_parent(
    tmp_path: Path, controllers: str, enabled: str
) -> None:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    driver = detect(tmp_path)
    assert driver is not None and driver.version == 2
    assert driver.bases == {"memory": tmp_path / "turnrl", "pids": tmp_path / "turnrl"}
    assert (tmp_path / "cgroup.subtree_control").read_text() == enabled
    assert (tmp_path / "turnrl" / "cgroup.subtree_control").read_text() == enabled


def test_detect_v2_on_the_unified_mount_of_a_hybrid(tmp_path: Path) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("memory pids")
    driver = detect(tmp_path)
    assert driver is not None and driver.version == 2
    assert driver.bases["memory"] == tmp_path / "unified" / "turnrl"


def test_detect_v2_without_memory_falls_back_to_v1(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    (tmp_path / "unified" / "cgroup.controllers").write_text("pids cpu")
    driver = detect(tmp_path)
    assert driver is not None and driver.version == 1


def test_v1_create_writes_the_limits(tmp_path: Path) -> None:
    _v1_tree(tmp_path)
    driver = detect(tmp_path)
    assert driver is not None
    group = driver.create("turnrl-abc123-0", CgroupLimits(memory_mb=128, pids=32, cpus=0.5))

    def read(controller: str, leaf: str) -> str:
        return (tmp_path / controller / "turnrl-abc123-0" / leaf).read_text()

    assert read("memory", "memory.limit_in_bytes") == str(128 * 1024 * 1024)
    assert read("memory", "memory.memsw.limit_in_bytes") == str(128 * 1024 * 1024)
    assert read("pids", "pids.max") == "32"
    assert read("cpu", "cpu.cfs_quota_us") == "50000"  # 0.5 core of a 100 ms period
    assert read("cpu", "cpu.cfs_period_us") == "100000"
    assert [name for name, _ in driver.leftovers()] == ["turnrl-abc123-0"]
    (tmp_path / "pids" / "turnrl-abc123-0" / "cgroup.procs").write_text("7\n8\n")
    assert group.pids() == {7, 8}


def test_v2_create_writes_the_limits(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids")
    driver = detect(tmp_path)
    assert driver is not None
    driver.create("turnrl-abc123-1", CgroupLimits(memory_mb=64, pids=16, cpus=2.0))
    d = tmp_path / "turnrl" / "turnrl-abc123-1"
    assert (d / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "16"
    assert (d / "cpu.max").read_text() == "200000 100000"


def test_oom_kills_are_read_from_v1_and_v2_files(tmp_path: Path) -> None:
    from turnrl.sandboxes.cgroups import Cgroup

    v1, v2, empty = tmp_path / "v1", tmp_path / "v2", tmp_path / "empty"
    for d in (v1, v2, empty):
        d.mkdir()
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 4\noom_kill 2\n")
    assert Cgroup({"memory": v1}, 1).oom_kills() == 3
    assert Cgroup({"memory": v2}, 2).oom_kills() == 2
    assert Cgroup({"memory": empty}, 1).oom_kills() == 0


def test_reap_only_removes_the_named_runs_cgroups(tmp_path: Path) -> None:
    run, other = "u" + os.urandom(6).hex(), "u" + os.urandom(6).hex()
    bases = {c: tmp_path / c for c in ("memory", "pids")}
    for base in bases.values():
        for name in (f"turnrl-{run}-0", f"turnrl-{run}-1", f"turnrl-{other}-0", "unrelated"):
            (base / name).mkdir(parents=True)
    done = reap(CgroupDriver(1, bases), only=run)
    assert (done.cgroups, done.runs) == (2, {run})
    assert sorted(p.name for p in bases["pids"].iterdir()) == [f"turnrl-{other}-0", "unrelated"]


# --- run ids and locks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "run"),
    [
        ("turnrl-abc123-0", "abc123"),
        ("turnrl-0123456789abcdef-17", "0123456789abcdef"),
        ("turnrl-abc123", None),
        ("turnrl-abc123-0-1", None),
        ("other-abc123-0", None),
        ("turnrl", None),
    ],
)
def test_cgroup_run_id(name: str, run: str | None) -> None:
    assert cgroup_run_id(name) == run


@pytest.mark.parametrize(
    "name", ["turnrl-web-1", "turnrl--0", "turnrl-ABCDEF12-0", "turnrl-abc123-x"]
)
def test_cgroup_run_id_rejects_names_turnrl_never_makes(name: str) -> None:
    assert cgroup_run_id(name) is None


@pytest.fixture
def locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private lock folder. Only for tests that never run a reaper over the whole machine:
    with it, every real run's lock is invisible and would look dead."""
    monkeypatch.setenv("TURNRL_SANDBOX_LOCKS", str(tmp_path))
    yield tmp_path


def test_run_is_alive_while_the_lock_is_held(locks: Path) -> None:
    run = RunLock()
    assert run_is_alive(run.run_id)
    run.release()
    run.release()  # idempotent
    assert not run_is_alive(run.run_id)
    assert not (locks / f"{run.run_id}.lock").exists()


def test_a_held_run_id_cannot_be_taken_twice(locks: Path) -> None:
    run = RunLock()
    try:
        with pytest.raises(BlockingIOError):
            RunLock(run_id=run.run_id)
    finally:
        run.release()


@pytest.mark.parametrize("bad", ["short", "UPPERCASE1", "has-dash1", "x" * 33, ""])
def test_run_ids_are_validated(locks: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        RunLock(run_id=bad)


def test_a_sigkilled_holder_leaves_a_dead_run(locks: Path) -> None:
    run_id = "k" + os.urandom(6).hex()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom turnrl.sandboxes.reaper import RunLock\n"
            "RunLock(run_id=sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)",
            run_id,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert run_is_alive(run_id)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert not run_is_alive(run_id)
    finally:
        holder.kill()
        holder.wait()


# --- the pool and its sessions, on fake workers ----------------------------------------------


def _capture(data: bytes) -> dict[str, Any]:
    return {"head": base64.b64encode(data).decode(), "tail": "", "total": len(data)}


def response(stdout: bytes = b"", **fields: Any) -> dict[str, Any]:
    """A worker's answer to a call, as `worker.py` shapes it."""
    base = {"stdout": _capture(stdout), "stderr": _capture(b""), "exit_code": 0, "signal": None}
    base |= {"timed_out": False, "exception": None}
    return base | {"completed": True, "wall_s": 0.01, "cpu_s": 0.0} | fields


class FakeWorker:
    """A `WorkerHandle` that answers from a script: a dict is a response, an exception is
    raised (and, like a real channel break, leaves the worker dead)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.replies: deque[dict[str, Any] | BaseException] = deque()
        self.requests: list[tuple[dict[str, Any], float]] = []
        self.gate: asyncio.Event | None = None
        self.dead = self.destroyed = False
        self.oom = 0
        self.oom_on_death = 0

    async def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.requests.append((request, timeout_s))
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        if self.dead or self.destroyed:
            raise WorkerDied("channel closed")
        reply = self.replies.popleft() if self.replies else response(b"ok\n")
        if isinstance(reply, BaseException):
            self.dead = True
            self.oom += self.oom_on_death
            raise reply
        return reply

    def alive(self) -> bool:
        return not (self.dead or self.destroyed)

    def oom_kills(self) -> int:
        return self.oom

    async def destroy(self) -> None:
        self.destroyed = True


class Spawner:
    """The `spawn` a backend gives its pool: makes `FakeWorker`s, or fails when told to."""

    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.failures = 0

    async def __call__(self) -> FakeWorker:
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise SandboxError("cannot start a worker")
        worker = FakeWorker(len(self.workers))
        self.workers.append(worker)
        return worker

    def alive(self) -> list[int]:
        return [w.n for w in self.workers if not w.destroyed]


async def settle() -> None:
    """Let background warm-up tasks run to completion."""
    for _ in range(50):
        await asyncio.sleep(0)


async def blocked(pool: WorkerPool) -> bool:
    """Whether an acquire() now has to wait (the pool is at its size)."""
    task = asyncio.ensure_future(pool.acquire())
    await settle()
    if task.done():
        await pool.release(task.result())
        return False
    task.cancel()
    return True


@pytest.mark.parametrize(("size", "warm"), [(0, 0), (2, 3), (2, -1)])
def test_pool_rejects_impossible_sizes(size: int, warm: int) -> None:
    with pytest.raises(ValueError, match="pool needs"):
        WorkerPool(Spawner(), size, warm)


def test_pool_keeps_warm_workers_but_never_more_than_size() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=3, warm=2)
        first = await pool.acquire()
        await settle()
        assert pool.spawned == 3  # the one handed out and two warm
        second, third = await pool.acquire(), await pool.acquire()
        await settle()
        assert pool.spawned == 3 and len({first, second, third}) == 3  # warm ones were used
        assert await blocked(pool)
        await pool.close()

    asyncio.run(main())


def test_pool_backpressure_waits_for_a_release_and_never_reuses_a_worker() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=2, warm=0)
        a, b = await pool.acquire(), await pool.acquire()
        waiting = asyncio.ensure_future(pool.acquire())
        await settle()
        assert not waiting.done()
        await pool.release(a)
        c = await asyncio.wait_for(waiting, 5)
        assert spawn.workers[0].destroyed and c not in (a, b)
        await pool.close()

    asyncio.run(main())


def test_pool_replaces_idle_workers_that_died() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=2, warm=1)
        await pool.release(await pool.acquire())
        await settle()
        (idle,) = (w for w in spawn.workers if not w.destroyed)
        idle.dead = True
        got = await pool.acquire()
        assert got is not idle and idle.destroyed
        await pool.close()

    asyncio.run(main())


def test_health_replaces_idle_workers_that_do_not_answer() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=3, warm=2)
        await pool.release(await pool.acquire())
        await settle()
        idle = [w for w in spawn.workers if not w.destroyed]
        idle[0].replies.append(WorkerDied("no pong"))
        assert await pool.health() == 1
        await settle()
        assert idle[0].destroyed and len(spawn.alive()) == 2  # warm again
        await pool.close()

    asyncio.run(main())


def test_health_never_drops_a_worker_a_session_took_meanwhile() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=1, warm=1)
        await pool.release(await pool.acquire())
        await settle()
        (idle,) = (w for w in spawn.workers if not w.destroyed)
        idle.gate = asyncio.Event()
        idle.replies.append(WorkerDied("no pong"))
        checking = asyncio.ensure_future(pool.health())
        await settle()
        taking = asyncio.ensure_future(pool.acquire())  # while the ping is out
        await settle()
        idle.gate.set()
        await checking
        await pool.release(await taking)
        await pool.acquire()
        assert await blocked(pool)  # size 1: one worker at a time, still
        await pool.close()

    asyncio.run(main())


def test_failed_starts_surface_and_do_not_leak_capacity() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=2, warm=1)
        spawn.failures = 1
        with pytest.raises(SandboxError, match="cannot start"):
            await pool.acquire()
        await pool.acquire()
        spawn.failures = 1  # the warm start this acquire began fails
        await settle()
        await asyncio.wait_for(pool.acquire(), 5)  # its slot was given back
        assert await blocked(pool)
        await pool.close()

    asyncio.run(main())


def test_close_destroys_idle_workers_and_wakes_waiters() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=2, warm=1)
        held = await pool.acquire()
        second = await pool.acquire()
        waiting = asyncio.ensure_future(pool.acquire())
        await settle()
        await pool.release(second)  # a warm replacement starts...
        await pool.close()  # ...and is cancelled or destroyed
        await settle()
        with pytest.raises(SandboxError, match="closed"):
            await pool.acquire()
        assert waiting.done() and isinstance(waiting.exception(), SandboxError)
        assert spawn.alive() == [0] and held is spawn.workers[0]

    asyncio.run(main())


def test_session_sends_each_op_with_its_limits_and_maps_the_answer() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=1, warm=0)
        limits = Limits(wall_s=3, memory_mb=64)
        session = PoolSession(pool, limits)
        tight = Limits(wall_s=1)
        results = [
            await session.python("x = 1"),
            await session.python_fresh("print(1)", tight),
            await session.run(["cat"], b"in"),
        ]
        (worker,) = spawn.workers
        (stateful, t1), (fresh, t2), (run, t3) = worker.requests
        assert (stateful["op"], stateful["stateful"], stateful["code"]) == ("exec", True, "x = 1")
        assert (fresh["op"], fresh["stateful"]) == ("exec", False)
        assert (run["op"], run["argv"], base64.b64decode(run["stdin"])) == ("run", ["cat"], b"in")
        assert stateful["limits"] == limits.model_dump() and fresh["limits"] == tight.model_dump()
        assert (t1, t2, t3) == (3 + BACKSTOP_S, 1 + BACKSTOP_S, 3 + BACKSTOP_S)
        assert [(r.stdout, r.ok, r.snippet) for r in results] == [
            ("ok\n", True, True),
            ("ok\n", True, True),
            ("ok\n", True, False),
        ]
        with pytest.raises(ValueError, match="argv"):
            await session.run([])
        await session.close()
        await session.close()  # idempotent
        assert worker.destroyed
        with pytest.raises(SandboxError, match="closed"):
            await session.python("x")
        await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("oom", [False, True])
def test_session_reports_a_dead_worker_then_runs_on_a_fresh_one(oom: bool) -> None:
    async def main() -> list[ExecResult]:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=1, warm=0)
        session = PoolSession(pool, Limits())
        await session.python("x = 1")
        (first,) = spawn.workers
        first.replies.append(WorkerDied("IncompleteReadError"))
        first.oom_on_death = int(oom)
        died = await session.python("os.kill(os.getppid(), 9)")
        after = await session.python("print(x)")
        assert first.destroyed and len(spawn.workers) == 2 and not spawn.workers[1].destroyed
        await session.close()
        await pool.close()
        return [died, after]

    died, after = asyncio.run(main())
    assert died.state_lost and not died.ok and died.oom_killed == oom
    assert died.error is not None
    assert ("memory limit" in died.error) == oom and ("IncompleteReadError" in died.error) != oom
    assert after.ok and not after.state_lost


def test_concurrent_first_calls_share_one_worker() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=1, warm=0)
        session = PoolSession(pool, Limits())
        async with asyncio.timeout(2):  # a leaked slot makes the second call wait forever
            await asyncio.gather(session.python_fresh("a"), session.python_fresh("b"))
        await session.close()
        assert spawn.alive() == []
        await pool.close()

    asyncio.run(main())


def test_a_worker_dying_under_concurrent_calls_is_released_once() -> None:
    async def main() -> None:
        spawn = Spawner()
        pool = WorkerPool(spawn, size=1, warm=0)
        session = PoolSession(pool, Limits())
        await session.python("warm up")
        spawn.workers[0].replies.append(WorkerDied("killed"))
        results = await asyncio.gather(session.python("a"), session.python("b"))
        assert all(r.state_lost for r in results)
        await session.close()
        await pool.acquire()
        assert await blocked(pool)  # size 1: still one worker at a time
        await pool.close()

    asyncio.run(main())


def test_to_result_maps_errors_and_memory_errors() -> None:
    assert to_result({"error": "unknown op 'x'"}, oom=False, snippet=True) == ExecResult(
        error="unknown op 'x'", snippet=True
    )
    result = to_result(response(completed=True, exception="MemoryError: "), False, True)
    assert result.oom_killed and not result.completed and not result.ok
    killed = to_result(response(completed=False, exit_code=None, signal=9), True, True)
    assert killed.oom_killed and killed.signal == 9 and not killed.ok
