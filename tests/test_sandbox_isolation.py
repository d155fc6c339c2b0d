"""Hostile code against the isolating sandbox backends, `bwrap` and `docker`: what a snippet
cannot reach. Each test runs one attack and asserts how it was contained (the errno seen inside,
the host unchanged, the pool still serving), and that nothing of the run is left on the machine
afterwards.

Covered: writes outside /tmp, host files, the trainer's environment and secrets, host IPC
objects, the network and DNS, host sysctls, privileges (setuid, capabilities, setuid tools,
nested namespaces), and signalling host processes. `subprocess` is not a security boundary and
gets none of these; resources and lifecycle are in `test_sandbox_limits.py`. One case is a
regression lock of a weakness this suite found and that was fixed: the launcher's environment
(its PATH and working folder) seen inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_attacks import (
    ISOLATED,
    WRITE_REFUSED,
    Backend,
    new_marker,
    params,
    report,
    session_of,
    snippet,
    works,
)

from turnrl.sandboxes.base import ExecResult, Sandbox

pytestmark = pytest.mark.usefixtures("leaves_nothing")

NS_REFUSED = {"EPERM", "ENOSPC", "EUSERS", "refused"}  # ENOSPC: max_user_namespaces is 0
UNREACHABLE = {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EACCES", "EPERM"}
ZERO_CAPS = "0000000000000000"


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


@pytest.mark.parametrize("backend", params("bwrap", "docker"), indirect=True)
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


def _host_ipv4s() -> list[str]:
    """The host's own non-loopback IPv4 addresses (docker's bridge included)."""
    lines = Path("/proc/net/fib_trie").read_text().splitlines()
    found = {
        prev.split()[-1]
        for prev, line in itertools.pairwise(lines)
        if line.strip() == "/32 host LOCAL"
    }
    return sorted(ip for ip in found if not ip.startswith("127."))


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


# --- host processes ---------------------------------------------------------------------------

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
    victim = subprocess.Popen(["sleep", new_marker()], user=65534, group=65534, extra_groups=[])
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

        async def body(sandbox: Sandbox) -> tuple[ExecResult, ExecResult]:
            async with session_of(sandbox) as session:
                result = await session.python_fresh("import os\nos.kill(-1, 9)")
                after = await session.python_fresh("print('still here')")
            await works(sandbox)
            return result, after

        result, after = backend.scenario(body)
        assert victim is None or victim.poll() is None
    # Everything it may signal is in the sandbox, and the worker is its pid 1, which a signal
    # from inside cannot kill: there was no one to signal, and the session goes on.
    assert result.exception == "ProcessLookupError: [Errno 3] No such process", result
    assert after.ok and after.stdout == "still here\n" and not after.state_lost
