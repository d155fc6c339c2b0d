"""What every sandbox backend offers: run a program or a Python snippet under limits, one-shot or
inside a per-episode session, and get back a typed result.

A backend never raises for what the code inside did (a crash, a timeout, an OOM kill, a flood
of output): that is the result. It raises `SandboxError` only when the sandbox itself cannot be
provided (bubblewrap missing, dockerd down), which is a fault of the machine, not of the code.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

RUN_ID_ENV = "TURNRL_RUN_ID"
"""Environment variable that names the run a sandbox belongs to (for the reaper)."""


class Limits(BaseModel):
    """Per-call limits. Wall and CPU time apply to each call; memory, pids and tmp size to the
    whole sandbox (a session's processes share them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    wall_s: float = Field(10.0, gt=0)
    """Wall-clock seconds per call; past it the call's whole process tree is killed."""
    cpu_s: float = Field(10.0, gt=0)
    """CPU seconds per process of a call (RLIMIT_CPU)."""
    memory_mb: int = Field(256, ge=16)
    """Memory of the sandbox (cgroup, or RLIMIT_AS where there is no cgroup)."""
    pids: int = Field(64, ge=4)
    """Processes and threads in the sandbox at once."""
    output_bytes: int = Field(64 * 1024, ge=256)
    """Bytes kept of stdout and of stderr each (head and tail, the middle cut and marked)."""
    tmp_mb: int = Field(64, ge=1)
    """Size of the writable /tmp."""


class ExecResult(BaseModel):
    """What one call did."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stdout: str = ""
    """Standard output, sanitised (see `turnrl.sandboxes.output`)."""
    stderr: str = ""
    """Standard error, sanitised; for a snippet it ends with the traceback of an exception."""
    exit_code: int | None = None
    """Exit status of the program (None when killed by a signal)."""
    signal: int | None = None
    """Signal that killed it, if one did."""
    timed_out: bool = False
    """The wall or CPU limit ended it."""
    oom_killed: bool = False
    """The memory limit ended it."""
    truncated: bool = False
    """stdout or stderr was cut to `Limits.output_bytes`."""
    wall_s: float = 0.0
    """Wall time of the call."""
    cpu_s: float = 0.0
    """CPU time used by the call's processes (user + system)."""
    snippet: bool = False
    """The call ran a Python snippet (`completed` is its success), not a program."""
    completed: bool = False
    """For snippets: the code ran to its end without raising (SystemExit included), as the
    worker's child reported after `exec` returned; a snippet that calls `os._exit(0)` early
    does not complete. The report travels on a descriptor the snippet's own process holds, so
    code written to forge it can (as in HumanEval's official harness, whose result list lives
    in the same process): graders that must resist that add a nonce of their own."""
    exception: str | None = None
    """For snippets: `Type: message` of the exception that ended the code, if one did."""
    state_lost: bool = False
    """For stateful snippets: the interpreter had to be killed, so variables are gone."""
    background_threads: int = 0
    """For stateful snippets: threads the code started that still run after the call. They
    keep the interpreter's state and CPU: what they print shows in later calls' output, and
    the CPU they burn between calls is billed to the next call (and bounded by its limit)."""
    error: str | None = None
    """The sandbox failed around the code (its worker died, a limit could not be set)."""

    @property
    def ok(self) -> bool:
        """Completed (snippets) or exited 0 (programs), within limits."""
        success = self.completed if self.snippet else self.exit_code == 0
        return success and not (self.timed_out or self.oom_killed or self.error)


class SandboxError(Exception):
    """The sandbox itself could not be provided (not the code's fault)."""


class SandboxSession(Protocol):
    """One episode's sandbox: files in /tmp and, for `python`, interpreter state persist across
    calls; everything is destroyed by `close()`."""

    async def python(self, code: str, limits: Limits | None = None) -> ExecResult:
        """Run a Python snippet in the session's interpreter (variables persist)."""
        ...

    async def python_fresh(self, code: str, limits: Limits | None = None) -> ExecResult:
        """Run a Python snippet in a fresh interpreter forked for this call (no state in or
        out, files excepted)."""
        ...

    async def run(
        self, argv: list[str], stdin: bytes = b"", limits: Limits | None = None
    ) -> ExecResult:
        """Run a program (argv[0] resolved on the sandbox's PATH) with `stdin`."""
        ...

    async def close(self) -> None:
        """Kill every process, remove the cgroup/container and files. Idempotent."""
        ...


class Sandbox(Protocol):
    """A backend: hands out sessions and runs one-shot calls."""

    @property
    def name(self) -> str:
        """Backend name (`bwrap`, `docker`, `subprocess`)."""
        ...

    async def session(self) -> SandboxSession:
        """A fresh session (from a warm pool where the backend has one)."""
        ...

    async def run(
        self, argv: list[str], stdin: bytes = b"", limits: Limits | None = None
    ) -> ExecResult:
        """Run one program in a fresh sandbox that is destroyed afterwards."""
        ...

    async def python(self, code: str, limits: Limits | None = None) -> ExecResult:
        """Run one snippet in a fresh interpreter in a fresh sandbox."""
        ...

    async def close(self) -> None:
        """Close every session and pooled worker. Idempotent."""
        ...
