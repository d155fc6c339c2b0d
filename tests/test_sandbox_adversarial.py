"""Hostile code against every sandbox backend: each test runs one attack and asserts how it was
contained (the result's flags, the errno seen inside, the host unchanged, the pool still
serving), and that nothing of the run is left on the machine afterwards.

`bwrap` and `docker` get every case; `subprocess` (not a security boundary) only the cases it
promises: time limits, output capping and sanitising, leftover and zombie processes, and
recovering from a worker a snippet killed. Several cases are regression locks of weaknesses
this suite found and that were fixed: writable /dev, the launcher's environment, zombies of the
stateful interpreter, CPU time billed to the wrong call, orphans of a SIGKILLed trainer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from turnrl.sandboxes.base import ExecResult, Limits, Sandbox, SandboxSession
from turnrl.sandboxes.bwrap import bwrap_usable
from turnrl.sandboxes.config import BwrapConfig, DockerConfig, SubprocessConfig, open_sandbox
from turnrl.sandboxes.reaper import RunLock, tagged_processes

T = TypeVar("T")
Kind = Literal["bwrap", "docker", "subprocess"]
Mode = Literal["fresh", "stateful"]
MODES: list[Mode] = ["fresh", "stateful"]

LIMITS = Limits(wall_s=20, cpu_s=20, memory_mb=256, pids=64, output_bytes=64 * 1024, tmp_mb=16)
"""Generous defaults; each test tightens the limit it attacks. Wall and CPU are far above what
a snippet needs so that a loaded machine never turns a pass into a timeout."""
WRITE_REFUSED = {"EROFS", "EACCES", "EPERM", "ENOENT"}
FILL_REFUSED = WRITE_REFUSED | {"ENOSPC", "EINVAL"}  # EINVAL: a file in an mqueue mount
NS_REFUSED = {"EPERM", "ENOSPC", "EUSERS", "refused"}  # ENOSPC: max_user_namespaces is 0
UNREACHABLE = {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EACCES", "EPERM"}
ZERO_CAPS = "0000000000000000"
RUNS: dict[str, Kind] = {}
"""Every run this module opened, and its backend (checked for leftovers after each test and
at the end)."""


# --- backends -------------------------------------------------------------------------------


def _why_unusable(kind: Kind) -> str | None:
    if kind == "bwrap":
        return bwrap_usable()
    if kind == "docker":
        try:
            docker_module = importlib.import_module("turnrl.sandboxes.docker")
        except ImportError as e:
            return f"turnrl.sandboxes.docker cannot be imported: {e}"
        why: str | None = docker_module.docker_usable()
        return why
    return None


@dataclass(frozen=True)
class Backend:
    """Opens sandboxes of one kind, each under its own run id (recorded for the checks)."""

    kind: Kind

    def open(self, limits: Limits = LIMITS, pool_size: int = 1, warm: int = 0) -> Opened:
        run = RunLock()
        RUNS[run.run_id] = self.kind
        common: dict[str, Any] = {"limits": limits, "pool_size": pool_size, "warm": warm}
        config = {"bwrap": BwrapConfig, "docker": DockerConfig, "subprocess": SubprocessConfig}
        try:
            sandbox = open_sandbox(config[self.kind](**common), run)
        except BaseException:
            run.release()
            raise
        return Opened(sandbox, run)

    def scenario(
        self, body: Callable[[Sandbox], Awaitable[T]], limits: Limits = LIMITS, pool_size: int = 1
    ) -> T:
        """Run `body` on a fresh sandbox in its own event loop; the sandbox is closed after."""

        async def main() -> T:
            opened = self.open(limits, pool_size)
            try:
                return await body(opened.sandbox)
            finally:
                await opened.close()

        return asyncio.run(main())


@dataclass(frozen=True)
class Opened:
    sandbox: Sandbox
    run: RunLock

    async def close(self) -> None:
        try:
            await self.sandbox.close()
        finally:
            self.run.release()


def _params(*kinds: Kind) -> list[Any]:
    out = []
    for kind in kinds:
        marks: list[pytest.MarkDecorator] = [pytest.mark.docker] if kind == "docker" else []
        out.append(pytest.param(kind, id=kind, marks=marks))
    return out


ISOLATED = _params("bwrap", "docker")
ANY = _params("bwrap", "docker", "subprocess")


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    kind: Kind = request.param
    why = _why_unusable(kind)
    if why is not None:
        pytest.skip(f"{kind} backend not usable here: {why}")
    return Backend(kind)


@contextlib.asynccontextmanager
async def session_of(sandbox: Sandbox) -> AsyncIterator[SandboxSession]:
    session = await sandbox.session()
    try:
        yield session
    finally:
        await session.close()


def call(
    session: SandboxSession, mode: Mode, code: str, limits: Limits | None = None
) -> Awaitable[ExecResult]:
    if mode == "stateful":
        return session.python(code, limits)
    return session.python_fresh(code, limits)


def snippet(body: str, **args: object) -> str:
    """`body` with `args` bound as globals (JSON-encoded, so any value survives quoting)."""
    return f"import json\nglobals().update(json.loads({json.dumps(args)!r}))\n{body}"


def report(result: ExecResult) -> Any:
    """The JSON a snippet printed last; the snippet must have completed."""
    assert result.completed, result
    return json.loads(result.stdout.strip().splitlines()[-1])


async def works(sandbox: Sandbox) -> None:
    """The pool still serves: a new session on a new worker runs code."""
    async with session_of(sandbox) as session:
        result = await session.python_fresh("print(6 * 7)")
    assert result.ok and result.stdout == "42\n", result


# --- the host's view ------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (ppid, state, cmdline) of every process on the host."""
    table: dict[int, tuple[int, str, bytes]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0].decode(), cmdline)
    return table


def _running(argv: list[str]) -> list[int]:
    """Live (non-zombie) host processes whose command line is exactly `argv`."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    return [p for p, (_, state, cmd) in _proc_table().items() if cmd == want and state != "Z"]


def _host_zombies_of(run: str) -> list[int]:
    """Zombies among the descendants of the run's tagged processes, seen from the host."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    todo = [p for p, r in tagged_processes().items() if r == run]
    seen = set(todo)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return sorted(p for p in seen if table.get(p, (0, ""))[1] == "Z")


def _host_ipv4s() -> list[str]:
    """The host's own non-loopback IPv4 addresses (docker's bridge included)."""
    lines = Path("/proc/net/fib_trie").read_text().splitlines()
    found = {
        prev.split()[-1]
        for prev, line in itertools.pairwise(lines)
        if line.strip() == "/32 host LOCAL"
    }
    return sorted(ip for ip in found if not ip.startswith("127."))


def _containers_of(runs: Iterable[str]) -> list[str]:
    import docker

    client = docker.from_env(timeout=30)
    try:
        return [
            f"container {c['Id'][:12]} of run {run}"
            for run in runs
            for c in client.api.containers(all=True, filters={"label": f"turnrl.run_id={run}"})
        ]
    finally:
        client.close()


def _leftovers(runs: dict[str, Kind]) -> list[str]:
    """Processes, cgroups and containers of `runs` still on the machine."""
    left = [f"process {p} of run {r}" for p, r in tagged_processes().items() if r in runs]
    root = Path("/sys/fs/cgroup")
    for run in runs:
        for pattern in (f"*/turnrl-{run}-*", f"turnrl/turnrl-{run}-*", f"*/turnrl/turnrl-{run}-*"):
            left += [f"cgroup {d}" for d in root.glob(pattern)]
    docker_runs = [run for run, kind in runs.items() if kind == "docker"]
    return left + (_containers_of(docker_runs) if docker_runs else [])


def _settled_leftovers(runs: dict[str, Kind], within_s: float = 10.0) -> list[str]:
    """Leftovers once SIGKILLs already sent have landed (delivery is asynchronous)."""
    deadline = time.monotonic() + within_s
    while (left := _leftovers(runs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(autouse=True, scope="module")
def _suite_leaves_nothing() -> Iterator[None]:
    yield
    assert _settled_leftovers(RUNS) == []


@pytest.fixture(autouse=True)
def _test_leaves_nothing() -> Iterator[None]:
    before = set(RUNS)
    yield
    assert _settled_leftovers({r: k for r, k in RUNS.items() if r not in before}) == []


def _kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _marker() -> str:
    """A unique, valid `sleep` argument that names one test's processes on the host."""
    return f"{secrets.randbelow(10**8) + 10**8}.{secrets.randbelow(900) + 100}"


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


@pytest.mark.parametrize("backend", _params("bwrap", "docker"), indirect=True)
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


# --- the file system --------------------------------------------------------------------------

WRITE_OUTSIDE = """
import errno, os
out = {}
for path in PATHS:
    try:
        with open(path, 'a') as f:
            f.write(TOKEN)
        out[path] = 'written'
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e.errno))
for path in DIRS:
    try:
        os.mkdir(path)
        out[path] = 'created'
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_writes_outside_tmp_fail(backend: Backend) -> None:
    token = secrets.token_hex(8)
    paths = [
        "/usr/bin/python3",
        f"/usr/lib/turnrl-{token}",
        "/etc/passwd",
        f"/etc/turnrl-{token}",
        f"/turnrl-{token}",
        "/proc/sys/kernel/hostname",
        "/proc/sys/kernel/core_pattern",
        "/proc/sysrq-trigger",
        "/sys/kernel/uevent_helper",
    ]
    dirs = [f"/turnrl-dir-{token}", f"/usr/turnrl-dir-{token}", f"/etc/turnrl-dir-{token}"]

    async def body(sandbox: Sandbox) -> Any:
        return report(
            await sandbox.python(snippet(WRITE_OUTSIDE, PATHS=paths, DIRS=dirs, TOKEN=token))
        )

    out = backend.scenario(body)
    assert {p: e for p, e in out.items() if e not in WRITE_REFUSED} == {}
    assert [p for p in [*paths, *dirs] if token in p and Path(p).exists()] == []
    for path in ("/etc/passwd", "/proc/sys/kernel/hostname", "/proc/sys/kernel/core_pattern"):
        assert token not in Path(path).read_text(errors="replace")


PROBE = """
import hashlib, os
def probe(path):
    try:
        if os.path.isdir(path):
            return sorted(os.listdir(path))
        with open(path, 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        return type(e).__name__
print(json.dumps({path: probe(path) for path in PATHS}))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_host_files_are_invisible(backend: Backend, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(secrets.token_hex(16))
    project = Path(__file__).resolve().parents[1]
    paths = [
        "/etc/shadow",
        "/root",
        str(project),
        str(project / "pyproject.toml"),
        str(secret),
        str(tmp_path),
    ]

    async def body(sandbox: Sandbox) -> Any:
        return report(await sandbox.python(snippet(PROBE, PATHS=paths)))

    inside = backend.scenario(body)
    for path in paths:
        if Path(path).exists():  # on the host
            assert inside[path] in {"FileNotFoundError", "PermissionError"}, (path, inside[path])


ENV_SCAN = """
import os
seen = [k for k, v in os.environ.items() if TOKEN in k or TOKEN in v]
for pid in os.listdir('/proc'):
    if pid.isdigit():
        for leaf in ('environ', 'cmdline'):
            try:
                with open(f'/proc/{pid}/{leaf}', 'rb') as f:
                    if TOKEN.encode() in f.read():
                        seen.append(f'/proc/{pid}/{leaf}')
            except OSError:
                pass
print(json.dumps(seen))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_trainer_environment_variables_are_invisible(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = secrets.token_hex(12)
    monkeypatch.setenv("TURNRL_TEST_CANARY", token)
    monkeypatch.setenv("OPENAI_API_KEY", f"sk-{token}")

    async def body(sandbox: Sandbox) -> Any:
        async with session_of(sandbox) as session:
            fresh = report(await session.python_fresh(snippet(ENV_SCAN, TOKEN=token)))
            stateful = report(await session.python(snippet(ENV_SCAN, TOKEN=token)))
        return fresh + stateful

    assert backend.scenario(body) == []


@pytest.mark.parametrize("backend", _params("bwrap", "docker"), indirect=True)
def test_trainer_path_and_working_folder_are_invisible(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = secrets.token_hex(12)
    monkeypatch.setenv("PATH", f"/opt/{token}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}")
    cwd = tmp_path / f"project-{token}"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    async def body(sandbox: Sandbox) -> Any:
        return report(await sandbox.python(snippet(ENV_SCAN, TOKEN=token)))

    assert backend.scenario(body) == []


IPC = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
out = {'shm file': os.path.exists(SHM_FILE)}
if libc.shmget(KEY, 0, 0) == -1:
    out['sysv shm'] = errno.errorcode.get(ctypes.get_errno(), '?')
else:
    out['sysv shm'] = 'found'
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_host_ipc_objects_are_invisible(backend: Backend) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    key = secrets.randbelow(2**30) + 1
    # World-accessible, so only a separate IPC namespace (and /dev) can hide them.
    shmid = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    shm_file = Path(f"/dev/shm/turnrl-canary-{secrets.token_hex(6)}")
    shm_file.write_text("canary")
    shm_file.chmod(0o666)

    async def body(sandbox: Sandbox) -> Any:
        return report(await sandbox.python(snippet(IPC, KEY=key, SHM_FILE=str(shm_file))))

    try:
        out = backend.scenario(body)
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
        shm_file.unlink()
    assert out == {"shm file": False, "sysv shm": "ENOENT"}


# --- the network ------------------------------------------------------------------------------

CONNECT = """
import errno, socket
out = {}
for host, port in TARGETS:
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, port))
        out[f'{host}:{port}'] = 'connected'
    except socket.timeout:
        out[f'{host}:{port}'] = 'timeout'
    except OSError as e:
        out[f'{host}:{port}'] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b'x', ('1.1.1.1', 53))
    out['udp 1.1.1.1:53'] = 'sent'
except OSError as e:
    out['udp 1.1.1.1:53'] = errno.errorcode.get(e.errno, str(e.errno))
try:
    socket.getaddrinfo('example.com', 443)
    out['dns'] = 'resolved'
except socket.gaierror:
    out['dns'] = 'gaierror'
with open('/proc/net/dev') as f:
    out['interfaces'] = sorted(line.split(':')[0].strip() for line in f if ':' in line)
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_no_network_but_loopback(backend: Backend) -> None:
    loopback_only = socket.create_server(("127.0.0.1", 0))
    everywhere = socket.create_server(("0.0.0.0", 0))
    servers = [loopback_only, everywhere]
    port1, port2 = (s.getsockname()[1] for s in servers)
    targets = [
        ["1.1.1.1", 53],
        ["127.0.0.1", port1],
        ["127.0.0.1", port2],
        *([ip, port2] for ip in _host_ipv4s()),
    ]

    async def body(sandbox: Sandbox) -> Any:
        return report(await sandbox.python(snippet(CONNECT, TARGETS=targets)))

    try:
        out = backend.scenario(body)
        for server in servers:
            server.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing ever connected
                server.accept()
    finally:
        for server in servers:
            server.close()
    assert out.pop("interfaces") == ["lo"]
    assert out.pop("dns") == "gaierror"
    # Every attempt fails at once (no route, or nobody listening on the sandbox's own
    # loopback): refused or unreachable, never a timeout, never connected.
    assert {t: e for t, e in out.items() if e not in UNREACHABLE} == {}


# --- the kernel's knobs and privileges ---------------------------------------------------------

SYSCTLS = """
import errno, socket
out = {}
for path, value in WRITES:
    try:
        with open(path, 'w') as f:
            f.write(value)
        out[path] = 'written'
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e.errno))
try:
    socket.sethostname(TOKEN)
    out['sethostname'] = 'set'
except OSError as e:
    out['sethostname'] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_host_sysctls_cannot_be_written(backend: Backend) -> None:
    token = f"pwned{secrets.token_hex(4)}"
    knobs = ["kernel/hostname", "kernel/domainname", "net/ipv4/ip_forward", "vm/swappiness"]
    before = {k: Path(f"/proc/sys/{k}").read_text() for k in knobs}
    # Harmless values: the names get a canary, the others their current value.
    writes = [[f"/proc/sys/{k}", token if "name" in k else before[k]] for k in knobs]

    async def body(sandbox: Sandbox) -> Any:
        return report(await sandbox.python(snippet(SYSCTLS, WRITES=writes, TOKEN=token)))

    try:
        out = backend.scenario(body)
        after = {k: Path(f"/proc/sys/{k}").read_text() for k in knobs}
    finally:
        for k, value in before.items():  # undo an escape, should there be one
            if Path(f"/proc/sys/{k}").read_text() != value:
                Path(f"/proc/sys/{k}").write_text(value)
    assert after == before
    assert {p: e for p, e in out.items() if e not in WRITE_REFUSED} == {}


PRIVILEGES = """
import errno, os, shutil, subprocess
out = {'uid': os.getuid(), 'euid': os.geteuid()}
def attempt(name, fn):
    try:
        fn()
        out[name] = 'succeeded'
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
attempt('setuid', lambda: os.setuid(0))
attempt('setgid', lambda: os.setgid(0))
attempt('setgroups', lambda: os.setgroups([0]))
attempt('chroot', lambda: os.chroot('/tmp'))
with open('/proc/self/status') as f:
    status = dict(line.split(':', 1) for line in f if ':' in line)
for key in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs'):
    out[key] = status[key].strip()
tools = {}
su = shutil.which('su')
if su:
    p = subprocess.run([su, '-c', 'id -u', 'root'], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=10)
    tools['su'] = [p.returncode, p.stdout.strip()]
mount = shutil.which('mount')
if mount:
    os.makedirs('/tmp/m', exist_ok=True)
    p = subprocess.run([mount, '-t', 'tmpfs', 'none', '/tmp/m'], capture_output=True, timeout=10)
    tools['mount'] = [p.returncode, '']
with open('/proc/self/mounts') as f:
    out['mounted'] = any(line.split()[1] == '/tmp/m' for line in f)
out['tools'] = tools
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_no_privilege_is_gained(backend: Backend) -> None:
    async def body(sandbox: Sandbox) -> Any:
        return report(await sandbox.python(snippet(PRIVILEGES)))

    out = backend.scenario(body)
    assert out["uid"] != 0 and out["euid"] != 0
    for op in ("setuid", "setgid", "setgroups", "chroot"):
        assert out[op] in {"EPERM", "EINVAL"}, (op, out[op])
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert out[key] == ZERO_CAPS, (key, out[key])
    assert out["NoNewPrivs"] == "1"  # a setuid binary cannot raise privileges
    for tool, (code, uid) in out["tools"].items():  # present setuid tools fail like anyone
        assert code != 0 and uid != "0", (tool, code, uid)
    assert not out["mounted"]


UNSHARE = """
import ctypes, errno, shutil, subprocess
libc = ctypes.CDLL(None, use_errno=True)
FLAGS = {'user': 0x10000000, 'mount': 0x00020000, 'net': 0x40000000, 'pid': 0x20000000,
         'uts': 0x04000000, 'ipc': 0x08000000, 'cgroup': 0x02000000}
out = {}
for name, flag in FLAGS.items():
    if libc.unshare(flag) == 0:
        out[name] = 'succeeded'
    else:
        out[name] = errno.errorcode.get(ctypes.get_errno(), '?')
tool = shutil.which('unshare')
if tool:
    p = subprocess.run([tool, '-U', 'true'], capture_output=True, timeout=10)
    out['unshare -U'] = 'refused' if p.returncode else 'succeeded'
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_nested_namespaces_are_refused(backend: Backend) -> None:
    async def body(sandbox: Sandbox) -> Any:
        return report(await sandbox.python(snippet(UNSHARE)))

    out = backend.scenario(body)
    assert {k: v for k, v in out.items() if v not in NS_REFUSED} == {}


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
    marker = _marker()

    async def body(sandbox: Sandbox) -> None:
        async with session_of(sandbox) as session:
            started = await call(session, mode, snippet(DAEMONISE, MARKER=marker))
            on_host = _running(["sleep", marker])  # right after the call returned
            inside = await call(session, mode, snippet(STILL_THERE, MARKER=marker))
        assert isinstance(report(started), int)
        assert on_host == []
        assert report(inside) is False

    try:
        backend.scenario(body)
    finally:
        _kill(_running(["sleep", marker]))


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
    _params("bwrap", "docker", "subprocess"),
    indirect=True,
)
def test_sigkilled_trainer_leaves_nothing_after_the_next_start(
    backend: Backend, tmp_path: Path
) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    marker = _marker()
    argv = [sys.executable, str(script), backend.kind, marker]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as trainer:
        try:
            assert trainer.stdout is not None
            line = trainer.stdout.readline()
            assert line, f"the trainer exited with {trainer.wait()}"
            run = json.loads(line)
            RUNS[run] = backend.kind
            deadline = time.monotonic() + 60
            while len(_running(["sleep", marker])) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(_running(["sleep", marker])) == 3
            trainer.kill()
            trainer.wait()

            async def restart() -> None:
                await backend.open().close()  # a new sandbox reaps dead runs as it starts

            asyncio.run(restart())
            assert _settled_leftovers({run: backend.kind}, within_s=5) == []
            assert _running(["sleep", marker]) == []
        finally:
            trainer.kill()
            _kill(_running(["sleep", marker]))


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
            on_host = _host_zombies_of(run)
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
time.sleep(60)
"""

AFTERMATH = """
import os
print(json.dumps([os.path.exists('before.txt'), 'kept' in globals()]))
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ANY, indirect=True)
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


SIGNAL_HOST = """
import errno, os, signal
out = {}
for name, pid in TARGETS.items():
    try:
        os.kill(pid, signal.SIGKILL)
        out[name] = 'sent'
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
with open('/proc/1/cmdline', 'rb') as f:
    out['pid 1'] = f.read().decode(errors='replace')
print(json.dumps(out))
"""


def _start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat[stat.rindex(b")") + 2 :].split()[19].decode()


@contextlib.contextmanager
def _nobody_victim() -> Iterator[subprocess.Popen[bytes] | None]:
    """A host process with the sandbox's uid (65534) that no sandbox may signal."""
    if os.geteuid() != 0:
        yield None
        return
    victim = subprocess.Popen(["sleep", _marker()], user=65534, group=65534, extra_groups=[])
    try:
        yield victim
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_host_processes_cannot_be_signalled(backend: Backend) -> None:
    host_init = (Path("/proc/1/cmdline").read_bytes(), _start_time(1))
    with _nobody_victim() as victim:
        targets = {"trainer": os.getpid()} | ({"nobody": victim.pid} if victim else {})

        async def body(sandbox: Sandbox) -> Any:
            async with session_of(sandbox) as session:
                out = report(await session.python_fresh(snippet(SIGNAL_HOST, TARGETS=targets)))
                # Pid 1 in here is the sandbox's own init: signalling it may end the worker,
                # never the machine.
                await session.python_fresh("import os, signal\nos.kill(1, signal.SIGTERM)")
            await works(sandbox)
            return out

        out = backend.scenario(body)
        assert victim is None or victim.poll() is None
    assert out.pop("pid 1").encode() != host_init[0]
    assert {t: e for t, e in out.items() if e not in {"ESRCH", "EPERM"}} == {}
    assert (Path("/proc/1/cmdline").read_bytes(), _start_time(1)) == host_init


@pytest.mark.parametrize("backend", ISOLATED, indirect=True)
def test_kill_minus_one_reaches_only_the_sandbox(backend: Backend) -> None:
    with _nobody_victim() as victim:

        async def body(sandbox: Sandbox) -> ExecResult:
            async with session_of(sandbox) as session:
                result = await session.python_fresh("import os\nos.kill(-1, 9)")
            await works(sandbox)
            return result

        result = backend.scenario(body)
        assert victim is None or victim.poll() is None
    # Everything it may signal is in the sandbox: its worker died, nothing outside did.
    assert result.error is not None and result.state_lost, result


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
    _params("bwrap", "docker", "subprocess"),
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
