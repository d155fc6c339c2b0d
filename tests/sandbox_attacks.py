"""The machinery the sandbox attack suites share (`test_sandbox_isolation.py`,
`test_sandbox_limits.py`): opening a backend under its own run id, running a snippet and reading
the JSON it printed, and the host's view of a run (its processes, cgroups and containers) to
check that nothing of it is left on the machine.

Not a test module: the `backend` fixture and the leftover checks that use this live in
`conftest.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
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
RUNS: dict[str, Kind] = {}
"""Every run the attack suites opened, and its backend (checked for leftovers after each test and
at the end of each module)."""


# --- backends -------------------------------------------------------------------------------


def why_unusable(kind: Kind) -> str | None:
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


def params(*kinds: Kind) -> list[Any]:
    out = []
    for kind in kinds:
        marks: list[pytest.MarkDecorator] = [pytest.mark.docker] if kind == "docker" else []
        out.append(pytest.param(kind, id=kind, marks=marks))
    return out


ISOLATED = params("bwrap", "docker")
ANY = params("bwrap", "docker", "subprocess")


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


def proc_table() -> dict[int, tuple[int, str, bytes]]:
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


def running(argv: list[str]) -> list[int]:
    """Live (non-zombie) host processes whose command line is exactly `argv`."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    return [p for p, (_, state, cmd) in proc_table().items() if cmd == want and state != "Z"]


def host_zombies_of(run: str) -> list[int]:
    """Zombies among the descendants of the run's tagged processes, seen from the host."""
    table = proc_table()
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


def containers_of(runs: Iterable[str]) -> list[str]:
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


def leftovers(runs: dict[str, Kind]) -> list[str]:
    """Processes, cgroups and containers of `runs` still on the machine."""
    left = [f"process {p} of run {r}" for p, r in tagged_processes().items() if r in runs]
    root = Path("/sys/fs/cgroup")
    for run in runs:
        for pattern in (f"*/turnrl-{run}-*", f"turnrl/turnrl-{run}-*", f"*/turnrl/turnrl-{run}-*"):
            left += [f"cgroup {d}" for d in root.glob(pattern)]
    docker_runs = [run for run, kind in runs.items() if kind == "docker"]
    return left + (containers_of(docker_runs) if docker_runs else [])


def settled_leftovers(runs: dict[str, Kind], within_s: float = 10.0) -> list[str]:
    """Leftovers once SIGKILLs already sent have landed (delivery is asynchronous)."""
    deadline = time.monotonic() + within_s
    while (left := leftovers(runs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def new_marker() -> str:
    """A unique, valid `sleep` argument that names one test's processes on the host."""
    return f"{secrets.randbelow(10**8) + 10**8}.{secrets.randbelow(900) + 100}"
