"""Resource limits for sandboxes through cgroups, v1 or v2, whichever this machine can use.

Measured on the build machines (DESIGN.md): the v1 `pids` and `memory` controllers work and
the v2 mount has no controllers, so both are supported and `detect()` picks the one that has
the controllers we need. A sandbox's cgroup is created before its first process starts (the
launcher writes its own pid into `cgroup.procs` and then execs bubblewrap), so nothing it
forks ever runs outside the limits. Every cgroup's name starts with `turnrl-<run id>-`, which
is how the reaper finds the ones a dead run left behind.

v1: one directory per controller (`memory`, `pids`, `cpu`), limits in `memory.limit_in_bytes`,
`pids.max`, `cpu.cfs_quota_us`; OOM kills counted in `memory.oom_control`. v2: one directory
under a `turnrl` parent whose `cgroup.subtree_control` enables the controllers; limits in
`memory.max` (with `memory.swap.max` 0), `pids.max`, `cpu.max`; OOM kills in `memory.events`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PREFIX = "turnrl-"
_V1_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class CgroupLimits:
    memory_mb: int
    pids: int
    cpus: float


class Cgroup:
    """One sandbox's cgroup (one directory per controller on v1, one on v2)."""

    def __init__(self, dirs: dict[str, Path], version: int) -> None:
        self.dirs = dirs
        self.version = version

    @property
    def procs_files(self) -> list[Path]:
        """The `cgroup.procs` files a launcher joins (each distinct directory once)."""
        return [d / "cgroup.procs" for d in dict.fromkeys(self.dirs.values())]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(OSError):
                out |= {int(x) for x in f.read_text().split()}
        return out

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.dirs["memory"] / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, KeyError, ValueError):
            pass
        return 0

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until it is empty (a fork bomb is bounded by
        the pids limit, so repeated passes converge)."""
        kill_file = self.dirs.get("pids", Path()) / "cgroup.kill"
        if self.version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self) -> None:
        """Kill what is left and delete the directories. Idempotent."""
        self.kill_all()
        for d in dict.fromkeys(self.dirs.values()):
            for _ in range(100):  # rmdir fails while the kernel still tears processes down
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


class CgroupDriver:
    """Creates sandbox cgroups on one hierarchy."""

    def __init__(self, version: int, bases: dict[str, Path]) -> None:
        self.version = version
        self.bases = bases
        """Where sandbox cgroups are created, per controller."""

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        assert name.startswith(PREFIX)
        dirs = {c: base / name for c, base in self.bases.items()}
        for d in dict.fromkeys(dirs.values()):
            d.mkdir(exist_ok=True)
        group = Cgroup(dirs, self.version)
        mem = limits.memory_mb * 1024 * 1024
        quota = max(int(limits.cpus * 100_000), 1000)
        try:
            if self.version == 1:
                _write(dirs["memory"] / "memory.limit_in_bytes", str(mem))
                _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(mem), optional=True)
                _write(dirs["pids"] / "pids.max", str(limits.pids))
                if "cpu" in dirs:
                    _write(dirs["cpu"] / "cpu.cfs_period_us", "100000")
                    _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
            else:
                d = dirs["memory"]
                _write(d / "memory.max", str(mem))
                _write(d / "memory.swap.max", "0", optional=True)
                _write(d / "pids.max", str(limits.pids))
                _write(d / "cpu.max", f"{quota} 100000", optional=True)
        except OSError:
            group.remove()
            raise
        return group

    def leftovers(self) -> list[tuple[str, Cgroup]]:
        """Every turnrl sandbox cgroup on this hierarchy, by name."""
        names: set[str] = set()
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                names |= {p.name for p in base.iterdir() if p.name.startswith(PREFIX)}
        return [
            (n, Cgroup({c: b / n for c, b in self.bases.items()}, self.version))
            for n in sorted(names)
        ]


def detect(root: Path = ROOT) -> CgroupDriver | None:
    """The usable hierarchy with memory and pids controllers (v2 preferred), or None."""
    v2 = _v2_root(root)
    if v2 is not None:
        return v2
    bases: dict[str, Path] = {}
    for controller in _V1_CONTROLLERS:
        mount = root / controller
        if not (mount / "cgroup.procs").exists():
            continue
        base = mount
        if _writable(base):
            bases[controller] = base
    if "memory" in bases and "pids" in bases:
        return CgroupDriver(1, bases)
    return None


def _v2_root(root: Path) -> CgroupDriver | None:
    for mount in (root, root / "unified"):
        controllers = mount / "cgroup.controllers"
        if not controllers.exists():
            continue
        have = set(controllers.read_text().split())
        if not {"memory", "pids"} <= have or not _writable(mount):
            continue
        parent = mount / "turnrl"
        try:
            wanted = " ".join(f"+{c}" for c in ("memory", "pids", "cpu") if c in have)
            _write(mount / "cgroup.subtree_control", wanted)
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", wanted)
        except OSError:
            continue
        return CgroupDriver(2, {"memory": parent, "pids": parent})
    return None


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise
