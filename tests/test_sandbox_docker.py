"""The docker backend against a real dockerd: calls, and one adversarial test per property its
module docstring claims (network, read-only root, sizes, memory, pids, uid, capabilities,
no-new-privileges, labels, reaping)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from turnrl.sandboxes.base import Limits
from turnrl.sandboxes.docker import (
    EXPIRES_LABEL,
    LOCKS_LABEL,
    RUN_LABEL,
    DockerSandbox,
    container_labels,
    docker_usable,
)
from turnrl.sandboxes.pool import PoolSession
from turnrl.sandboxes.reaper import RunLock
from turnrl.sandboxes.uids import UID_BASE, UID_COUNT

_why_not = docker_usable()
if _why_not is not None:
    pytest.skip(f"docker is not usable here: {_why_not}", allow_module_level=True)

pytestmark = pytest.mark.docker

T = TypeVar("T")
Check = Callable[[DockerSandbox, PoolSession], Awaitable[T]]


def in_session(check: Check[T], limits: Limits | None = None, **kw: Any) -> T:
    """Run `check` on a fresh one-worker sandbox and session, then close both."""

    async def main() -> T:
        sandbox = DockerSandbox(limits=limits, pool_size=2, warm=0, **kw)
        try:
            return await check(sandbox, await sandbox.session())
        finally:
            await sandbox.close()

    return asyncio.run(main())


def containers_of(sandbox: DockerSandbox, run_id: str | None = None) -> list[dict[str, Any]]:
    label = f"{RUN_LABEL}={run_id or sandbox.run_id}"
    found: list[dict[str, Any]] = sandbox.client.api.containers(all=True, filters={"label": label})
    return found


def one_container(sandbox: DockerSandbox) -> dict[str, Any]:
    (info,) = containers_of(sandbox)
    inspected: dict[str, Any] = sandbox.client.api.inspect_container(info["Id"])
    return inspected


def test_python_state_files_and_programs() -> None:
    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        assert (await s.python("x = 41")).ok
        r = await s.python("print(x + 1)")
        assert (r.stdout, r.ok) == ("42\n", True)
        r = await s.python_fresh("print(x)")
        assert not r.completed and r.exception is not None
        assert r.exception.startswith("NameError")
        assert (await s.python_fresh("open('/tmp/f', 'w').write('kept')")).ok
        r = await s.run(["sh", "-c", "cat /tmp/f; echo; cat; ls /tmp"], stdin=b"from stdin\n")
        assert r.exit_code == 0 and r.stdout == "kept\nfrom stdin\nf\n"
        r = await s.run(["ls", "/nonexistent"])
        assert r.exit_code == 2 and "nonexistent" in r.stderr
        r = await s.run(["no-such-program"])
        assert r.exit_code == 127
        r = await s.python("while True: pass", Limits(wall_s=1.0))
        assert r.timed_out and not r.state_lost
        assert (await s.python("print(x)")).stdout == "41\n"
        r = await sandbox.python("import sys; print(sys.version_info[:2] >= (3, 11))")
        assert r.stdout == "True\n"
        assert (await sandbox.run(["echo", "one-shot"])).stdout == "one-shot\n"

    in_session(check)


def test_frame_length_holding_the_detach_keys() -> None:
    """A request whose length header holds ctrl-p ctrl-q (0x10 0x11), docker's default detach
    sequence, goes through: the attached stdin is raw when there is no tty."""

    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        worker = await sandbox.pool.acquire()
        try:
            pad = 0x1011 - len(json.dumps({"op": "ping", "pad": ""}))
            assert await worker.call({"op": "ping", "pad": "a" * pad}, 10.0) == {"pong": True}
            assert await worker.call({"op": "ping"}, 10.0) == {"pong": True}
        finally:
            await sandbox.pool.release(worker)

    in_session(check)


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP server on all of the host's addresses; yields its port."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"reached")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


CONNECT = """
import socket, sys
for host in sys.argv[1:] or HOSTS:
    try:
        with socket.create_connection((host, PORT), timeout=2) as c:
            print(host, c.recv(16).decode())
    except OSError as e:
        print(host, type(e).__name__)
"""


def test_network_none_reaches_neither_host_nor_bridge_nor_dns(host_server: int) -> None:
    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        ipam = sandbox.client.networks.get("bridge").attrs["IPAM"]["Config"][0]
        # Older daemons leave the default bridge's gateway out: it is the subnet's first host.
        bridge = ipam.get("Gateway") or str(next(ipaddress.ip_network(ipam["Subnet"]).hosts()))
        hosts = [bridge, "127.0.0.1"]
        code = CONNECT.replace("HOSTS", repr(hosts)).replace("PORT", str(host_server))
        # Control: the same probe from a container on the default bridge reaches the host.
        control = sandbox.client.containers.run(
            sandbox.image, ["/usr/bin/python3", "-c", code, bridge], remove=True
        )
        assert control.decode() == f"{bridge} reached\n"
        r = await s.python(code)
        assert "reached" not in r.stdout and len(r.stdout.splitlines()) == 2, r
        r = await s.python(
            "import socket\ntry:\n    socket.getaddrinfo('example.com', 80)\n"
            "except socket.gaierror:\n    print('no dns')"
        )
        assert r.stdout == "no dns\n"
        r = await s.run(["cat", "/proc/net/dev"])
        devices = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:]]
        assert devices == ["lo"]

    in_session(check)


def test_root_is_read_only_and_tmp_is_writable() -> None:
    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        r = await s.python(
            "for p in ('/etc/x', '/usr/x', '/x', '/usr/lib/python3.11/os.py'):\n"
            "    try:\n        open(p, 'a').close(); print(p, 'written')\n"
            "    except OSError as e:\n        print(p, e.errno)"
        )
        assert "written" not in r.stdout and len(r.stdout.splitlines()) == 4
        r = await s.run(["cat", "/proc/self/mounts"])
        mounts = {f[1]: f[3].split(",") for f in (line.split() for line in r.stdout.splitlines())}
        assert "ro" in mounts["/"] and "rw" in mounts["/tmp"]
        assert {"nosuid", "nodev"} <= set(mounts["/tmp"])
        assert (await s.run(["sh", "-c", "echo hi > /tmp/a && cat /tmp/a"])).stdout == "hi\n"

    in_session(check)


def test_tmp_size_is_bounded() -> None:
    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        r = await s.python(
            "import errno\nn = 0\ntry:\n    with open('/tmp/big', 'wb') as f:\n"
            "        for _ in range(64):\n"
            "            f.write(b'x' * (1 << 20)); f.flush(); n += 1\n"
            "except OSError as e:\n    print(n, e.errno == errno.ENOSPC)"
        )
        written, enospc = r.stdout.split()
        assert enospc == "True" and int(written) <= 4

    in_session(check, Limits(tmp_mb=4))


def test_memory_limit_kills_the_snippet_and_says_so() -> None:
    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        r = await s.python_fresh("x = b'x' * (256 << 20)\nprint('survived')")
        assert r.oom_killed and not r.ok and r.stdout == ""
        assert (await s.python("y = 1")).ok
        r = await s.python("x = b'x' * (256 << 20)")
        assert r.oom_killed and r.state_lost
        r = await s.python("print('after')")
        assert r.ok and r.stdout == "after\n"

    in_session(check, Limits(memory_mb=64))


def _worker_pid(sandbox: DockerSandbox) -> int:
    """The worker's host pid: it is the container's init."""
    return int(one_container(sandbox)["State"]["Pid"])


def test_worker_killed_by_the_memory_limit_is_reported() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make the worker the OOM killer's first choice")

    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        assert (await s.python("y = 1")).ok  # the interpreter starts before the change
        adj = Path(f"/proc/{_worker_pid(sandbox)}/oom_score_adj")
        await asyncio.to_thread(adj.write_text, "1000")
        r = await s.python("x = b'x' * (256 << 20)")
        assert r.oom_killed and r.state_lost and r.error is not None
        assert "memory limit" in r.error
        r = await s.python("print('fresh worker')")
        assert r.ok and r.stdout == "fresh worker\n"

    in_session(check, Limits(memory_mb=64))


def test_worker_killed_otherwise_after_an_oom_is_not_called_oom() -> None:
    """Docker's `OOMKilled` stays set after the first OOM kill; a later death is not OOM."""

    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        assert (await s.python_fresh("x = b'x' * (256 << 20)")).oom_killed
        # The worker is the container's pid 1, out of its own code's reach: killed from outside.
        os.kill(_worker_pid(sandbox), signal.SIGKILL)
        r = await s.python_fresh("print(0)")
        assert r.error is not None and r.state_lost and not r.oom_killed
        assert (await s.python("print(1)")).stdout == "1\n"

    in_session(check, Limits(memory_mb=64))


def test_pids_limit_contains_a_fork_bomb() -> None:
    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        r = await s.python(
            "import os, time\nn = 0\ntry:\n    for _ in range(1000):\n"
            "        if os.fork() == 0:\n            time.sleep(60); os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.errno)"
        )
        forked, err = r.stdout.split()
        assert int(forked) < 32 and int(err) == errno.EAGAIN
        await s.run(["sh", "-c", "b() { b | b & }; b; sleep 2"], limits=Limits(wall_s=3.0))
        # Usable afterwards (on the same worker or a replacement), with the bomb swept away.
        r = await s.python("import os; print(len([p for p in os.listdir('/proc') if p.isdigit()]))")
        assert r.ok and int(r.stdout) == 2  # the worker (pid 1), the interpreter

    in_session(check, Limits(pids=32))


def test_code_runs_as_a_uid_of_its_own() -> None:
    """Each container runs as a uid leased from the reserved range, unlike any other's (per-user
    kernel resources are not shared)."""

    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        ids = "import os; print(os.getuid(), os.geteuid(), os.getgid())"
        uid, euid, gid = map(int, (await s.python(ids)).stdout.split())
        assert uid == euid == gid and UID_BASE <= uid < UID_BASE + UID_COUNT
        assert (await s.run(["id", "-u"])).stdout == f"{uid}\n"
        other = await sandbox.session()
        try:
            assert int((await other.python(ids)).stdout.split()[0]) != uid
        finally:
            await other.close()

    in_session(check)


def test_no_capabilities_no_new_privileges_and_seccomp() -> None:
    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        r = await s.run(["cat", "/proc/self/status"])
        status = dict(line.split(":\t", 1) for line in r.stdout.splitlines() if ":\t" in line)
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, cap
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"

    in_session(check)


def test_container_settings_and_labels() -> None:
    """Regression lock on the container's profile; change it only with a decision."""

    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        assert (await s.python("pass")).ok
        info = one_container(sandbox)
        labels = info["Config"]["Labels"]
        assert labels[RUN_LABEL] == sandbox.run_id
        assert abs(float(labels[EXPIRES_LABEL]) - (time.time() + 120)) < 60
        host = info["HostConfig"]
        assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"]
        assert host["Memory"] == host["MemorySwap"] == 96 << 20
        assert host["PidsLimit"] == 40 and host["NanoCpus"] == 500_000_000
        assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
        assert not host["Init"] and not host["AutoRemove"] and host["LogConfig"]["Type"] == "none"
        assert "size=8m" in host["Tmpfs"]["/tmp"]
        env_names = [e.split("=")[0] for e in info["Config"]["Env"] or []]
        uid = int(info["Config"]["User"].split(":")[0])
        assert info["Config"]["User"] == f"{uid}:{uid}" and env_names in ([], ["PATH"])
        assert UID_BASE <= uid < UID_BASE + UID_COUNT

    in_session(check, Limits(memory_mb=96, pids=40, tmp_mb=8), cpus=0.5, ttl_s=120.0)


def test_reaper_removes_dead_and_expired_runs_and_spares_live_ones() -> None:
    import docker

    async def check(sandbox: DockerSandbox, s: PoolSession) -> None:
        client = sandbox.client
        dead = RunLock()
        dead.release()
        live = RunLock()
        elsewhere = RunLock()
        elsewhere.release()
        made: dict[str, str] = {}
        try:
            for name, labels in {
                "dead": container_labels(dead.run_id, 600),
                "live": container_labels(live.run_id, 600),
                "expired": container_labels(live.run_id, -1),
                # A dead-looking run whose locks this host cannot see: spared until expiry.
                "elsewhere": {**container_labels(elsewhere.run_id, 600), LOCKS_LABEL: "x:/y"},
            }.items():
                c = client.containers.create(sandbox.image, ["sleep", "60"], labels=labels)
                made[name] = c.id
            await asyncio.to_thread(sandbox._reap_dead)
            left = {c["Id"] for c in client.api.containers(all=True)}
            assert {n for n, cid in made.items() if cid in left} == {"live", "elsewhere"}
        finally:
            live.release()
            for cid in made.values():
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.remove_container(cid, force=True)

    in_session(check)


def test_close_leaves_no_container_of_the_run() -> None:
    async def main() -> None:
        sandbox = DockerSandbox(pool_size=4, warm=2)
        sessions = [await sandbox.session() for _ in range(3)]
        results = await asyncio.gather(*(s.python("print(1)") for s in sessions))
        assert all(r.ok for r in results)
        assert len(containers_of(sandbox)) >= 3
        await sessions[0].close()
        await sandbox.close()
        await sandbox.close()
        assert containers_of(sandbox) == []

    asyncio.run(main())


CHILD = """
import asyncio
from turnrl.sandboxes.docker import DockerSandbox

async def main():
    sandbox = DockerSandbox(pool_size=1, warm=0)
    session = await sandbox.session()
    await session.python("pass")
    print(sandbox.run_id, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_killed_trainer_containers_stop_and_are_reaped() -> None:
    import docker

    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    client = docker.from_env()
    try:
        (info,) = client.api.containers(filters={"label": f"{RUN_LABEL}={run_id}"})
        proc.kill()
        proc.wait()
        # The attach socket closes with the trainer: the worker reads EOF and the container
        # stops (StdinOnce), without any reaper.
        for _ in range(100):
            if not client.api.inspect_container(info["Id"])["State"]["Running"]:
                break
            time.sleep(0.05)
        assert not client.api.inspect_container(info["Id"])["State"]["Running"]

        async def main() -> None:
            sandbox = DockerSandbox(pool_size=1, warm=0)  # reaps dead runs as it starts
            await sandbox.close()

        asyncio.run(main())
        assert client.api.containers(all=True, filters={"label": f"{RUN_LABEL}={run_id}"}) == []
    finally:
        proc.kill()
        client.close()
