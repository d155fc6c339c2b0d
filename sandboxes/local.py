"""The `subprocess` backend: warm workers as plain child processes, for machines with neither
bubblewrap nor Docker.

THIS IS NOT A SECURITY BOUNDARY. Code runs as the trainer's user, sees the trainer's files,
the network and every process the user may signal. What it does give: per-call wall and CPU
limits (RLIMIT_CPU), memory per process (RLIMIT_AS), a fresh process group per call, every
process a call leaves behind killed afterwards (the worker is a child subreaper, so daemonised
grandchildren are found), output capped and sanitised, an empty environment, a private
working folder that is deleted with the session. Use it for trusted code, tests and laptops;
use `bwrap` or `docker` for anything a model wrote during training.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile

from turnrl.sandboxes.backend import PooledSandbox
from turnrl.sandboxes.base import Limits, SandboxError
from turnrl.sandboxes.pool import WORKER_SOURCE, StreamWorker, WorkerHandle, answering
from turnrl.sandboxes.reaper import CMDLINE_TAG, RunLock, reap


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
    ) -> None:
        super().__init__(limits or Limits(), pool_size, warm, run)
        self.interpreter = python
        self._reap_dead()

    async def _spawn(self) -> WorkerHandle:
        workdir = tempfile.mkdtemp(prefix=f"turnrl-{self.run_id}-")
        program = [self.interpreter, "-I", "-c", WORKER_SOURCE, "--rlimit-as"]
        program.append(f"{CMDLINE_TAG}{self.run_id}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *program,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=workdir,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
                start_new_session=True,
            )
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            raise SandboxError(f"cannot start a worker with {self.interpreter}: {e}") from e

        async def destroy() -> None:
            await asyncio.to_thread(shutil.rmtree, workdir, True)

        worker = StreamWorker(proc, destroy)
        return await answering(worker, "worker")

    def _reap_own(self) -> None:
        reap(None, only=self.run_id)

    def _reap_dead(self) -> None:
        reap(None, spare=[self.run_id])
