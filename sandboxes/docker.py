"""Docker sandboxes: one container per warm worker, for machines where bubblewrap is not usable.

Covers: code runs in a container of a minimal image (see `turnrl.sandboxes.docker_image`: Python,
its standard library, `sh` and a few coreutils; no package manager, compiler or setuid binary) as a
uid/gid leased for this container alone (`turnrl.sandboxes.uids`: per-user kernel resources such as
pipe pages are not shared between sandboxes), with every capability dropped, `no-new-privileges`,
the daemon's default seccomp (and AppArmor, where enabled) profile with turnrl's filter stacked on
it by the worker (`turnrl.sandboxes.seccomp`: io_uring, userfaultfd, perf_event_open, bpf, ptrace
and the key syscalls denied, whatever the daemon's version allows), and its own pid, mount, network,
IPC and UTS namespaces. The worker is the container's pid 1 (no docker-init, which would hold the
attached stdin/stdout as a dumpable process of the sandbox user) and is not dumpable, so no code can
reach the channel. The network mode is `none`: loopback only, so no egress, no DNS, and neither the
host nor the docker bridge is reachable. The root is read-only; a sized tmpfs `/tmp` (exec allowed,
like bwrap's; nosuid, nodev) and `/dev/shm` are the only writable places, and their pages count
against the memory limit. Memory (swap disabled), pids and CPU bandwidth are bounded by the
container's cgroup; per-call wall and CPU time are enforced by the worker inside, which also kills
every process a call leaves behind. Nothing of the trainer's environment reaches the code (the
worker sets PATH, HOME, LANG and TMPDIR itself). The worker's stdin is the container's attached
stdin (`StdinOnce`), so when the trainer dies the worker reads EOF and the container stops; its
container, and any past its expiry label, is then removed by the next reaper of any run
(`turnrl.run_id`, `turnrl.expires` labels).

Does not cover: kernel exploits (containers share the host kernel; point the daemon's default
runtime at a VM runtime such as gVisor or Kata, or use VMs, for hostile code at scale); CPU side
channels; disk I/O bandwidth; `/proc` and `/sys` show host facts (CPU model, kernel version)
read-only; the uid inside is the same uid on the host (no user-namespace remapping), so an
escape lands as an unprivileged user without capabilities. The trainer holds the docker socket,
which is root-equivalent: the trainer is trusted, the code is not, and the socket is never
mounted into a sandbox. With a daemon on another machine (`DOCKER_HOST=tcp://...`), the
container's cgroup is not readable here, so OOM kills are learned from the daemon's events (one
query per SIGKILLed call), which is only as exact as the two machines' clocks agree.

Talking to a worker: the container is created with stdin open, the host attaches to its
stdin and stdout before starting it (the daemon's raw-stream upgrade of `POST /attach`), and
the socket is handed to asyncio. Requests go down raw; responses come back in the daemon's
multiplexed framing (an 8-byte header: stream id, 3 zero bytes, big-endian length), which is
stripped here before the worker's own length-prefixed JSON frames are read. The daemon must be
on a unix socket or plain TCP (TLS and ssh transports are not supported).

Using another image: any image with a Python 3.11+ at `/usr/bin/python3` (or pass `python=`)
works, e.g. one with numpy installed; it needs no entrypoint (it is replaced) and no shell.
Images whose repository is `turnrl-sandbox` are built when missing; others must exist locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import signal
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turnrl.sandboxes.backend import PooledSandbox
from turnrl.sandboxes.base import Limits, SandboxError
from turnrl.sandboxes.cgroups import ROOT, Cgroup
from turnrl.sandboxes.docker_image import DEFAULT_TAG, build_image
from turnrl.sandboxes.pool import (
    WORKER_SOURCE,
    WorkerDied,
    WorkerHandle,
    answering,
    check_reply,
    new_request,
    reply_limit,
)
from turnrl.sandboxes.reaper import CMDLINE_TAG, Reaped, RunLock, lock_dir, run_is_alive
from turnrl.sandboxes.seccomp import worker_argument
from turnrl.sandboxes.uids import UidLease, lease_uid

RUN_LABEL = "turnrl.run_id"
"""Label naming the run a container belongs to."""
EXPIRES_LABEL = "turnrl.expires"
"""Label with the unix time after which any run's reaper removes the container."""
LOCKS_LABEL = "turnrl.locks"
"""Label naming the host and lock folder of the run: only a reaper that sees the same lock
folder may judge the run dead by its lock (a shared daemon can serve trainers in other
containers or machines, whose locks are invisible here; those are reaped by expiry only)."""
API_TIMEOUT_S = 60
"""Timeout of one call to the daemon (a container start or removal under load included)."""
_RUN_ID = re.compile(r"[a-z0-9]{6,32}")
_MUX_HEADER = struct.Struct(">BxxxL")
_STDOUT = 1
_USABLE_TTL_S = 10.0
_usable: tuple[float, str | None] | None = None
_usable_lock = threading.Lock()


def docker_usable() -> str | None:
    """None when the docker SDK imports and a daemon answers, else the reason (cached 10 s)."""
    global _usable
    with _usable_lock:
        now = time.monotonic()
        if _usable is None or now - _usable[0] > _USABLE_TTL_S:
            _usable = (now, _probe())
        return _usable[1]


def _probe() -> str | None:
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed (pip install docker)"
    try:
        client = docker.from_env(timeout=5)
    except Exception as e:  # DockerException, or a malformed DOCKER_HOST
        return f"no docker daemon answers: {e}"
    try:
        client.ping()
        base = str(client.api.base_url)
    except Exception as e:
        return f"the docker daemon does not answer: {e}"
    finally:
        client.close()
    if base.startswith(("https://", "http+docker://ssh")):
        return f"the docker daemon at {base} is reached over TLS or ssh (unsupported)"
    return None


def locks_label() -> str:
    """This process's host and lock folder (see `LOCKS_LABEL`)."""
    return f"{socket.gethostname()}:{lock_dir()}"


def container_labels(run_id: str, ttl_s: float) -> dict[str, str]:
    """The labels that tie a container to its run and bound its life."""
    return {
        RUN_LABEL: run_id,
        EXPIRES_LABEL: str(int(time.time() + ttl_s)),
        LOCKS_LABEL: locks_label(),
    }


def reap_containers(
    client: Any, spare: tuple[str, ...] = (), only: str | None = None, now: float | None = None
) -> Reaped:
    """Remove the containers of dead runs and expired ones (`only`: every container of that
    run, as its own `close()` does). Runs in `spare` are never touched. Blocking."""
    now = time.time() if now is None else now
    here = locks_label()
    label = RUN_LABEL if only is None else f"{RUN_LABEL}={only}"
    done = Reaped()
    alive: dict[str, bool] = {}
    for info in client.api.containers(all=True, filters={"label": label}):
        labels: dict[str, str] = info.get("Labels") or {}
        run = labels.get(RUN_LABEL, "")
        if run in spare or not _RUN_ID.fullmatch(run):
            continue  # a malformed id must not name a lock path
        if only is None:
            try:
                expired = float(labels.get(EXPIRES_LABEL, "inf")) < now
            except ValueError:
                expired = False
            if not expired:
                if labels.get(LOCKS_LABEL) != here:
                    continue
                if run not in alive:
                    alive[run] = run_is_alive(run)
                if alive[run]:
                    continue
        _remove(client, str(info["Id"]))
        done.containers += 1
        done.runs.add(run)
    return done


def _remove(client: Any, container_id: str) -> None:
    """Kill and remove a container; gone already, or being removed, is fine."""
    import docker

    with contextlib.suppress(docker.errors.APIError):
        client.api.remove_container(container_id, force=True, v=True)


def _attach(api: Any, container_id: str) -> socket.socket:
    """A socket of our own on the container's stdin and stdout: `POST /attach`, upgraded by the
    daemon to a raw stream (as docker-py's `attach_socket` does, but keeping the response so
    that the SDK's side is closed here, not whenever the garbage collector gets to it)."""
    response = api.post(
        f"{api.base_url}/v{api.api_version}/containers/{container_id}/attach",
        params={"stdin": 1, "stdout": 1, "stream": 1},
        headers={"Connection": "Upgrade", "Upgrade": "tcp"},
        stream=True,
    )
    try:
        response.raise_for_status()
        raw = getattr(response.raw._fp.fp.raw, "_sock", None)
        if not isinstance(raw, socket.socket) or isinstance(raw, ssl.SSLSocket):
            raise SandboxError("the docker backend needs a daemon on a unix socket or plain TCP")
        return raw.dup()
    finally:
        response.close()


def _memory_cgroup(pid: int, container_id: str) -> Cgroup | None:
    """The container's memory cgroup on this host, if its init process is visible here."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # v1 `N:memory:/docker/<id>` first, then v2 `0::/...`
        _, controllers, path = line.split(":", 2)
        if container_id in path and "memory" in controllers.split(","):
            d = ROOT / "memory" / path.lstrip("/")
            if (d / "memory.oom_control").exists():
                return Cgroup({"memory": d}, 1)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if container_id in path and controllers == "":
            d = ROOT / path.lstrip("/")
            if (d / "memory.events").exists():
                return Cgroup({"memory": d}, 2)
    return None


@dataclass
class _Started:
    """What the blocking half of a start hands to the event loop."""

    container_id: str
    sock: socket.socket
    cgroup: Cgroup | None
    lease: UidLease


class DockerWorker:
    """One container running the worker, spoken to over its attached stdin/stdout."""

    def __init__(
        self,
        client: Any,
        started: _Started,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.client = client
        self.container_id = started.container_id
        self._cgroup = started.cgroup
        self._lease = started.lease
        self._reader, self._writer = reader, writer
        self._buf = bytearray()
        self._lock = asyncio.Lock()
        self._broken = False
        self._destroyed = False
        self._oom_seen = 0
        self._died_of_oom = False

    async def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        frame, call_id = new_request(request)
        limit = reply_limit(request)
        async with self._lock:
            if self._broken or self._destroyed:
                raise WorkerDied("the worker's channel is closed")
            started, kills_before = time.time(), self.oom_kills()
            try:
                self._writer.write(frame)
                async with asyncio.timeout(timeout_s):
                    await self._writer.drain()
                    (n,) = struct.unpack(">I", await self._read(4, limit + 4))
                    if n > limit:
                        raise WorkerDied(f"the worker's reply is {n} bytes, at most {limit}")
                    payload = await self._read(n, n)
                result = check_reply(payload, call_id)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, WorkerDied) as e:
                self._broken = True
                # A reply no honest worker sends: kill at once, as for a hung one.
                hung = isinstance(e, (TimeoutError, WorkerDied))
                await asyncio.to_thread(self._settle, hung, started)
                if isinstance(e, WorkerDied):
                    raise
                raise WorkerDied(f"{type(e).__name__}: {e}".rstrip(": ")) from None
            except BaseException:
                self._broken = True  # cancelled mid-exchange: the stream is out of step
                raise
            await self._account_ooms(result, started, kills_before)
        return result

    async def _account_ooms(self, result: dict[str, Any], started: float, before: int) -> None:
        """Keep `oom_kills()` right after a call that began at `started`."""
        if self._cgroup is not None:
            if self.oom_kills() > before:
                # The daemon logs the OOM event a little after the kill: wait until it has, so
                # that the event cannot be taken for one of a later call (see `_settle`).
                await asyncio.to_thread(self._await_oom_event, started, 1.0)
            return
        # No cgroup to read here (a remote daemon): ask the daemon whether a SIGKILL was OOM.
        killed = result.get("signal") == signal.SIGKILL and not result.get("timed_out")
        if killed and await asyncio.to_thread(self._await_oom_event, started, 0.0):
            self._oom_seen += 1

    async def _read(self, n: int, cap: int) -> bytes:
        """`n` bytes of the worker's stdout, out of the daemon's multiplexed frames; an honest
        worker never has more than `cap` bytes of stdout pending (one reply at a time)."""
        while len(self._buf) < n:
            kind, size = _MUX_HEADER.unpack(await self._reader.readexactly(_MUX_HEADER.size))
            if len(self._buf) + size > cap:
                raise WorkerDied(f"the worker sent more than the {cap} bytes a reply may take")
            data = await self._reader.readexactly(size)
            if kind == _STDOUT:
                self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _settle(self, hung: bool, since: float) -> None:
        """After the channel broke during a call that began at `since`: learn whether the
        memory limit killed the worker, and make sure the container is stopped. Blocking."""
        import docker

        self.oom_kills()  # the cgroup may still be there to read
        if not hung:
            with contextlib.suppress(Exception):
                self.client.api.wait(self.container_id, timeout=2)
            with contextlib.suppress(Exception):
                # `OOMKilled` says whether any process of the container was ever OOM-killed;
                # only an OOM event during this call says that one took the worker down.
                if self.client.api.inspect_container(self.container_id)["State"]["OOMKilled"]:
                    self._died_of_oom = self._await_oom_event(since, 0.5)
        with contextlib.suppress(docker.errors.APIError):
            self.client.api.kill(self.container_id)

    def _await_oom_event(self, since: float, wait_s: float) -> bool:
        """Whether the daemon logs an OOM event of this container since `since` (unix time on
        our clock, which for a local daemon is its own), polling up to `wait_s`. Blocking."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                events = self.client.api.events(
                    since=since,
                    until=time.time(),
                    filters={"container": self.container_id, "event": "oom"},
                    decode=True,
                )
                try:
                    if any(True for _ in events):
                        return True
                finally:
                    events.close()
            except Exception:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def alive(self) -> bool:
        return not (self._destroyed or self._broken or self._reader.at_eof())

    def oom_kills(self) -> int:
        if self._cgroup is not None:
            self._oom_seen = max(self._oom_seen, self._cgroup.oom_kills())
        return self._oom_seen + int(self._died_of_oom)

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        with contextlib.suppress(Exception):
            self._writer.close()
        await asyncio.to_thread(_remove, self.client, self.container_id)
        self._lease.release()


class DockerSandbox(PooledSandbox):
    """Warm workers, one container each (see the module docstring)."""

    name = "docker"

    def __init__(
        self,
        limits: Limits | None = None,
        pool_size: int = 16,
        warm: int = 4,
        cpus: float = 1.0,
        image: str = DEFAULT_TAG,
        ttl_s: float = 3600.0,
        run: RunLock | None = None,
        python: str = "/usr/bin/python3",
    ) -> None:
        reason = docker_usable()
        if reason is not None:
            raise SandboxError(reason)
        import docker

        self.client = docker.from_env(timeout=API_TIMEOUT_S)
        super().__init__(limits or Limits(), pool_size, warm, run)
        self.image, self.cpus, self.ttl_s, self.interpreter = image, cpus, ttl_s, python
        self._image_ready = False
        self._image_lock = threading.Lock()
        self._prefix = f"turnrl-{self.run_id}-{secrets.token_hex(3)}"
        self._seq = itertools.count()
        self._seccomp_arg = worker_argument()
        # Containers of runs that died (the trainer SIGKILLed), or expired: gone before we start.
        self._reap_dead()

    async def close(self) -> None:
        await super().close()
        self.client.close()

    async def _spawn(self) -> WorkerHandle:
        await asyncio.to_thread(self._ensure_image)
        start = asyncio.ensure_future(asyncio.to_thread(self._start, next(self._seq)))
        try:
            started = await asyncio.shield(start)
        except asyncio.CancelledError:
            # The thread cannot be stopped: let it finish, then remove what it made.
            with contextlib.suppress(Exception):
                made = await start
                made.sock.close()
                await asyncio.to_thread(_remove, self.client, made.container_id)
                made.lease.release()
            raise
        except SandboxError:
            raise
        except Exception as e:  # the daemon refused (a missing runtime, no docker-init...)
            raise SandboxError(f"cannot start a docker worker: {e}") from e
        try:
            reader, writer = await asyncio.open_connection(sock=started.sock)
        except OSError as e:
            started.sock.close()
            await asyncio.to_thread(_remove, self.client, started.container_id)
            started.lease.release()
            raise SandboxError(f"cannot attach to the docker worker: {e}") from e
        worker = DockerWorker(self.client, started, reader, writer)
        return await answering(worker, "docker worker")

    def _ensure_image(self) -> None:
        """Build the image when it is missing and ours to build. Blocking."""
        import docker

        with self._image_lock:
            if self._image_ready:
                return
            try:
                self.client.images.get(self.image)
            except docker.errors.ImageNotFound:
                if self.image.rsplit(":", 1)[0] != DEFAULT_TAG.rsplit(":", 1)[0]:
                    raise SandboxError(
                        f"docker image {self.image!r} is not on this machine (build or load "
                        f"it, or use {DEFAULT_TAG!r}, which is built from the host's Python)"
                    ) from None
                try:
                    build_image(self.image, client=self.client)
                except Exception as e:
                    raise SandboxError(f"cannot build the sandbox image: {e}") from e
            self._image_ready = True

    def _start(self, n: int) -> _Started:
        """Create, attach to and start one worker's container. Blocking."""
        argv = [self.interpreter, "-I", "-c", WORKER_SOURCE, "--pidns", self._seccomp_arg]
        lease = lease_uid()
        try:
            return self._create_and_start(n, argv, lease)
        except BaseException:
            lease.release()
            raise

    def _create_and_start(self, n: int, argv: list[str], lease: UidLease) -> _Started:
        lim = self.limits
        mem = f"{lim.memory_mb}m"
        container = self.client.containers.create(
            self.image,
            entrypoint=[*argv, f"{CMDLINE_TAG}{self.run_id}"],
            name=f"{self._prefix}-{n}",
            labels=container_labels(self.run_id, self.ttl_s),
            user=f"{lease.uid}:{lease.uid}",
            working_dir="/tmp",
            environment=[],
            hostname="sandbox",
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={lim.tmp_mb}m,mode=1777"},
            shm_size=f"{lim.tmp_mb}m",
            mem_limit=mem,
            memswap_limit=mem,
            pids_limit=lim.pids,
            nano_cpus=int(self.cpus * 1e9),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            # No docker-init: the worker is pid 1, so no process but it holds the attached
            # stdin/stdout (an init running as the sandbox user is open to /proc/1/fd/1).
            init=False,
            stdin_open=True,
            tty=False,
            auto_remove=False,
            log_config={"type": "none", "config": {}},
        )
        sock: socket.socket | None = None
        try:
            sock = _attach(self.client.api, str(container.id))
            container.start()
            container.reload()
            cgroup = _memory_cgroup(int(container.attrs["State"]["Pid"]), str(container.id))
        except BaseException:
            if sock is not None:
                sock.close()
            _remove(self.client, str(container.id))
            raise
        return _Started(str(container.id), sock, cgroup, lease)

    # Best effort: what a failing daemon keeps is left to the next reaper (or to expiry).

    def _reap_own(self) -> None:
        with contextlib.suppress(Exception):
            reap_containers(self.client, only=self.run_id)

    def _reap_dead(self) -> None:
        with contextlib.suppress(Exception):
            reap_containers(self.client, spare=(self.run_id,))
