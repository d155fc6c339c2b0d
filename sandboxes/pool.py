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

import ast
import asyncio
import base64
import contextlib
import itertools
import json
import secrets
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from turnrl.sandboxes.base import ExecResult, Limits, SandboxError
from turnrl.sandboxes.output import join_capture

WORKER_MODULES = ("worker_wire", "worker_child", "worker")
"""The worker's modules, each after those it imports; the last one calls `main`."""


def worker_source(modules: tuple[str, ...] = WORKER_MODULES) -> str:
    """The worker's modules as one program for the sandbox's Python, which has no turnrl to
    import them from: their texts in order, with their imports of each other blanked (the
    texts before define those names) and `from __future__ import annotations` moved to the
    head, where Python requires it. They share one namespace there, so a module that defines a
    name another one defines, renames what it imports from one, or imports anything outside
    the standard library is refused here rather than misbehaving in the sandbox."""
    program = ["from __future__ import annotations\n"]
    defined: dict[str, str] = {}
    for i, module in enumerate(modules):
        text = Path(__file__).with_name(f"{module}.py").read_text()
        lines = text.splitlines(keepends=True)
        siblings = {f"turnrl.sandboxes.{m}" for m in modules[:i]}
        for node in ast.parse(text).body:
            if isinstance(node, ast.ImportFrom) and node.module in {"__future__", *siblings}:
                if node.module == "__future__" and [a.name for a in node.names] != ["annotations"]:
                    raise RuntimeError(f"{module}.py: only `annotations` may come from __future__")
                if any(a.asname for a in node.names):
                    raise RuntimeError(f"{module}.py renames what it imports from {node.module}")
                for k in range(node.lineno - 1, node.end_lineno or node.lineno):
                    lines[k] = "\n"
            elif isinstance(node, ast.Import | ast.ImportFrom):
                imported = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or "."]  # a relative import names no module
                )
                for name in imported:
                    if name.split(".")[0] not in sys.stdlib_module_names:
                        raise RuntimeError(
                            f"{module}.py imports {name}: neither the standard library nor a "
                            f"worker module before it in {modules}"
                        )
            else:
                for name in top_level_names(node):
                    if name in defined:
                        raise RuntimeError(f"{module}.py and {defined[name]}.py both define {name}")
                    defined[name] = module
        program += lines
    return "".join(program)


def top_level_names(node: ast.stmt) -> list[str]:
    """The names a module-level statement binds (imports aside)."""
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else []
    if isinstance(node, ast.AnnAssign):
        targets = [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


WORKER_SOURCE = worker_source()
"""The worker as one program, passed to the sandbox's Python with `-c` (nothing to mount)."""

BACKSTOP_S = 5.0
"""Host-side grace beyond a call's wall limit; past it the worker is presumed hung and killed
(the worker enforces the limit itself, so this only fires when it is broken or frozen)."""


REPORT_BYTES = 8192
"""What the worker reads of a snippet's report at most (`worker_wire.REPORT_BYTES`)."""
SMALL_REPLY_BYTES = 4096
"""The largest reply to a request without limits (ping, exit)."""


class WorkerDied(Exception):
    """The worker's channel closed, it stopped answering, or it sent a reply no honest worker
    sends (oversized, not JSON, not the answer to the request)."""


def new_request(request: dict[str, Any]) -> tuple[bytes, str]:
    """The frame of `request` with a fresh id the reply must echo, and that id."""
    call_id = secrets.token_hex(8)
    body = json.dumps({**request, "id": call_id}).encode()
    return struct.pack(">I", len(body)) + body, call_id


def reply_limit(request: dict[str, Any]) -> int:
    """Bytes an honest worker's reply to `request` can take: two output captures of
    `output_bytes` each, base64-encoded (4/3), the report, and the other fields."""
    limits = request.get("limits")
    if not isinstance(limits, dict):
        return SMALL_REPLY_BYTES
    return 2 * (4 * int(limits["output_bytes"]) // 3 + 8) + 2 * REPORT_BYTES + SMALL_REPLY_BYTES


def check_reply(payload: bytes, call_id: str) -> dict[str, Any]:
    """The reply as a JSON object answering `call_id`; `WorkerDied` otherwise."""
    try:
        reply = json.loads(payload)
    except (ValueError, RecursionError):
        raise WorkerDied("the worker's reply is not JSON") from None
    if not isinstance(reply, dict):
        raise WorkerDied(f"the worker's reply is a JSON {type(reply).__name__}, not an object")
    if reply.pop("id", None) != call_id:
        raise WorkerDied("the worker's reply does not answer the request (out of step)")
    return reply


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
        frame, call_id = new_request(request)
        limit = reply_limit(request)
        async with self._lock:
            try:
                self.proc.stdin.write(frame)
                async with asyncio.timeout(timeout_s):
                    await self.proc.stdin.drain()
                    header = await self.proc.stdout.readexactly(4)
                    (n,) = struct.unpack(">I", header)
                    if n > limit:
                        raise WorkerDied(f"the worker's reply is {n} bytes, at most {limit}")
                    payload = await self.proc.stdout.readexactly(n)
                return check_reply(payload, call_id)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, WorkerDied) as e:
                self._broken = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()  # hung or half-dead: its resources go in destroy()
                if isinstance(e, WorkerDied):
                    raise
                raise WorkerDied(f"{type(e).__name__}: {e}".rstrip(": ")) from None
            except asyncio.CancelledError:
                # The response would arrive later and be read as the next call's: the stream
                # is out of step, so the worker cannot be used again.
                self._broken = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                raise

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


class CaptureReply(BaseModel):
    """A capped stream as the worker sends it: base64 head and tail, bytes written in all."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    head: str
    tail: str
    total: int = Field(ge=0)


class CallReply(BaseModel):
    """The worker's reply to `exec` or `run`, checked field by field: a reply of another shape
    means a broken or subverted worker, never a result."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    stdout: CaptureReply
    stderr: CaptureReply
    exit_code: int | None
    signal: int | None
    timed_out: bool
    wall_s: float
    cpu_s: float
    completed: bool
    exception: str | None = Field(max_length=REPORT_BYTES)
    state_lost: bool = False
    threads: int = Field(0, ge=0)


class ErrorReply(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    error: str = Field(max_length=SMALL_REPLY_BYTES)


def to_result(resp: dict[str, Any], oom: bool, snippet: bool) -> ExecResult:
    """An `ExecResult` from a worker's response (`oom`: the backend saw an OOM kill).
    `ValidationError` when the reply has the wrong shape (the caller kills the worker)."""
    if "error" in resp:
        return ExecResult(error=ErrorReply.model_validate(resp).error, snippet=snippet)
    reply = CallReply.model_validate(resp)
    out, out_cut = _stream(reply.stdout)
    err, err_cut = _stream(reply.stderr)
    exception = reply.exception
    # Without a cgroup (RLIMIT_AS), running out of memory shows as MemoryError.
    oom = oom or (exception is not None and exception.startswith("MemoryError"))
    return ExecResult(
        stdout=out,
        stderr=err,
        exit_code=reply.exit_code,
        signal=reply.signal,
        timed_out=reply.timed_out,
        oom_killed=oom,
        truncated=out_cut or err_cut,
        wall_s=reply.wall_s,
        cpu_s=reply.cpu_s,
        completed=reply.completed and not oom,
        exception=exception,
        state_lost=reply.state_lost,
        background_threads=reply.threads,
        snippet=snippet,
    )


def _stream(cap: CaptureReply) -> tuple[str, bool]:
    try:
        head = base64.b64decode(cap.head, validate=True)
        tail = base64.b64decode(cap.tail, validate=True)
    except ValueError as e:
        raise ValueError(f"a capture is not base64: {e}") from None
    return join_capture(head, tail, max(cap.total, len(head) + len(tail)))


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
        try:
            return to_result(resp, oom=worker.oom_kills() > before, snippet=snippet)
        except ValueError as e:  # ValidationError included
            # Only a broken or subverted worker sends this: it serves no further call.
            if self._worker is worker:
                self._worker = None
                await self._pool.release(worker)
            why = str(e).splitlines()[0][:200]
            return ExecResult(
                error=f"sandbox worker sent a malformed reply ({why}); it was killed and its "
                "files and variables are gone",
                state_lost=True,
                snippet=snippet,
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await self._pool.release(worker)
