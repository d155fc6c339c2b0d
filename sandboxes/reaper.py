"""Run ids and the reaper: nothing a run started outlives it, even when the trainer is SIGKILLed.

Every sandbox resource carries its run's id: cgroup names (`turnrl-<run>-<n>`), the launcher's
command line (`turnrl-sandbox=<run>`), container labels (`turnrl.run_id`), the `subprocess`
backend's work folders (`<temp dir>/turnrl-<run>-XXXXXXXX`). A live run holds an exclusive
`flock` on `<lock dir>/<run>.lock` for its whole life; the kernel drops the lock when the
process dies, however it dies. The reaper, run at start-up and periodically, takes every run id
it finds on the machine, and removes the resources of each run whose lock it can take (the run
is dead). A live run's sandboxes are never touched.

A tagged process is removed with everything below it. A process that exec'd carries no tag and
is found only while it stays below a tagged one, which is why each backend keeps its workers
under something that adopts orphans: a pid namespace (bwrap), a container (docker), a
subreaper supervisor and, where one is usable, a cgroup (subprocess).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from turnrl.sandboxes.cgroups import PREFIX, CgroupDriver

CMDLINE_TAG = "turnrl-sandbox="
"""Marks a launcher's command line with its run id (`turnrl-sandbox=<run>`)."""
_RUN_ID = re.compile(r"^[a-z0-9]{6,32}$")
_WORK_FOLDER = re.compile(r"turnrl-([a-z0-9]{6,32})-[a-z0-9_]{8}")
"""A work folder's name: `tempfile.mkdtemp(prefix=work_folder_prefix(run))` adds 8 characters."""


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


def work_folder_prefix(run_id: str) -> str:
    """The name prefix of a run's work folders in the temp dir (for `tempfile.mkdtemp`)."""
    return f"turnrl-{run_id}-"


def work_folders() -> dict[Path, str]:
    """Work folder -> run id of every run's work folder in the temp dir that this user owns (a
    folder of that name owned by another user, or a symlink, is none of ours)."""
    out: dict[Path, str] = {}
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            m = _WORK_FOLDER.fullmatch(entry.name)
            if m is None:
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                    out[base / entry.name] = m[1]
    return out


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


def kill_tree(root: int) -> bool:
    """SIGKILL `root` and every process below it; False if `root` was already gone. `root` is
    stopped first, so that it starts nothing new while its tree is walked, and killed last: a
    subreaper root adopts the orphans of the descendants killed before it, keeping them in the
    tree for the next pass."""
    try:
        os.kill(root, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    for _ in range(100):
        tree = _descendants(root)
        if not tree:
            break
        for child in tree:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
    try:
        os.kill(root, signal.SIGKILL)
    except OSError:
        return False
    return True


@dataclass
class Reaped:
    """What one reaper pass removed."""

    processes: int = 0
    cgroups: int = 0
    containers: int = 0
    folders: int = 0
    runs: set[str] = field(default_factory=set)


def reap(
    cgroups: CgroupDriver | None,
    spare: Iterable[str] = (),
    only: str | None = None,
    workdirs: bool = False,
) -> Reaped:
    """Remove the processes and cgroups of dead runs (`only`: of that run, dead or not, as a
    run's own `close()` does), and with `workdirs` their work folders. Runs in `spare` are
    never touched."""
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
        if doomed(run) and kill_tree(pid):
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
    if workdirs:
        for folder, owner in work_folders().items():
            if doomed(owner):
                shutil.rmtree(folder, ignore_errors=True)
                done.folders += 1
                done.runs.add(owner)
    return done
