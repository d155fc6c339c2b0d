"""Run ids and the reaper: nothing a run started outlives it, even when the trainer is SIGKILLed.

Every sandbox resource carries its run's id: cgroup names (`turnrl-<run>-<n>`), the launcher's
command line (`turnrl-sandbox=<run>`), container labels (`turnrl.run_id`). A live run holds an
exclusive `flock` on `<lock dir>/<run>.lock` for its whole life; the kernel drops the lock
when the process dies, however it dies. The reaper, run at start-up and periodically, takes
every run id it finds on the machine, and removes the resources of each run whose lock it can
take (the run is dead). A live run's sandboxes are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import signal
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from turnrl.sandboxes.cgroups import PREFIX, CgroupDriver

CMDLINE_TAG = "turnrl-sandbox="
"""Marks a launcher's command line with its run id (`turnrl-sandbox=<run>`)."""
_RUN_ID = re.compile(r"^[a-z0-9]{6,32}$")


def lock_dir() -> Path:
    """Where run locks live: `$TURNRL_SANDBOX_LOCKS`, else a folder in the temp dir."""
    d = Path(os.environ.get("TURNRL_SANDBOX_LOCKS") or Path(tempfile.gettempdir()) / "turnrl-runs")
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class RunLock:
    """This process's run id, held alive by an exclusive lock until `release()` or death."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    _fd: int = -1

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"run id must be 6-32 lowercase letters or digits: {self.run_id!r}")
        path = lock_dir() / f"{self.run_id}.lock"
        self._fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                (lock_dir() / f"{self.run_id}.lock").unlink()
            os.close(self._fd)
            self._fd = -1


def run_is_alive(run_id: str) -> bool:
    """True while some process holds the run's lock."""
    path = lock_dir() / f"{run_id}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()
    return False


def cgroup_run_id(name: str) -> str | None:
    """The run id in a sandbox cgroup's name (`turnrl-<run>-<n>`)."""
    m = re.fullmatch(rf"{PREFIX}([a-z0-9]{{6,32}})-(\d+)", name)
    return m[1] if m else None


def tagged_processes() -> dict[int, str]:
    """pid -> run id of every launcher process on the machine with a run tag."""
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            if arg.startswith(CMDLINE_TAG.encode()):
                out[int(entry)] = arg[len(CMDLINE_TAG) :].decode(errors="replace")
                break
    return out


def _descendants(root: int) -> list[int]:
    """Live processes below `root` (by parent pid)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] != b"Z":
                kids.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


@dataclass
class Reaped:
    """What one reaper pass removed."""

    processes: int = 0
    cgroups: int = 0
    containers: int = 0
    runs: set[str] = field(default_factory=set)


def reap(
    cgroups: CgroupDriver | None,
    spare: Iterable[str] = (),
    only: str | None = None,
) -> Reaped:
    """Remove the processes and cgroups of dead runs (`only`: of that run, dead or not, as a
    run's own `close()` does). Runs in `spare` are never touched."""
    spared = set(spare)
    done = Reaped()
    alive: dict[str, bool] = {}

    def doomed(run: str) -> bool:
        if run in spared:
            return False
        if only is not None:
            return run == only
        if run not in alive:
            alive[run] = run_is_alive(run)
        return not alive[run]

    for pid, run in tagged_processes().items():
        if doomed(run):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)  # no new children while its tree is walked
            for _ in range(100):
                tree = _descendants(pid)
                if not tree:
                    break
                for child in tree:
                    with contextlib.suppress(OSError):
                        os.kill(child, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                done.processes += 1
                done.runs.add(run)
    if cgroups is not None:
        for name, group in cgroups.leftovers():
            owner = cgroup_run_id(name)
            if owner is not None and doomed(owner):
                done.processes += len(group.pids())
                group.remove()
                done.cgroups += 1
                done.runs.add(owner)
    return done
