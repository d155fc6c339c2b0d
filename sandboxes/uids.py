"""A host uid of its own for every sandbox, leased from a reserved range.

Some kernel resources are counted per user, not per process or cgroup: pipe buffer pages
(`fs.pipe-user-pages-soft`: past it, every new pipe of that user gets one page), inotify
watches, message queue bytes, the key quota, `RLIMIT_NPROC`. Sandboxes that share a uid share
those: one episode holding thousands of pipes shrank every other episode's pipes (measured).
So each worker runs as a uid of its own, taken from `[UID_BASE, UID_BASE + UID_COUNT)`, which
no account on a normal machine uses: below 2^31 (tools that read uids as signed break above
it) and above the ranges that systemd and `/etc/subuid` hand out (systemd-nspawn containers
end at 0x6FFFFFFF).

A lease is an exclusive `flock` on `<tmp>/turnrl-uids/<uid>.lock`, held while the worker lives
and dropped by the kernel however the trainer dies, so runs on one machine never share a uid
while both are alive. Inside a bwrap sandbox the code still sees uid 65534 (the user namespace
maps it); in docker, which maps nothing, it sees the leased uid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from turnrl.sandboxes.base import SandboxError

UID_BASE = 0x7E000000
"""First uid of the reserved range (2113929216)."""
UID_COUNT = 1 << 16
"""Uids in the range: more than the sandboxes one machine can hold at once."""


def _lease_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "turnrl-uids"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


@dataclass
class UidLease:
    """One uid, held until `release()` (or the holder's death)."""

    uid: int
    _fd: int

    def release(self) -> None:
        """Give the uid back. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lease_uid() -> UidLease:
    """A uid no other live sandbox on this machine holds. Starts at a random offset so that
    runs starting together rarely contend for the same lock files."""
    d = _lease_dir()
    start = secrets.randbelow(UID_COUNT)
    for i in range(UID_COUNT):
        uid = UID_BASE + (start + i) % UID_COUNT
        fd = os.open(d / f"{uid}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return UidLease(uid, fd)
    raise SandboxError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")
