"""Warm workers, the pool that keeps them ready, and the sessions built on them.

A worker (see `worker.py`) is one sandbox with a small server inside that forks a child per
call, so a call costs a fork rather than a sandbox start. A worker is one trust domain: it
serves exactly one session (one episode) and is destroyed when the session closes, because
code from that episode may have left anything behind in it. The pool therefore pre-starts
replacements in the background (`warm`), bounds how many workers live at once (`size`: an
`acquire` beyond it waits, which is the backpressure on concurrent episodes), drops workers
that died while idle, and can be health-checked.

Backends differ only in how a worker is started and destroyed (`WorkerHandle`); everything
about calls, results and sessions lives here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from turnrl.sandboxes.base import ExecResult, Limits, SandboxError
from turnrl.sandboxes.output import join_capture

WORKER_SOURCE = (Path(__file__).with_name("worker.py")).read_text()
"""The worker's source, passed to the sandbox's Python with `-c` (nothing to mount)."""

BACKSTOP_S = 5.0
"""Host-side grace beyond a call's wall limit; past it the worker is presumed hung and killed
(the worker enforces the limit itself, so this only fires when it is broken or frozen)."""


class WorkerDied(Exception):
    """The worker's channel closed or it stopped answering."""


class WorkerHandle(Protocol):
    """One started worker, as a backend provides it."""

    async def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request and wait for its response; `WorkerDied` if none comes."""
        ...

    def alive(self) -> bool: ...

    def oom_kills(self) -> int:
        """Processes the memory limit killed in this worker so far (0 where unknown)."""
        ...

    async def destroy(self) -> None:
        """Kill everything the worker holds and release its resources. Idempotent."""
        ...


W = TypeVar("W", bound=WorkerHandle)


class StreamWorker:
    """A worker process whose stdin/stdout carry the protocol (bwrap and subprocess)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        on_destroy: Callable[[], Awaitable[None]] | None = None,
        oom_kills: Callable[[], int] | None = None,
    ) -> None:
        self.proc = proc
        self._on_destroy = on_destroy
        self._oom_kills = oom_kills
        self._lock = asyncio.Lock()
        self._destroyed = False
        self._broken = False

    async def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self._broken:
            raise WorkerDied("the worker was killed by an earlier call")
        body = json.dumps(request).encode()
        async with self._lock:
            try:
                self.proc.stdin.write(struct.pack(">I", len(body)) + body)
                async with asyncio.timeout(timeout_s):
                    await self.proc.stdin.drain()
                    header = await self.proc.stdout.readexactly(4)
                    (n,) = struct.unpack(">I", header)
                    payload = await self.proc.stdout.readexactly(n)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                self._broken = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()  # hung or half-dead: its resources go in destroy()
                raise WorkerDied(f"{type(e).__name__}: {e}".rstrip(": ")) from None
            except asyncio.CancelledError:
                # The response would arrive later and be read as the next call's: the stream
                # is out of step, so the worker cannot be used again.
                self._broken = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                raise
        result: dict[str, Any] = json.loads(payload)
        return result

    def alive(self) -> bool:
        return self.proc.returncode is None and not self._destroyed and not self._broken

    def oom_kills(self) -> int:
        return self._oom_kills() if self._oom_kills else 0

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        if self.proc.returncode is None and not self._broken:
            # Politely first: the worker kills what its calls left (the subprocess backend has
            # no namespace or cgroup that would take them down with it).
            with contextlib.suppress(WorkerDied):
                await self.call({"op": "exit"}, timeout_s=2.0)
            # Let the launcher (bwrap) exit on its own: killed at once, its inner process is
            # orphaned to the host's init and lingers as a zombie until that init reaps it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 1.0)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 5.0)
        if self._on_destroy is not None:
            await self._on_destroy()


async def answering(worker: W, what: str) -> W:
    """`worker` once it answers a ping; otherwise it is destroyed and `SandboxError` raised.
    Cancelled while starting (a pool closing), it is destroyed too: its process and pipes must
    not outlive the event loop."""
    try:
        await worker.call({"op": "ping"}, timeout_s=30.0)
    except BaseException as e:
        await worker.destroy()
        if isinstance(e, Exception):
            raise SandboxError(f"{what} did not start: {e}") from e
        raise
    return worker


def to_result(resp: dict[str, Any], oom: bool, snippet: bool) -> ExecResult:
    """An `ExecResult` from a worker's response (`oom`: the backend saw an OOM kill)."""
    if "error" in resp and "stdout" not in resp:
        return ExecResult(error=str(resp["error"]), snippet=snippet)
    out, out_cut = _stream(resp["stdout"])
    err, err_cut = _stream(resp["stderr"])
    exception = resp.get("exception")
    # Without a cgroup (RLIMIT_AS), running out of memory shows as MemoryError.
    oom = oom or (isinstance(exception, str) and exception.startswith("MemoryError"))
    return ExecResult(
        stdout=out,
        stderr=err,
        exit_code=resp.get("exit_code"),
        signal=resp.get("signal"),
        timed_out=bool(resp.get("timed_out")),
        oom_killed=oom,
        truncated=out_cut or err_cut,
        wall_s=float(resp.get("wall_s", 0.0)),
        cpu_s=float(resp.get("cpu_s", 0.0)),
        completed=bool(resp.get("completed")) and not oom,
        exception=exception,
        state_lost=bool(resp.get("state_lost")),
        snippet=snippet,
    )


def _stream(cap: dict[str, Any]) -> tuple[str, bool]:
    return join_capture(base64.b64decode(cap["head"]), base64.b64decode(cap["tail"]), cap["total"])


class WorkerPool:
    """Single-use warm workers with a bound on how many live at once."""

    def __init__(self, spawn: Callable[[], Awaitable[WorkerHandle]], size: int, warm: int) -> None:
        if size < 1 or not 0 <= warm <= size:
            raise ValueError(f"pool needs size >= 1 and 0 <= warm <= size (got {size}, {warm})")
        self._spawn = spawn
        self.size, self.warm = size, warm
        self._idle: deque[WorkerHandle] = deque()
        self._live = 0  # idle + handed out + starting
        self._starting = 0
        self._freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.spawned = 0
        """Workers started so far (a health figure: replacements show up here)."""

    async def acquire(self) -> WorkerHandle:
        """A fresh worker; waits while `size` workers are alive."""
        while True:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            while self._idle:
                worker = self._idle.popleft()
                if worker.alive():
                    self._refill()
                    return worker
                await self._drop(worker)
            if self._live < self.size:
                self._live += 1
                try:
                    worker = await self._start()
                except BaseException:
                    self._live -= 1
                    self._freed.set()
                    raise
                self._refill()
                return worker
            self._freed.clear()
            await self._freed.wait()

    async def release(self, worker: WorkerHandle) -> None:
        """Destroy a worker that served its session; a warm replacement is started."""
        await self._drop(worker)
        self._refill()

    async def health(self) -> int:
        """Ping idle workers, replace the ones that do not answer; returns how many died."""
        dead = 0
        for worker in list(self._idle):
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
            try:
                await worker.call({"op": "ping"}, timeout_s=BACKSTOP_S)
            except WorkerDied:
                dead += 1
                await self._drop(worker)
                continue
            self._idle.append(worker)
            self._freed.set()
        self._refill()
        return dead

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._idle:
            await self._drop(self._idle.popleft())
        self._freed.set()

    async def _start(self) -> WorkerHandle:
        self.spawned += 1
        return await self._spawn()

    async def _drop(self, worker: WorkerHandle) -> None:
        with contextlib.suppress(Exception):
            await worker.destroy()
        self._live -= 1
        self._freed.set()

    def _refill(self) -> None:
        while not self._closed and self._live < self.size:
            if len(self._idle) + self._starting >= self.warm:
                return
            self._live += 1
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._warm_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _warm_one(self) -> None:
        try:
            worker = await self._start()
        except Exception:
            # Start failures surface on the next acquire, which starts a worker in the open.
            self._live -= 1
            self._freed.set()
            return
        finally:
            self._starting -= 1
        if self._closed:
            await self._drop(worker)
        else:
            self._idle.append(worker)
            self._freed.set()


class PoolSession:
    """One episode's sandbox on a pooled worker; implements `SandboxSession`.

    If the worker dies (a snippet killed it, the memory limit took it), the call reports it and
    the next call runs on a fresh worker: files and variables are gone, and the result of that
    call says so (`state_lost`)."""

    _ids = itertools.count()

    def __init__(self, pool: WorkerPool, limits: Limits) -> None:
        self._pool = pool
        self.limits = limits
        self._worker: WorkerHandle | None = None
        self._closed = False
        self._acquiring = asyncio.Lock()
        self.id = next(self._ids)

    async def python(self, code: str, limits: Limits | None = None) -> ExecResult:
        return await self._call({"op": "exec", "code": code, "stateful": True}, limits)

    async def python_fresh(self, code: str, limits: Limits | None = None) -> ExecResult:
        return await self._call({"op": "exec", "code": code, "stateful": False}, limits)

    async def run(
        self, argv: list[str], stdin: bytes = b"", limits: Limits | None = None
    ) -> ExecResult:
        if not argv:
            raise ValueError("argv must name a program")
        request = {"op": "run", "argv": argv, "stdin": base64.b64encode(stdin).decode()}
        return await self._call(request, limits)

    async def _call(self, request: dict[str, Any], limits: Limits | None) -> ExecResult:
        if self._closed:
            raise SandboxError("session is closed")
        lim = limits or self.limits
        async with self._acquiring:
            if self._worker is None:
                self._worker = await self._pool.acquire()
            worker = self._worker
        request["limits"] = lim.model_dump()
        before = worker.oom_kills()
        try:
            resp = await worker.call(request, timeout_s=lim.wall_s + BACKSTOP_S)
        except WorkerDied as e:
            oom = worker.oom_kills() > before
            if self._worker is worker:
                self._worker = None
                await self._pool.release(worker)
            why = "killed by the memory limit" if oom else f"died ({e})"
            return ExecResult(
                error=f"sandbox worker {why}; its files and variables are gone",
                oom_killed=oom,
                state_lost=True,
                snippet=request["op"] == "exec",
            )
        snippet = request["op"] == "exec"
        return to_result(resp, oom=worker.oom_kills() > before, snippet=snippet)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await self._pool.release(worker)
