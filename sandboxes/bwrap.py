"""Bubblewrap sandboxes: the default backend where `bwrap` and user namespaces are available.

Covers: code runs as an unprivileged uid (65534 inside; when the trainer is root, `setpriv`
drops to a host uid leased for this worker alone before bwrap starts — see
`turnrl.sandboxes.uids` — because bwrap launched as root lets code write host sysctls, as
measured here), in new user, pid, mount, network, IPC, UTS and cgroup namespaces with nested
user namespaces disabled; every capability dropped; a new session (no TIOCSTI into the
trainer's terminal) and a new anonymous session keyring (bwrap and setpriv keep the trainer's,
whose keys code could otherwise read); it dies with its parent; a seccomp filter
(`turnrl.sandboxes.seccomp`) denies ptrace, io_uring, userfaultfd, perf_event_open, bpf, the key
syscalls and what docker's default profile denies; the worker is the sandbox's pid 1
(`--as-pid-1`: no bwrap init holding the host's pipes) and is not dumpable, so no code can open,
ptrace or inherit the channel to the trainer; empty environment; the only host files visible
are `/usr` (read-only; `/bin`, `/lib`, `/lib64`, `/sbin` are symlinks into it), a private
`/proc` and a minimal `/dev`; a sized tmpfs `/tmp` is the only writable place; the root is
remounted read-only. No network device but loopback exists, so no egress and no DNS. Memory,
pids and CPU are bounded by a cgroup (v1 or v2) created before the first process starts;
per-call wall and CPU time are enforced by the worker inside, and the worker kills every
process a call leaves behind.

Does not cover: kernel exploits (namespaces share the host kernel; use docker with a VM
runtime, or a VM, for hostile code at scale); CPU side channels; without a usable cgroup
(non-root without delegation) memory falls back to RLIMIT_AS per process and pids are not
bounded (a fork bomb is then stopped only by the wall limit), and every sandbox runs as the
trainer's own uid, sharing its per-user resources; `/usr` is readable, so anything installed
there (documentation, other users' world-readable packages) can be read, and `flock` on files
under it is shared with the host and other sandboxes (a covert channel between sandboxes and a
way to stall a host program that locks such a file; a private copy of `/usr` per worker costs
more than the risk).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import subprocess
from pathlib import Path

from turnrl.sandboxes.backend import PooledSandbox
from turnrl.sandboxes.base import Limits, SandboxError
from turnrl.sandboxes.cgroups import PREFIX, Cgroup, CgroupDriver, CgroupLimits, detect
from turnrl.sandboxes.pool import WORKER_SOURCE, StreamWorker, WorkerHandle, answering
from turnrl.sandboxes.reaper import CMDLINE_TAG, RunLock, reap
from turnrl.sandboxes.seccomp import join_new_session_keyring, worker_argument
from turnrl.sandboxes.uids import UidLease, lease_uid

NOBODY = 65534


@functools.cache
def bwrap_usable() -> str | None:
    """None when bubblewrap can create a sandbox here, else the reason it cannot."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        proc = subprocess.run(
            bwrap_argv(["/usr/bin/true"], Limits()), capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed to start: {e}"
    if proc.returncode != 0:
        return f"bwrap cannot create namespaces here: {proc.stderr.decode().strip()}"
    return None


def _drop_privileges(uid: int) -> list[str]:
    if os.geteuid() != 0:
        return []
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]


def _namespace_flags() -> list[str]:
    ids = ["--uid", str(NOBODY), "--gid", str(NOBODY)] if os.geteuid() == 0 else []
    return [
        "--unshare-all",
        "--unshare-user",
        *ids,
        "--as-pid-1",
        "--disable-userns",
        "--cap-drop",
        "ALL",
        "--new-session",
        "--die-with-parent",
        "--clearenv",
    ]


def bwrap_argv(program: list[str], limits: Limits, uid: int = NOBODY) -> list[str]:
    """The full command that runs `program` inside the hardened profile, as host `uid` when
    the trainer is root (it sees uid 65534 either way)."""
    return [
        *_drop_privileges(uid),
        "bwrap",
        *_namespace_flags(),
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--ro-bind",
        "/usr",
        "/usr",
        *(x for d in ("bin", "lib", "lib64", "sbin") for x in ("--symlink", f"usr/{d}", f"/{d}")),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(limits.tmp_mb * 1024 * 1024),
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",
        "--size",
        str(limits.tmp_mb * 1024 * 1024),
        "--tmpfs",
        "/tmp",
        "--remount-ro",
        "/",
        "--chdir",
        "/tmp",
        "--",
        *program,
    ]


class BwrapSandbox(PooledSandbox):
    """Warm bubblewrap workers in per-worker cgroups."""

    name = "bwrap"

    def __init__(
        self,
        limits: Limits | None = None,
        pool_size: int = 16,
        warm: int = 4,
        cpus: float = 1.0,
        python: str = "/usr/bin/python3",
        run: RunLock | None = None,
        cgroups: CgroupDriver | bool | None = True,
    ) -> None:
        reason = bwrap_usable()
        if reason is not None:
            raise SandboxError(reason)
        if not Path(python).is_file() or not python.startswith("/usr/"):
            raise SandboxError(f"{python}: the sandbox's Python must be a file under /usr")
        super().__init__(limits or Limits(), pool_size, warm, run)
        self.interpreter = python
        self.cpus = cpus
        self.cgroups = detect() if cgroups is True else (cgroups or None)
        self._seccomp_arg = worker_argument()
        self._seq = itertools.count()
        # Leftovers of runs that died (the trainer SIGKILLed): gone before we start.
        self._reap_dead()

    async def _spawn(self) -> WorkerHandle:
        lim = self.limits
        group: Cgroup | None = None
        if self.cgroups is not None:
            name = f"{PREFIX}{self.run_id}-{next(self._seq)}"
            group = await asyncio.to_thread(
                self.cgroups.create, name, CgroupLimits(lim.memory_mb, lim.pids, self.cpus)
            )
        lease: UidLease | None = lease_uid() if os.geteuid() == 0 else None
        program = [self.interpreter, "-I", "-c", WORKER_SOURCE, "--pidns", self._seccomp_arg]
        if group is None:
            program.append("--rlimit-as")
        program.append(f"{CMDLINE_TAG}{self.run_id}")
        argv = bwrap_argv(program, lim, lease.uid if lease is not None else NOBODY)
        if group is not None:
            # Join the cgroup, then exec: nothing starts outside the limits.
            joins = " && ".join(f"echo $$ > '{f}'" for f in group.procs_files)
            argv = ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                cwd="/",
                preexec_fn=join_new_session_keyring,
            )
        except (OSError, subprocess.SubprocessError) as e:
            if group is not None:
                await asyncio.to_thread(group.remove)
            if lease is not None:
                lease.release()
            raise SandboxError(f"cannot start bwrap: {e}") from e

        async def destroy() -> None:
            if group is not None:
                await asyncio.to_thread(group.remove)
            if lease is not None:
                lease.release()

        worker = StreamWorker(proc, destroy, group.oom_kills if group is not None else None)
        return await answering(worker, "bwrap worker")

    def _reap_own(self) -> None:
        reap(self.cgroups, only=self.run_id)

    def _reap_dead(self) -> None:
        reap(self.cgroups, spare=[self.run_id])
