"""The `Sandbox` protocol on a warm pool, shared by every backend.

A backend supplies `_spawn()` (start one worker and return its handle) and `_reap_own()`
(remove whatever of this run is left); this class adds the pool, sessions, one-shot calls,
the periodic reaper and health check, and an idempotent `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib

from turnrl.sandboxes.base import ExecResult, Limits, SandboxError
from turnrl.sandboxes.pool import PoolSession, WorkerHandle, WorkerPool
from turnrl.sandboxes.reaper import RunLock


class PooledSandbox:
    """Common behaviour of the pooled backends (bwrap, docker, subprocess)."""

    name = "pooled"

    def __init__(
        self,
        limits: Limits,
        pool_size: int,
        warm: int,
        run: RunLock | None = None,
        maintain_every_s: float = 60.0,
    ) -> None:
        self.limits = limits
        self.run_lock = run or RunLock()
        self._owns_lock = run is None
        self._pool_size, self._warm = pool_size, warm
        self._pool: WorkerPool | None = None
        self._maintain_every_s = maintain_every_s
        self._maintainer: asyncio.Task[None] | None = None
        self._sessions: set[PoolSession] = set()
        self._closed = False

    @property
    def run_id(self) -> str:
        return self.run_lock.run_id

    @property
    def pool(self) -> WorkerPool:
        """The warm pool, created on first use inside the running event loop."""
        if self._closed:
            raise SandboxError(f"{self.name} sandbox is closed")
        if self._pool is None:
            self._pool = WorkerPool(self._spawn, self._pool_size, self._warm)
            self._maintainer = asyncio.get_running_loop().create_task(self._maintain())
        return self._pool

    async def session(self) -> PoolSession:
        session = PoolSession(self.pool, self.limits)
        self._sessions.add(session)
        return session

    async def run(
        self, argv: list[str], stdin: bytes = b"", limits: Limits | None = None
    ) -> ExecResult:
        session = await self.session()
        try:
            return await session.run(argv, stdin, limits)
        finally:
            await self._end(session)

    async def python(self, code: str, limits: Limits | None = None) -> ExecResult:
        session = await self.session()
        try:
            return await session.python_fresh(code, limits)
        finally:
            await self._end(session)

    async def _end(self, session: PoolSession) -> None:
        self._sessions.discard(session)
        await session.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        for session in list(self._sessions):
            await session.close()
        if self._pool is not None:
            await self._pool.close()
        await asyncio.to_thread(self._reap_own)
        if self._owns_lock:
            self.run_lock.release()

    async def _maintain(self) -> None:
        """Every `maintain_every_s`: replace dead idle workers, reap dead runs' leftovers."""
        while True:
            await asyncio.sleep(self._maintain_every_s)
            if self._pool is not None:
                await self._pool.health()
            await asyncio.to_thread(self._reap_dead)

    async def _spawn(self) -> WorkerHandle:
        raise NotImplementedError

    def _reap_own(self) -> None:
        """Remove every resource of this run (after the pool is closed)."""

    def _reap_dead(self) -> None:
        """Remove the resources of runs that died without cleaning up."""
