"""The `subprocess` backend: warm workers as plain child processes, for machines with neither
bubblewrap nor Docker.

THIS IS NOT A SECURITY BOUNDARY. Use it for trusted code, tests and laptops; use `bwrap` or
`docker` for anything a model wrote during training.

What it promises, against code that does not attack the trainer:
- per-call wall and CPU limits (RLIMIT_CPU per process); output capped and sanitised; an empty
  environment; a fresh session and process group per call;
- memory: RLIMIT_AS per process, and where a cgroup is usable (`cgroups.detect()`: root, or a
  delegated hierarchy) also a cgroup per worker bounding the memory (memfd and `/dev/shm` pages
  included) and the processes of the whole worker, as `Limits` says;
- nothing a session started outlives it: after every call the worker kills what the call left
  (it is a child subreaper); above the worker a supervisor (`supervisor.py`, also a subreaper)
  kills whatever is left when the worker exits, however it exits: a daemon whose snippet then
  SIGKILLed the worker is killed before the call returns; with a cgroup, destroying the worker
  kills the whole cgroup as well. The supervisor dies with the trainer and takes the tree with
  it; a frozen supervisor of a dead run is removed, with its tree, by the next reaper;
- a private work folder (`$HOME`, `$TMPDIR`, the working directory) per worker, deleted with it;
  the folders of a SIGKILLed trainer are deleted by the next reaper on the machine (any
  `subprocess` sandbox's start and its periodic pass), never those of a live run.

What it does not promise (code runs as the trainer's user, on the host):
- isolation of files: every file the user can read or write is reachable, and files written
  outside the work folder (`/tmp`, `/dev/shm`, the user's home, the project) stay;
- isolation of the network, of other processes (it may signal, ptrace or read any process of
  the user, the trainer included), or of the trainer's sandbox channel;
- memory, without a cgroup: RLIMIT_AS bounds each process's address space only, so memfd and
  `/dev/shm` pages (written, never mapped) are not bounded at all, nor is the sum over a
  call's processes; processes and threads are then not bounded either, so a fork bomb is
  stopped by the wall limit only;
- cleanup against a snippet that kills the supervisor first (it is the worker's parent, and
  the same user): without a cgroup, what the snippet leaves is then re-parented to the host's
  init, out of reach (a process that exec'd carries no run tag for the reaper); with one, a
  root trainer's snippet can still move itself to another cgroup;
- CPU bandwidth: the cgroup does not throttle, and a call's CPU limit is per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path

from turnrl.sandboxes.backend import PooledSandbox
from turnrl.sandboxes.base import Limits, SandboxError
from turnrl.sandboxes.cgroups import PREFIX, Cgroup, CgroupDriver, CgroupLimits, detect
from turnrl.sandboxes.pool import WORKER_SOURCE, StreamWorker, WorkerHandle, answering
from turnrl.sandboxes.reaper import CMDLINE_TAG, RunLock, kill_tree, reap, work_folder_prefix

SUPERVISOR_SOURCE = (Path(__file__).with_name("supervisor.py")).read_text()
"""The supervisor's source, passed to the sandbox's Python with `-c`."""

# Numbered apart from bwrap's per-sandbox counters (which start at 0), so that a run with both
# backends never shares a cgroup between two workers.
_CGROUP_SEQ = itertools.count(10**9)


class SupervisedProcess(asyncio.subprocess.Process):
    """The supervisor as the pool holds it. Killing it kills its tree first: SIGKILLed alone, it
    would leave the worker's tree to the host's init (a snippet may have frozen it, so it is
    not asked)."""

    def kill(self) -> None:
        if self.returncode is None:
            kill_tree(self.pid)
        super().kill()


class SubprocessSandbox(PooledSandbox):
    """Warm workers without isolation (see the module docstring)."""

    name = "subprocess"

    def __init__(
        self,
        limits: Limits | None = None,
        pool_size: int = 16,
        warm: int = 4,
        python: str = sys.executable,
        run: RunLock | None = None,
        cgroups: CgroupDriver | bool | None = True,
    ) -> None:
        super().__init__(limits or Limits(), pool_size, warm, run)
        self.interpreter = python
        self.cgroups = detect() if cgroups is True else (cgroups or None)
        # Leftovers of runs that died (the trainer SIGKILLed): gone before we start.
        self._reap_dead()

    async def _spawn(self) -> WorkerHandle:
        lim = self.limits
        group: Cgroup | None = None
        if self.cgroups is not None:
            name = f"{PREFIX}{self.run_id}-{next(_CGROUP_SEQ)}"
            cpus = float(os.cpu_count() or 1)  # bounds memory and pids; CPU is not throttled
            try:
                group = await asyncio.to_thread(
                    self.cgroups.create, name, CgroupLimits(lim.memory_mb, lim.pids, cpus)
                )
            except OSError as e:
                raise SandboxError(f"cannot create the worker's cgroup {name}: {e}") from e
        workdir = tempfile.mkdtemp(prefix=work_folder_prefix(self.run_id))
        tag = f"{CMDLINE_TAG}{self.run_id}"
        worker = [self.interpreter, "-I", "-c", WORKER_SOURCE, "--rlimit-as", tag]
        joins = [f"--join={f}" for f in group.procs_files] if group is not None else []
        argv = [self.interpreter, "-I", "-c", SUPERVISOR_SOURCE, f"--parent={os.getpid()}"]
        argv += [*joins, "--", *worker]

        async def destroy() -> None:
            if group is not None:
                await asyncio.to_thread(group.remove)
            await asyncio.to_thread(shutil.rmtree, workdir, True)

        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=2**16, loop=loop),
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=workdir,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
                start_new_session=True,
            )
        except OSError as e:
            with contextlib.suppress(Exception):
                await destroy()
            raise SandboxError(f"cannot start a worker with {self.interpreter}: {e}") from e
        proc = SupervisedProcess(transport, protocol, loop)
        oom_kills = group.oom_kills if group is not None else None
        return await answering(StreamWorker(proc, destroy, oom_kills), "worker")

    def _reap_own(self) -> None:
        reap(self.cgroups, only=self.run_id, workdirs=True)

    def _reap_dead(self) -> None:
        reap(self.cgroups, spare=[self.run_id], workdirs=True)
