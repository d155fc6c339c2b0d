"""Hostile code against every sandbox backend: resources and lifecycle. Each test runs one
attack and asserts how it was contained (the result's flags, the host unchanged, the pool still
serving), and that nothing of the run is left on the machine afterwards.

`bwrap` and `docker` get every case; `subprocess` (not a security boundary) only the cases it
promises: time limits, output capping and sanitising, leftover and zombie processes, and
recovering from a worker a snippet killed. What a snippet cannot reach is in
`test_sandbox_isolation.py`. Several cases are regression locks of weaknesses this suite found
and that were fixed: writable /dev, zombies of the stateful interpreter, CPU time billed to the
wrong call, orphans of a SIGKILLed trainer.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sandbox_attacks import (
    ANY,
    ISOLATED,
    LIMITS,
    MODES,
    RUNS,
    WRITE_REFUSED,
    Backend,
    Mode,
    call,
    host_zombies_of,
    kill_all,
    new_marker,
    params,
    report,
    running,
    session_of,
    settled_leftovers,
    snippet,
    works,
)

from turnrl.sandboxes.base import ExecResult, Sandbox

pytestmark = pytest.mark.usefixtures("leaves_nothing")

FILL_REFUSED = WRITE_REFUSED | {"ENOSPC", "EINVAL"}  # EINVAL: a file in an mqueue mount


# --- resource exhaustion --------------------------------------------------------------------

FORK_BOMB = """
import errno, os
def bomb():
    while True:
        try:
            os.fork()
        except OSError:
            pass
seen = None
for _ in range(100000):
    try:
        pid = os.fork()
    except OSError as e:
        seen = errno.errorcode[e.errno]
        break
    if pid == 0:
        bomb()
print(json.dumps(seen))
"""

COUNT_PROCESSES = "import os\nprint(json.dumps(sum(p.isdigit() for p in os.listdir('/proc'))))"


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_fork_bomb_hits_the_pids_limit_and_is_swept(backend: Backend) -> None:
    limits = LIMITS.model_copy(update={"pids": 32, "wall_s": 10})

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            bombed = await session.python_fresh(snippet(FORK_BOMB), limits)
            # The bomb keeps forking after its parent returned: the sweep must still win.
            after = await session.python_fresh(snippet(COUNT_PROCESSES))
        assert report(bombed) == "EAGAIN"
        assert report(after) <= 4  # init, worker, this call (and a kernel if one ran)
        await works(sandbox)

    backend.scenario(body, limits)


MEMORY_BOMB = "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_memory_bomb_is_oom_killed(backend: Backend, mode: Mode) -> None:
    limits = LIMITS.model_copy(update={"memory_mb": 128})

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            result = await call(session, mode, MEMORY_BOMB)
            after = await call(session, mode, "print('still here')")
        assert result.oom_killed and not result.completed, result
        assert result.signal == signal.SIGKILL or result.error is not None, result
        if mode == "stateful":
            assert result.state_lost
        assert after.ok and after.stdout == "still here\n", after
        await works(sandbox)

    backend.scenario(body, limits)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_wall_limit_ends_a_sleeping_call(backend: Backend, mode: Mode) -> None:
    limits = LIMITS.model_copy(update={"wall_s": 1.5})

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            await session.python("kept = 41")
            t0 = time.monotonic()
            result = await call(session, mode, "import time\ntime.sleep(600)", limits)
            took = time.monotonic() - t0
            after = await session.python("print(kept + 1)")
        assert result.timed_out and not result.completed, result
        assert took < limits.wall_s + 15
        if mode == "stateful":  # interrupted like a notebook cell: the variables survive
            assert not result.state_lost and result.exception == "KeyboardInterrupt: "
        assert after.ok and after.stdout == "42\n", after
        await works(sandbox)

    backend.scenario(body)


IGNORES_INTERRUPTS = """
import time
while True:
    try:
        time.sleep(600)
    except KeyboardInterrupt:
        pass
"""


@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_wall_limit_kills_a_kernel_that_ignores_interrupts(backend: Backend) -> None:
    limits = LIMITS.model_copy(update={"wall_s": 1.5})

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            result = await session.python(IGNORES_INTERRUPTS, limits)
            after = await session.python("print('fresh kernel')")
        assert result.timed_out and result.state_lost and not result.completed, result
        assert after.ok and after.stdout == "fresh kernel\n", after

    backend.scenario(body)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_cpu_limit_ends_a_busy_loop_before_the_wall_limit(backend: Backend, mode: Mode) -> None:
    limits = LIMITS.model_copy(update={"cpu_s": 1, "wall_s": 120})

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            result = await call(session, mode, "while True:\n    pass\n", limits)
            after = await call(session, mode, "print('next')")
        assert result.timed_out and not result.completed, result
        assert result.signal == signal.SIGXCPU, result  # the CPU limit, not the wall clock
        assert after.ok and after.stdout == "next\n", after

    backend.scenario(body)


FILL = """
import errno, os
written, failure = 0, None
try:
    with open(os.path.join(PLACE, 'fill'), 'wb') as f:
        for _ in range(CHUNKS):
            f.write(b'x' * (1 << 20))
            f.flush()
            written += 1
except OSError as e:
    failure = errno.errorcode.get(e.errno, str(e.errno))
try:
    os.remove(os.path.join(PLACE, 'fill'))
except OSError:
    pass
print(json.dumps([written, failure]))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_filling_tmp_stops_at_its_size(backend: Backend) -> None:
    limits = LIMITS.model_copy(update={"tmp_mb": 8})

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            result = await session.python_fresh(snippet(FILL, PLACE="/tmp", CHUNKS=64))
            again = await session.python_fresh(snippet(FILL, PLACE="/tmp", CHUNKS=2))
        written, failure = report(result)
        assert failure == "ENOSPC" and limits.tmp_mb // 2 <= written <= limits.tmp_mb
        assert report(again) == [2, None]  # freed space is usable again

    backend.scenario(body, limits)


@pytest.mark.parametrize("backend", params("bwrap", "docker"), indirect=True)
def test_no_writable_place_but_tmp_holds_more_than_tmp_mb(backend: Backend) -> None:
    limits = LIMITS.model_copy(update={"tmp_mb": 4})
    places = ["/", "/dev", "/dev/shm", "/dev/mqueue", "/var/tmp", "/run", "/home", "/usr"]

    async def body(sandbox: Sandbox) -> dict[str, Any]:
        async with session_of(sandbox) as session:
            return {
                place: report(await session.python_fresh(snippet(FILL, PLACE=place, CHUNKS=12)))
                for place in places
            }

    found = backend.scenario(body, limits)
    assert {p: w for p, (w, _) in found.items() if w > limits.tmp_mb} == {}
    assert {p: e for p, (_, e) in found.items() if e not in FILL_REFUSED} == {}


# --- processes ----------------------------------------------------------------------------------

DAEMONISE = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open('daemon.pid.tmp', 'w') as f:
            f.write(str(os.getpid()))
        os.rename('daemon.pid.tmp', 'daemon.pid')
        os.execvp('sleep', ['sleep', MARKER])
    os._exit(0)
while not os.path.exists('daemon.pid'):
    time.sleep(0.01)
pid = int(open('daemon.pid').read())
while MARKER.encode() not in open(f'/proc/{pid}/cmdline', 'rb').read():
    time.sleep(0.01)
print(json.dumps(pid))
"""

STILL_THERE = """
pid = int(open('daemon.pid').read())
try:
    alive = MARKER.encode() in open(f'/proc/{pid}/cmdline', 'rb').read()
except OSError:
    alive = False
print(json.dumps(alive))
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_daemonised_grandchild_dies_with_its_call(backend: Backend, mode: Mode) -> None:
    marker = new_marker()

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            started = await call(session, mode, snippet(DAEMONISE, MARKER=marker))
            on_host = running(["sleep", marker])  # right after the call returned
            inside = await call(session, mode, snippet(STILL_THERE, MARKER=marker))
        assert isinstance(report(started), int)
        assert on_host == []
        assert report(inside) is False

    try:
        backend.scenario(body)
    finally:
        kill_all(running(["sleep", marker]))


TRAINER = """
import asyncio, json, sys
from turnrl.sandboxes.base import Limits
from turnrl.sandboxes.config import BwrapConfig, DockerConfig, SubprocessConfig, open_sandbox
from turnrl.sandboxes.reaper import RunLock

SLEEPERS = '''
import subprocess, time
for _ in range(3):
    subprocess.Popen(['sleep', MARKER], start_new_session=True)
time.sleep(1000)
'''

async def main():
    kind, marker = sys.argv[1], sys.argv[2]
    run = RunLock()
    config = {'bwrap': BwrapConfig, 'docker': DockerConfig, 'subprocess': SubprocessConfig}[kind]
    limits = Limits(wall_s=600, cpu_s=600)
    sandbox = open_sandbox(config(limits=limits, pool_size=2, warm=1), run)
    session = await sandbox.session()
    print(json.dumps(run.run_id), flush=True)
    await session.python(SLEEPERS.replace('MARKER', repr(marker)))

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "backend",
    params("bwrap", "docker", "subprocess"),
    indirect=True,
)
def test_sigkilled_trainer_leaves_nothing_after_the_next_start(
    backend: Backend, tmp_path: Path
) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    marker = new_marker()
    argv = [sys.executable, str(script), backend.kind, marker]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as trainer:
        try:
            assert trainer.stdout is not None
            line = trainer.stdout.readline()
            assert line, f"the trainer exited with {trainer.wait()}"
            run = json.loads(line)
            RUNS[run] = backend.kind
            deadline = time.monotonic() + 60
            while len(running(["sleep", marker])) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(running(["sleep", marker])) == 3
            trainer.kill()
            trainer.wait()

            async def restart() -> None:
                await backend.open().close()  # a new sandbox reaps dead runs as it starts

            asyncio.run(restart())
            assert settled_leftovers({run: backend.kind}, within_s=5) == []
            assert running(["sleep", marker]) == []
        finally:
            trainer.kill()
            kill_all(running(["sleep", marker]))


MAKE_ZOMBIES = """
import os
for _ in range(200):
    if os.fork() == 0:
        os._exit(0)
"""

COUNT_ZOMBIES = """
import os
kids, state = {}, {}
for name in os.listdir('/proc'):
    if name.isdigit():
        try:
            with open(f'/proc/{name}/stat', 'rb') as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b')') + 2:].split()
        state[int(name)] = fields[0].decode()
        kids.setdefault(int(fields[1]), []).append(int(name))
todo, found = [os.getppid()], []
while todo:
    for child in kids.get(todo.pop(), []):
        todo.append(child)
        found.append(child)
print(json.dumps(sum(state[p] == 'Z' for p in found)))
"""


@pytest.mark.parametrize(
    "mode",
    ["fresh", "stateful"],
)
@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_unwaited_children_leave_no_zombies(backend: Backend, mode: Mode) -> None:
    limits = LIMITS.model_copy(update={"pids": 256})

    async def body(sandbox: Sandbox, run: str) -> None:
        async with session_of(sandbox) as session:
            made = await call(session, mode, MAKE_ZOMBIES)
            on_host = host_zombies_of(run)
            # Counted among the worker's descendants by a call of its own.
            inside = await session.python_fresh(snippet(COUNT_ZOMBIES))
        assert made.completed, made
        assert on_host == []
        assert report(inside) == 0

    async def main() -> None:
        opened = backend.open(limits)
        try:
            await body(opened.sandbox, opened.run.run_id)
        finally:
            await opened.close()

    asyncio.run(main())


FLOOD = """
import sys
out = sys.stdout.buffer
out.write(b'HEAD')
chunk = b'x' * (1 << 20)
for _ in range(100):
    out.write(chunk)
out.write(b'TAIL')
out.flush()
sys.stderr.write('e' * (1 << 20))
"""


@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_output_flood_is_capped_keeping_head_and_tail(backend: Backend) -> None:
    cap = LIMITS.output_bytes

    async def body(sandbox: Sandbox) -> tuple[ExecResult, float]:
        t0 = time.monotonic()
        result = await sandbox.python(FLOOD)
        return result, time.monotonic() - t0

    result, took = backend.scenario(body)
    assert took < 20
    assert result.completed and result.truncated, result.model_copy(update={"stdout": ""})
    total = 4 + 100 * (1 << 20) + 4
    assert result.stdout == (
        "HEAD"
        + "x" * (cap // 2 - 4)
        + f"\n…[{total - cap} bytes cut]…\n"
        + "x" * (cap // 2 - 4)
        + "TAIL"
    )
    assert len(result.stderr) < cap + 64


NASTY_BYTES = (
    b"ok\xff\xfe|\x00|\x1b[31mred\x1b[0m|\x1b]0;title\x07|\x07\x08|\xc2\x9b2J|tab\there\r\nend\n"
)


@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_output_is_decoded_and_stripped_of_controls(backend: Backend) -> None:
    code = (
        f"import sys\nsys.stdout.buffer.write({NASTY_BYTES!r})\n"
        f"sys.stderr.buffer.write({NASTY_BYTES!r})\n"
    )
    # \xff \xfe: invalid UTF-8 -> two U+FFFD; NUL, CSI colour, OSC title, BEL, BS and the
    # 8-bit CSI (U+009B 2 J) vanish; \r\n -> \n; tab stays.
    expected = "ok\ufffd\ufffd||red||||tab\there\nend\n"

    async def body(sandbox: Sandbox) -> list[ExecResult]:
        async with session_of(sandbox) as session:
            return [await session.python_fresh(code), await session.python(code)]

    for result in backend.scenario(body):
        assert result.completed and not result.truncated, result
        assert result.stdout == expected and result.stderr == expected


KILL_WORKER = """
import os, signal
with open('before.txt', 'w') as f:
    f.write('x')
kept = 1
os.kill(os.getppid(), signal.SIGKILL)
import time
time.sleep(1)
print("survived")
"""

AFTERMATH = """
import os
print(json.dumps([os.path.exists('before.txt'), 'kept' in globals()]))
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_snippet_cannot_kill_its_worker(backend: Backend, mode: Mode) -> None:
    """The worker is the sandbox's pid 1: a signal from inside its pid namespace cannot kill
    it (the kernel drops it), so the session and its files survive."""

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            result = await call(session, mode, KILL_WORKER)
            after = await call(session, mode, snippet(AFTERMATH))
        assert result.ok and result.stdout == "survived\n", result
        assert report(after) == [True, mode == "stateful"]
        assert not after.state_lost

    backend.scenario(body)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", params("subprocess"), indirect=True)
def test_snippet_killing_its_worker_is_reported_and_replaced(backend: Backend, mode: Mode) -> None:
    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            result = await call(session, mode, KILL_WORKER)
            after = await call(session, mode, snippet(AFTERMATH))
        assert result.error is not None and result.state_lost and not result.ok, result
        assert report(after) == [False, False]  # a fresh worker: files and variables gone
        assert not after.state_lost  # the loss was reported once, by the call that caused it
        await works(sandbox)

    backend.scenario(body)


@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_kernel_killing_itself_loses_only_the_variables(backend: Backend) -> None:
    code = "with open('before.txt', 'w') as f:\n    f.write('x')\nkept = 1\n"
    suicide = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            await session.python(code)
            result = await session.python(suicide)
            after = await session.python(snippet(AFTERMATH))
        assert result.state_lost and result.signal == signal.SIGKILL and result.error is None
        assert report(after) == [True, False]  # same worker: files kept, variables gone

    backend.scenario(body)


BURN_AFTER_RETURN = """
import os, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while time.process_time() < 1.0:
            pass
        os.write(w, b'x')
        while True:
            pass
    os._exit(0)
os.read(r, 1)
"""


@pytest.mark.parametrize(
    "backend",
    params("bwrap", "docker", "subprocess"),
    indirect=True,
)
def test_cpu_time_of_leftovers_is_not_billed_to_the_next_call(backend: Backend) -> None:
    async def body(sandbox: Sandbox) -> ExecResult:
        async with session_of(sandbox) as session:
            # The daemonised burner has used 1 s of CPU when the call returns; the sweep
            # kills it.
            first = await session.python_fresh(BURN_AFTER_RETURN)
            assert first.completed, first
            return await session.python_fresh("pass")

    second = backend.scenario(body)
    assert second.cpu_s < 0.5, second


FORGED_REPORT = """
import os, time
os.write(3, json.dumps({'completed': True}).encode() + b'\\n')
time.sleep(1)
print('printed by the forger')
"""


@pytest.mark.parametrize("backend", ANY, indirect=True)
def test_forged_report_cannot_speak_for_a_fresh_call(backend: Backend) -> None:
    """A stateful snippet can make its own session's stateful results lag (same trust domain),
    but a `python_fresh` call of that session (how a grader should check) reports itself."""

    async def body(sandbox: Sandbox) -> ExecResult:
        async with session_of(sandbox) as session:
            await session.python(snippet(FORGED_REPORT))
            return await session.python_fresh("import time\ntime.sleep(1.5)\nprint('mine')")

    result = backend.scenario(body)
    assert result.completed and result.stdout == "mine\n", result
