"""The `subprocess` backend's cleanup promises, against snippets that attack its own machinery
(it is no security boundary, but what it promises to clean up it cleans up; see
`turnrl.sandboxes.local`): a daemon whose snippet SIGKILLed the worker, a frozen supervisor
of a SIGKILLed trainer, and the work folders such a trainer leaves in the temp dir.

Each process test runs with a cgroup (where one is usable here) and with the supervisor alone.
Real processes throughout; a daemon is found on the host by its unique `sleep` argument.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import pytest
from sandbox_attacks import LIMITS, MODES, RUNS, Mode, call, kill_all, new_marker, running

from turnrl.sandboxes.base import Limits
from turnrl.sandboxes.cgroups import detect
from turnrl.sandboxes.local import SubprocessSandbox
from turnrl.sandboxes.reaper import RunLock, run_is_alive, work_folder_prefix

pytestmark = pytest.mark.usefixtures("leaves_nothing")

Containment = Literal["cgroup", "supervisor"]
CONTAINMENTS = [
    pytest.param(
        "cgroup",
        marks=pytest.mark.skipif(detect() is None, reason="no usable cgroup hierarchy here"),
    ),
    "supervisor",
]


def open_subprocess(containment: Containment, limits: Limits = LIMITS) -> SubprocessSandbox:
    """A subprocess sandbox under its own run (recorded for the suite's leftover checks)."""
    run = RunLock()
    RUNS[run.run_id] = "subprocess"
    sandbox = SubprocessSandbox(
        limits, pool_size=1, warm=0, run=run, cgroups=containment == "cgroup"
    )
    assert (sandbox.cgroups is not None) == (containment == "cgroup")
    return sandbox


def settled_gone(marker: str, within_s: float = 5.0) -> bool:
    """True once no live (non-zombie) `sleep <marker>` is left (SIGKILL lands asynchronously)."""
    deadline = time.monotonic() + within_s
    while running(["sleep", marker]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(["sleep", marker])


DAEMON = """
import os, signal, sys, time

def daemon(marker):
    '''Double fork, setsid, exec: an orphan with no run tag in its command line.'''
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        pid = os.fork()
        if pid == 0:
            os.execvp('sleep', ['sleep', marker])
        os.write(w, str(pid).encode())
        os._exit(0)
    os.close(w)
    os.wait()
    pid = int(os.read(r, 32))
    while True:  # until it has exec'd sleep
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            if f.read().startswith(b'sleep'):
                return pid
        time.sleep(0.01)

def parent_of(pid):
    with open(f'/proc/{pid}/stat', 'rb') as f:
        stat = f.read()
    return int(stat[stat.rindex(b')') + 2 :].split()[1])
"""

KILL_OWN_WORKER = (
    DAEMON
    + """
daemon(MARKER)
# Stateful: the kernel's parent is the worker; fresh: the call's child's parent is.
os.kill(os.getppid(), signal.SIGKILL)
time.sleep(60)
"""
)


@pytest.mark.parametrize("closing", ["session", "sandbox"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_a_daemon_of_a_snippet_that_killed_its_worker_does_not_outlive_the_session(
    containment: Containment, mode: Mode, closing: str
) -> None:
    marker = new_marker()

    async def main() -> None:
        sandbox = open_subprocess(containment)
        try:
            session = await sandbox.session()
            killed = await call(session, mode, KILL_OWN_WORKER.replace("MARKER", repr(marker)))
            assert killed.state_lost and killed.error is not None, killed
            if closing == "session":
                await session.close()
                assert settled_gone(marker)
                # The sandbox serves on, on a fresh worker.
                again = await sandbox.python("print('still here')")
                assert again.stdout == "still here\n", again
        finally:
            await sandbox.close()
            sandbox.run_lock.release()
        assert settled_gone(marker)

    try:
        asyncio.run(main())
    finally:
        kill_all(running(["sleep", marker]))


KILL_SUPERVISOR_AND_WORKER = (
    DAEMON
    + """
worker = os.getppid()
supervisor = parent_of(worker)
daemon(MARKER)
os.kill(supervisor, signal.SIGKILL)
os.kill(worker, signal.SIGKILL)
time.sleep(60)
"""
)


@pytest.mark.skipif(detect() is None, reason="no usable cgroup hierarchy here")
def test_with_a_cgroup_a_daemon_outlives_no_session_even_when_the_supervisor_is_killed() -> None:
    """Without a cgroup this escapes (the module docstring says so); with one, it does not."""
    marker = new_marker()

    async def main() -> None:
        sandbox = open_subprocess("cgroup")
        try:
            session = await sandbox.session()
            code = KILL_SUPERVISOR_AND_WORKER.replace("MARKER", repr(marker))
            killed = await session.python(code)
            assert killed.state_lost, killed
            await session.close()
            assert settled_gone(marker)
        finally:
            await sandbox.close()
            sandbox.run_lock.release()

    try:
        asyncio.run(main())
    finally:
        kill_all(running(["sleep", marker]))


FREEZE_EVERYTHING = (
    DAEMON
    + """
worker = os.getppid()
os.kill(parent_of(worker), signal.SIGSTOP)
daemon(MARKER)
os.kill(worker, signal.SIGSTOP)
time.sleep(60)
"""
)


@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_a_hung_worker_is_killed_with_its_whole_tree(containment: Containment) -> None:
    """The snippet froze the supervisor and the worker: the host's backstop kills the worker,
    and with it everything below the supervisor (killed alone, the supervisor would leave the
    daemon to the host's init)."""
    marker = new_marker()
    limits = LIMITS.model_copy(update={"wall_s": 1.0})

    async def main() -> None:
        sandbox = open_subprocess(containment)
        try:
            session = await sandbox.session()
            code = FREEZE_EVERYTHING.replace("MARKER", repr(marker))
            hung = await session.python(code, limits)
            assert hung.state_lost and hung.error is not None, hung
            assert settled_gone(marker)
        finally:
            await sandbox.close()
            sandbox.run_lock.release()

    try:
        asyncio.run(main())
    finally:
        kill_all(running(["sleep", marker]))


TRAINER = """
import asyncio, json, sys
from turnrl.sandboxes.base import Limits
from turnrl.sandboxes.local import SubprocessSandbox
from turnrl.sandboxes.reaper import RunLock

async def main():
    containment, code = sys.argv[1], sys.argv[2]
    run = RunLock()
    limits = Limits(wall_s=600, cpu_s=600)
    sandbox = SubprocessSandbox(limits, pool_size=2, warm=1, run=run,
                                cgroups=containment == 'cgroup')
    session = await sandbox.session()
    await session.python("open('episode.txt', 'w').write('an episode')")
    print(json.dumps(run.run_id), flush=True)
    await session.python(code)

asyncio.run(main())
"""

FREEZE_SUPERVISOR = (
    DAEMON
    + """
worker = os.getppid()
supervisor = parent_of(worker)
os.kill(supervisor, signal.SIGSTOP)
daemon(MARKER)
with open(READY, 'w') as f:
    f.write('frozen')
while not os.path.exists(GO):
    time.sleep(0.01)
os.kill(worker, signal.SIGKILL)
os._exit(0)
"""
)


@pytest.mark.parametrize("freeze", [False, True], ids=["plain", "frozen-supervisor"])
@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_a_sigkilled_trainer_leaves_no_process_and_no_work_folder_after_the_next_start(
    containment: Containment, freeze: bool, tmp_path: Path
) -> None:
    """Plain: the supervisor dies with the trainer and takes the daemon with it. Frozen: the
    snippet stopped the supervisor, the trainer is SIGKILLed, then the snippet kills its worker:
    the daemon is adopted by the frozen supervisor of a dead run, which the next start reaps.
    Either way the dead run's work folders (the episode's file in one) go at the next start."""
    marker = new_marker()
    ready, go = tmp_path / "ready", tmp_path / "go"
    if freeze:
        code = FREEZE_SUPERVISOR.replace("MARKER", repr(marker))
        code = code.replace("READY", repr(str(ready))).replace("GO", repr(str(go)))
    else:
        code = (
            DAEMON + f"daemon({marker!r})\nopen({str(ready)!r}, 'w').write('up')\ntime.sleep(600)"
        )
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    argv = [sys.executable, str(script), containment, code]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as trainer:
        try:
            assert trainer.stdout is not None
            line = trainer.stdout.readline()
            assert line, f"the trainer exited with {trainer.wait()}"
            run = json.loads(line)
            RUNS[run] = "subprocess"
            deadline = time.monotonic() + 30
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ready.exists() and running(["sleep", marker])
            folders = list(Path(tempfile.gettempdir()).glob(f"{work_folder_prefix(run)}*"))
            assert len(folders) == 2  # the session's and a warm one
            assert any((f / "episode.txt").exists() for f in folders)
            trainer.kill()
            trainer.wait()
            if freeze:
                go.touch()
                time.sleep(0.5)  # the worker is gone; the daemon waits under the frozen supervisor
                assert running(["sleep", marker])
            else:
                assert settled_gone(marker)  # the supervisor took it down with the trainer
            assert not run_is_alive(run)

            async def restart() -> None:
                sandbox = open_subprocess(containment)  # reaps dead runs as it starts
                await sandbox.close()
                sandbox.run_lock.release()

            asyncio.run(restart())
            assert settled_gone(marker)
            assert [f for f in folders if f.exists()] == []
        finally:
            trainer.kill()
            kill_all(running(["sleep", marker]))


def test_work_folders_of_dead_runs_go_at_start_and_a_live_runs_stay(tmp_path: Path) -> None:
    base = Path(tempfile.gettempdir())
    dead = RunLock()
    dead.release()  # no process holds its lock: a dead run
    live = RunLock()  # held by this process, like another trainer on the machine
    dead_folder = Path(tempfile.mkdtemp(prefix=work_folder_prefix(dead.run_id)))
    (dead_folder / "deep" / "er").mkdir(parents=True)
    (dead_folder / "deep" / "er" / "episode.txt").write_text("an episode")
    live_folder = Path(tempfile.mkdtemp(prefix=work_folder_prefix(live.run_id)))
    (live_folder / "episode.txt").write_text("in use")
    # Not a work folder of ours: a run id too short, and a link (to a folder it must not empty).
    unrelated = Path(tempfile.mkdtemp(prefix="turnrl-x-"))
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = base / f"{work_folder_prefix(dead.run_id)}symlink1"
    link.symlink_to(target)
    try:
        sandbox = open_subprocess("supervisor")
        asyncio.run(sandbox.close())
        sandbox.run_lock.release()
        assert not dead_folder.exists()
        assert (live_folder / "episode.txt").read_text() == "in use"
        assert unrelated.exists() and link.is_symlink()
        assert (target / "keep.txt").read_text() == "keep"
    finally:
        link.unlink(missing_ok=True)
        for folder in (dead_folder, live_folder, unrelated):
            shutil.rmtree(folder, ignore_errors=True)
        live.release()


def test_a_closing_sandbox_removes_its_own_work_folders_only() -> None:
    other = RunLock()
    other_folder = Path(tempfile.mkdtemp(prefix=work_folder_prefix(other.run_id)))

    async def main() -> tuple[str, str]:
        sandbox = open_subprocess("supervisor")
        prefix = work_folder_prefix(sandbox.run_id)
        try:
            session = await sandbox.session()
            result = await session.python("import os\nprint(os.getcwd())")
            assert result.stdout.strip().startswith(f"{tempfile.gettempdir()}/{prefix}"), result
            # A folder of this run that no worker owns (as a failed destroy would leave).
            stray = tempfile.mkdtemp(prefix=prefix)
        finally:
            await sandbox.close()
            sandbox.run_lock.release()
        return prefix, stray

    try:
        prefix, stray = asyncio.run(main())
        assert not Path(stray).exists()
        assert list(Path(tempfile.gettempdir()).glob(f"{prefix}*")) == []
        assert other_folder.exists()
    finally:
        shutil.rmtree(other_folder, ignore_errors=True)
        other.release()


@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_the_supervisor_holds_no_end_of_the_channel(containment: Containment) -> None:
    """The worker alone holds the protocol pipes: the supervisor's fds 0 and 1 are /dev/null."""

    async def main() -> None:
        sandbox = open_subprocess(containment)
        try:
            session = await sandbox.session()
            code = DAEMON + (
                "import json\nsup = parent_of(os.getppid())\n"
                "print(json.dumps([os.readlink(f'/proc/{sup}/fd/{fd}') for fd in (0, 1)]))"
            )
            result = await session.python(code)
            assert json.loads(result.stdout) == ["/dev/null", "/dev/null"], result
            await session.close()
        finally:
            await sandbox.close()
            sandbox.run_lock.release()

    asyncio.run(main())


def test_the_supervisor_does_not_outlive_a_trainer_that_dies_before_it_starts_work() -> None:
    """`--parent` names a process that is not its parent (the trainer died early): it exits at
    once and starts no worker."""
    from turnrl.sandboxes.local import SUPERVISOR_SOURCE

    marker = new_marker()
    argv = [sys.executable, "-I", "-c", SUPERVISOR_SOURCE, "--parent=1", "--"]
    proc = subprocess.run([*argv, "sleep", marker], timeout=30, check=False)
    assert proc.returncode == 0
    assert running(["sleep", marker]) == []


def test_the_sigterm_of_a_dying_trainer_makes_the_supervisor_end_the_tree() -> None:
    marker = new_marker()
    from turnrl.sandboxes.local import SUPERVISOR_SOURCE

    argv = [sys.executable, "-I", "-c", SUPERVISOR_SOURCE, f"--parent={os.getpid()}", "--"]
    worker = [sys.executable, "-c", DAEMON + f"daemon({marker!r})\ntime.sleep(600)"]
    with subprocess.Popen([*argv, *worker]) as supervisor:
        try:
            deadline = time.monotonic() + 30
            while not running(["sleep", marker]) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert running(["sleep", marker])
            supervisor.send_signal(signal.SIGTERM)
            assert supervisor.wait(timeout=30) == 0
            assert settled_gone(marker, within_s=0.5)
        finally:
            supervisor.kill()
            kill_all(running(["sleep", marker]))


MEMFD = """
import os
fd = os.memfd_create('fill')
chunk = b'x' * (1 << 20)
for _ in range(MB):
    os.write(fd, chunk)
print('wrote', MB)
"""


@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_memfd_pages_escape_rlimit_as_but_not_a_cgroup(containment: Containment) -> None:
    """A documented weakness, locked so that the docstring stays true: without a cgroup, memfd
    pages (like /dev/shm's) are never mapped and RLIMIT_AS does not bound them; a cgroup does."""
    limits = LIMITS.model_copy(update={"memory_mb": 64})  # the cgroup's, and each process's

    async def main() -> None:
        sandbox = open_subprocess(containment, limits)
        try:
            result = await sandbox.python(MEMFD.replace("MB", "160"))
        finally:
            await sandbox.close()
            sandbox.run_lock.release()
        if containment == "supervisor":
            assert result.completed and result.stdout == "wrote 160\n", result
        else:
            assert not result.completed and result.oom_killed, result

    asyncio.run(main())
