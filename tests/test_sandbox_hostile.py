"""Hostile code against the sandbox's own machinery: the channel to the trainer, the replies the
trainer reads, the kernel primitives of published escalations, the trainer's keyring, threads
that outlive a call, and per-user kernel resources (issue 12's findings, each an attack).

Each attack runs on every backend it applies to (`subprocess` is no boundary: only the
reply-channel bounds apply to it) and asserts how it was contained and that the pool still
serves honest calls afterwards. The host side's checks of replies are also exercised directly,
with a real process speaking the worker protocol badly.
"""

from __future__ import annotations

import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sandbox_attacks import (
    ANY,
    ISOLATED,
    LIMITS,
    MODES,
    Backend,
    Mode,
    call,
    params,
    report,
    session_of,
    snippet,
    works,
)

from turnrl.sandboxes.base import ExecResult, Limits, Sandbox
from turnrl.sandboxes.pool import (
    REPORT_BYTES,
    PoolSession,
    StreamWorker,
    WorkerHandle,
    WorkerPool,
    answering,
)

pytestmark = pytest.mark.usefixtures("leaves_nothing")

SYSCALLS = {
    "x86_64": {
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "io_uring_setup": 425,
        "userfaultfd": 323,
        "perf_event_open": 298,
        "bpf": 321,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
    },
    "aarch64": {
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "io_uring_setup": 425,
        "userfaultfd": 282,
        "perf_event_open": 241,
        "bpf": 280,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
    },
}
"""Numbers of the syscalls the attacks try, per architecture (the snippet calls them raw)."""


def syscall_numbers() -> dict[str, int]:
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no syscall table for {platform.machine()}")
    return numbers


# --- the channel to the trainer -----------------------------------------------------------------

FORGE = """
import errno, os, struct
body = json.dumps({"stdout": {"head": "", "tail": "", "total": 0},
                   "stderr": {"head": "", "tail": "", "total": 0}, "exit_code": 0,
                   "signal": None, "timed_out": False, "wall_s": 0.0, "cpu_s": 0.0,
                   "completed": True, "exception": "FORGED"}).encode()
frame = struct.pack(">I", len(body)) + body
out = {}
targets = {1, os.getppid()}
for pid in sorted(targets):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        out[f"{pid}/ls"] = errno.errorcode.get(e.errno, str(e.errno))
        fds = ["0", "1", "2", "3", "4", "5"]
    for fd in fds:
        try:
            w = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            out[f"{pid}/{fd}"] = errno.errorcode.get(e.errno, str(e.errno))
            continue
        try:
            os.write(w, frame)
            out[f"{pid}/{fd}"] = "written"
        except OSError as e:
            out[f"{pid}/{fd}"] = "opened:" + errno.errorcode.get(e.errno, str(e.errno))
        os.close(w)
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_the_channel_cannot_be_opened_through_proc(backend: Backend, mode: Mode) -> None:
    """pid 1 and the worker hold the channel; neither's descriptors can be opened, and calls
    after the attempt get their own replies."""

    async def body(sandbox: Sandbox) -> tuple[dict[str, str], list[ExecResult]]:
        async with session_of(sandbox) as session:
            tried = report(await call(session, mode, snippet(FORGE)))
            after = [await call(session, mode, f"print({i})") for i in range(3)]
        await works(sandbox)
        return tried, after

    tried, after = backend.scenario(body)
    assert tried and "written" not in tried.values(), tried
    assert not any(v.startswith("opened") for v in tried.values()), tried
    assert [r.stdout for r in after] == ["0\n", "1\n", "2\n"]
    assert all(r.ok and r.exception is None for r in after)


PTRACE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for pid in sorted({1, os.getppid()}):
    for name, args in (("attach", (16, pid, 0, 0)), ("seize", (0x4206, pid, 0, 0))):
        rc = libc.syscall(NR["ptrace"], *args)
        out[f"{name} {pid}"] = "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
    buf = ctypes.create_string_buffer(8)
    iov = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
    rc = libc.syscall(NR["process_vm_readv"], pid, iov, 1, iov, 1, 0)
    out[f"vm_readv {pid}"] = "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_pid_one_and_the_worker_cannot_be_traced(backend: Backend) -> None:
    numbers = syscall_numbers()

    async def body(sandbox: Sandbox) -> dict[str, str]:
        async with session_of(sandbox) as session:
            out: dict[str, str] = report(await session.python(snippet(PTRACE, NR=numbers)))
        return out

    out = backend.scenario(body)
    assert {"attach 1", "seize 1", "vm_readv 1"} <= set(out), out
    assert set(out.values()) == {"EPERM"}, out


# --- replies the trainer reads ------------------------------------------------------------------

BIG_REPORT = """
import os
chunk = b"x" * (1 << 20)
for _ in range(40):
    os.write(3, chunk)
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_a_flooded_report_is_cut_in_the_sandbox(backend: Backend, mode: Mode) -> None:
    """40 MB written to the report descriptor reach the trainer as a short non-result."""

    async def body(sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
        async with session_of(sandbox) as session:
            flooded = await call(session, mode, BIG_REPORT)
            return flooded, await call(session, mode, "print('next')")

    flooded, after = backend.scenario(body)
    assert not flooded.completed and flooded.error is None, flooded
    assert flooded.exception is None or len(flooded.exception) <= REPORT_BYTES
    assert after.ok and after.stdout == "next\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_a_malformed_report_is_a_failed_snippet_not_an_error(backend: Backend, mode: Mode) -> None:
    """A report of the wrong shape (an `exception` that is not a string) never raises out of
    the call: the snippet did not complete, and the session goes on."""
    forged = 'import os\nos.write(3, b\'{"completed": true, "exception": 5}\\n\')\nos._exit(0)\n'

    async def body(sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
        async with session_of(sandbox) as session:
            bad = await call(session, mode, forged)
            return bad, await call(session, mode, "print('next')")

    bad, after = backend.scenario(body)
    assert not bad.completed and bad.error is None, bad
    assert after.ok and after.stdout == "next\n"


# The host side, against a real process speaking the protocol badly: it answers one ping, then
# replies to the next request with `REPLY` (a Python expression of the bytes to send).
LIAR = textwrap.dedent(
    """
    import json, os, struct, sys, time
    def read():
        n = struct.unpack(">I", os.read(0, 4))[0]
        buf = b""
        while len(buf) < n:
            buf += os.read(0, n - len(buf))
        return json.loads(buf)
    def send(data):
        while data:
            data = data[os.write(1, data):]
    req = read()
    body = json.dumps({"pong": True, "id": req["id"]}).encode()
    send(struct.pack(">I", len(body)) + body)
    req = read()
    call_id = req["id"]
    send(REPLY)
    time.sleep(60)
    """
)


def good_reply(**fields: Any) -> dict[str, Any]:
    empty = {"head": "", "tail": "", "total": 0}
    reply = {
        "stdout": empty,
        "stderr": empty,
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "wall_s": 0.0,
        "cpu_s": 0.0,
        "completed": True,
        "exception": None,
    }
    return reply | fields


def framed(expr: str) -> str:
    return f"(lambda b: struct.pack('>I', len(b)) + b)({expr})"


LIES = {
    "oversized": "struct.pack('>I', 200 * 1024 * 1024) + b'{' * 65536",
    "not json": framed("b'not json at all'"),
    "a list": framed("b'[1, 2, 3]'"),
    "another call's": framed(f"json.dumps(dict({good_reply()!r}, id='0123456789abcdef')).encode()"),
    "exception not a string": framed(
        f"json.dumps(dict({good_reply(exception=5)!r}, id=call_id)).encode()"
    ),
    "stdout not base64": framed(
        "json.dumps(dict("
        f"{good_reply(stdout={'head': '%%%', 'tail': '', 'total': 3})!r}, id=call_id)).encode()"
    ),
    "unknown field": framed(f"json.dumps(dict({good_reply(extra=1)!r}, id=call_id)).encode()"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_reply_no_honest_worker_sends_kills_that_worker(lie: str) -> None:
    """Every malformed or oversized reply becomes a typed error of that call: the worker is
    killed, nothing raises, and the trainer never buffers what a header claims."""
    source = LIAR.replace("REPLY", LIES[lie])

    async def main() -> tuple[ExecResult, list[int | None]]:
        procs: list[asyncio.subprocess.Process] = []

        async def spawn() -> WorkerHandle:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                source,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            procs.append(proc)
            return await answering(StreamWorker(proc), "liar")

        pool = WorkerPool(spawn, size=1, warm=0)
        session = PoolSession(pool, Limits(wall_s=5))
        result = await session.python("print(1)")
        await session.close()
        await pool.close()
        return result, [await asyncio.wait_for(p.wait(), 10) for p in procs]

    result, codes = asyncio.run(main())
    assert result.error is not None and "sandbox worker" in result.error, result
    assert result.state_lost and not result.completed
    assert codes and all(code is not None for code in codes)  # the liar was killed


# --- kernel primitives and the keyring ----------------------------------------------------------

PRIMITIVES = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
calls = {
    "io_uring_setup": (NR["io_uring_setup"], 8, ctypes.create_string_buffer(120)),
    "userfaultfd": (NR["userfaultfd"], 0),
    "perf_event_open": (NR["perf_event_open"], ctypes.create_string_buffer(128), 0, -1, -1, 0),
    "bpf": (NR["bpf"], 0, ctypes.create_string_buffer(128), 128),
    "keyctl": (NR["keyctl"], 0, -3, 0),
    "add_key": (NR["add_key"], b"user", b"turnrl", b"secret", 6, -3),
    "request_key": (NR["request_key"], b"user", b"turnrl", None, 0),
    "ptrace": (NR["ptrace"], 0, 0, 0, 0),
}
out = {}
for name, args in calls.items():
    rc = libc.syscall(*args)
    out[name] = "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_escalation_primitives_are_denied(backend: Backend) -> None:
    """io_uring, userfaultfd, perf_event_open, bpf, the key syscalls and ptrace (even
    PTRACE_TRACEME) all fail with EPERM, in fresh and stateful snippets alike."""
    numbers = syscall_numbers()

    async def body(sandbox: Sandbox) -> list[dict[str, str]]:
        async with session_of(sandbox) as session:
            code = snippet(PRIMITIVES, NR=numbers)
            return [report(await session.python(code)), report(await session.python_fresh(code))]

    for out in backend.scenario(body):
        assert out == {name: "EPERM" for name in out}, out
        assert len(out) == 8


KEYRING_TRAINER = """
import asyncio, ctypes, json, sys
from turnrl.sandboxes.bwrap import BwrapSandbox
from turnrl.sandboxes.base import Limits
NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
# A trainer with a session keyring (pam_keyinit, a systemd service) holding a secret.
assert libc.syscall(NR["keyctl"], 1, b"turnrl-test-session") > 0  # JOIN_SESSION_KEYRING
key = libc.syscall(NR["add_key"], b"user", b"trainer-secret", b"hunter2", 7, -3)
assert key > 0, ctypes.get_errno()
code = (
    "import ctypes, errno, json\\n"
    "libc = ctypes.CDLL(None, use_errno=True)\\n"
    "buf = ctypes.create_string_buffer(64)\\n"
    f"rc = libc.syscall({NR['keyctl']}, 11, {key}, buf, 64)\\n"  # KEYCTL_READ
    "print(json.dumps([rc, errno.errorcode.get(ctypes.get_errno()), buf.value.decode()]))\\n"
)
async def main():
    sandbox = BwrapSandbox(Limits(), pool_size=1, warm=0)
    try:
        session = await sandbox.session()
        result = await session.python(code)
        await session.close()
    finally:
        await sandbox.close()
    print(result.stdout.strip())
asyncio.run(main())
"""


@pytest.mark.parametrize("backend", params("bwrap"), indirect=True)
def test_the_trainers_session_keyring_is_not_reachable(backend: Backend, tmp_path: Path) -> None:
    """A trainer whose session keyring holds a secret: code in a bwrap sandbox cannot read it
    (the sandbox joins a fresh keyring, and the key syscalls are denied)."""
    numbers = syscall_numbers()
    proc = subprocess.run(
        [sys.executable, "-c", KEYRING_TRAINER, json.dumps(numbers)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rc, err, value = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc < 0 and err == "EPERM" and value == "", (rc, err, value)


# --- threads that outlive a call ----------------------------------------------------------------

LATE_THREAD = """
import threading, time
def burn():
    t0 = time.thread_time()
    while time.thread_time() - t0 < 1.5:
        pass
    print("late", flush=True)
t = threading.Thread(target=burn)
t.start()
"""


@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_a_background_thread_is_reported_and_billed(backend: Backend) -> None:
    """A stateful call that leaves a thread running says so; the CPU the thread burns is billed
    (to the next call, whenever it burnt it), and its output shows there."""

    async def body(sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
        async with session_of(sandbox) as session:
            started = await session.python(LATE_THREAD)
            joined = await session.python("t.join()\nprint('joined')")
            return started, joined

    started, joined = backend.scenario(body)
    assert started.ok and started.background_threads == 1, started
    assert joined.ok and joined.background_threads == 0, joined
    assert "late\n" in joined.stdout + started.stdout and joined.stdout.endswith("joined\n")
    assert started.cpu_s + joined.cpu_s >= 1.4, (started.cpu_s, joined.cpu_s)


FOREVER_THREAD = """
import threading
def burn():
    while True:
        pass
t = threading.Thread(target=burn, daemon=True)
t.start()
"""


@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_a_thread_cannot_burn_cpu_past_the_limit(backend: Backend) -> None:
    """A thread that never ends is stopped by the CPU limit: the interpreter is killed and the
    session says its state is gone."""
    limits = LIMITS.model_copy(update={"cpu_s": 1.0, "wall_s": 60.0})

    async def body(sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
        async with session_of(sandbox) as session:
            started = await session.python(FOREVER_THREAD, limits)
            waited = await session.python("t.join()", limits)
            return started, waited

    started, waited = backend.scenario(body, limits)
    assert started.background_threads == 1
    assert waited.state_lost and not waited.completed, waited
    assert waited.wall_s < 50


# --- per-user kernel resources ------------------------------------------------------------------

HOG_PIPES = """
import fcntl, os
held = []
for _ in range(400):
    r, w = os.pipe()
    held.append((r, w))
    try:
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:  # past the soft limit: no more resizing...
        break
held += [os.pipe() for _ in range(64)]  # ...and default-sized pipes fill the rest
r, w = os.pipe()
print(json.dumps({"held": len(held), "new_pipe": fcntl.fcntl(w, 1032)}))  # F_GETPIPE_SZ
"""
PIPE_SIZE = """
import fcntl, os
r, w = os.pipe()
print(json.dumps(fcntl.fcntl(w, 1032)))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_pipes_held_by_one_episode_do_not_shrink_anothers(backend: Backend) -> None:
    """One episode exhausts its user's pipe pages (`fs.pipe-user-pages-soft`); another
    episode's new pipes keep their full size, because every sandbox has a uid of its own."""
    soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    if soft == 0:
        pytest.skip("fs.pipe-user-pages-soft is 0 (no per-user pipe limit here)")
    limits = LIMITS.model_copy(update={"pids": 64})

    async def body(sandbox: Sandbox) -> tuple[dict[str, int], int]:
        async with session_of(sandbox) as hog, session_of(sandbox) as victim:
            hogged = report(await hog.python(snippet(HOG_PIPES)))
            return hogged, report(await victim.python(snippet(PIPE_SIZE)))

    hogged, victim_size = backend.scenario(body, limits, pool_size=2)
    # The attack worked on its own uid: the hog's own new pipe is small...
    assert hogged["new_pipe"] < 65536, hogged
    # ...and nobody else's.
    assert victim_size == 65536


# --- a trainer that is not root -------------------------------------------------------------------

UNPRIVILEGED_TRAINER = """
import asyncio, json, sys
from turnrl.sandboxes.bwrap import BwrapSandbox
from turnrl.sandboxes.base import Limits
forge = sys.argv[1]
async def main():
    sandbox = BwrapSandbox(Limits(), pool_size=1, warm=0, cgroups=False)
    out = []
    try:
        for stateful in (True, False):
            session = await sandbox.session()
            run = session.python if stateful else session.python_fresh
            tried = await run(forge)
            after = [await run(f"print({i})") for i in range(2)]
            out.append([tried.stdout, [(r.stdout, r.ok) for r in after]])
            await session.close()
    finally:
        await sandbox.close()
    print(json.dumps(out))
asyncio.run(main())
"""


def test_a_non_root_trainers_channel_cannot_be_opened_either() -> None:
    """Under a trainer without privileges (no setpriv drop: the sandbox has the trainer's own
    uid), pid 1 of the sandbox is still the non-dumpable worker: its descriptors cannot be
    opened, and later calls get their own replies."""
    import os

    from turnrl.sandboxes.bwrap import bwrap_usable

    if os.geteuid() != 0:
        pytest.skip("needs root to start a trainer as another uid")
    if (why := bwrap_usable()) is not None:
        pytest.skip(f"bwrap not usable here: {why}")
    # A folder the unprivileged trainer may write (pytest's own is private to root).
    home = Path(tempfile.mkdtemp(prefix="turnrl-nonroot-"))
    locks = home / "locks"
    locks.mkdir()
    for d in (home, locks):
        d.chmod(0o777)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"PATH": "/usr/bin:/bin", "TURNRL_SANDBOX_LOCKS": str(locks), "TMPDIR": str(home)}
    try:
        proc = subprocess.run(
            [*argv, sys.executable, "-c", UNPRIVILEGED_TRAINER, snippet(FORGE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for tried, after in json.loads(proc.stdout.strip().splitlines()[-1]):
        attempts = json.loads(tried.strip().splitlines()[-1])
        assert attempts and "written" not in attempts.values(), attempts
        assert not any(v.startswith("opened") for v in attempts.values()), attempts
        assert after == [["0\n", True], ["1\n", True]]
