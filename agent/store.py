"""The run store: append-only, crash-safe record files under a run directory.

Format. A record file is a sequence of frames, each a 16-byte little-endian header followed by
the payload: `magic "TRR1" | payload length u32 | CRC32(payload) u32 | CRC32(first 12 header
bytes) u32`. The header has its own CRC so that a flipped length bit is caught as corruption
rather than read as "this record runs past the end of the file" (which would look torn).

Guarantees.
- A record is written with one `os.write()` on an `O_APPEND` descriptor, so records never
  interleave and a crash leaves at most one partial frame, at the tail. A short write (disk
  full, file-size limit) is rolled back with `ftruncate` before the error is raised.
- On open, a writer scans the file and truncates a torn tail: a short header, a payload that
  runs past the end, or a bad header/payload CRC followed only by zero bytes (a file extended
  by a power loss before its data reached the disk). `dropped_bytes` reports how much went.
- A bad frame with non-zero bytes after it is corruption, not a torn write: `CorruptRecordError`
  names the file and offset. Records are never skipped silently.
- fsync (`fdatasync`) is batched: every `fsync_every` records, or at the first append after
  `fsync_interval_s` (no background thread), and on `flush()`/`close()`. A killed process
  loses nothing whose `write()` returned (the page cache survives it); a power failure may
  lose records appended after the last fsync, but not the synced ones before them.
- One writer per file, enforced with a non-blocking `flock`; readers take no lock, never
  modify the file, and stop at the last good record (a live writer's in-flight tail).
Not guaranteed: durability of unsynced records across power loss (and a filesystem that
persisted them out of order, leaving data after a zeroed gap, makes open raise rather than
guess); protection against other programs writing the file; thread safety (use one store from
one thread or event loop). A writer's open reads and CRCs the whole file: O(size).

The API is sync on purpose: an append is one `write()` into the page cache (microseconds), so
calling it from the event loop is cheaper than a hop to a thread; only the batched fsync waits
on the disk, and on a slow disk `flush()` can be run with `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from turnrl.agent.records import SCHEMA_VERSION, Episode, upgrade_episode

MAGIC = b"TRR1"
HEADER = struct.Struct("<4sIII")
MAX_PAYLOAD = 0x7FFFF000 - HEADER.size
"""Linux caps one `write()` at 0x7ffff000 bytes; a larger record could not be written whole."""
_CHUNK = 1 << 20
_sync = getattr(os, "fdatasync", os.fsync)  # fdatasync also persists an append's new size


class CorruptRecordError(Exception):
    """A record before the end of the file is damaged; the file needs a person's attention."""


class RecordFileLockedError(Exception):
    """Another live writer holds the file's lock."""


_CURRENT_TAIL = b'"schema_version":%d}' % SCHEMA_VERSION
"""How a record in the current layout ends (`schema_version` is `Episode`'s last field):
such records skip the upgrade path."""


def fsync_dir(path: Path) -> None:
    """Make a new or renamed entry of `path` durable: a directory entry is only durable once
    its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: written whole to a temporary file beside it,
    fsynced, renamed over it, the directory synced. Readers see the old text or the new,
    never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _zeros_from(fd: int, offset: int, end: int) -> bool:
    while offset < end:
        chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        offset += len(chunk)
    return True


def _scan(fd: int, path: Path, end: int) -> Iterator[tuple[int, bytes]]:
    """Yield `(offset, payload)` of each good record before `end`; stop at a torn tail."""
    off = 0
    while end - off >= HEADER.size:
        head = os.pread(fd, HEADER.size, off)
        if len(head) < HEADER.size:
            return
        magic, length, crc, head_crc = HEADER.unpack(head)
        if magic != MAGIC or zlib.crc32(head[:12]) != head_crc:
            if _zeros_from(fd, off + HEADER.size, end):
                return
            raise CorruptRecordError(
                f"{path}: bad record header at byte offset {off} with data after it; "
                "the file was damaged after it was written (not a torn tail)"
            )
        stop = off + HEADER.size + length
        if stop > end:
            return
        payload = os.pread(fd, length, off + HEADER.size)
        if len(payload) < length:
            return
        if zlib.crc32(payload) != crc:
            if _zeros_from(fd, stop, end):
                return
            raise CorruptRecordError(
                f"{path}: payload CRC mismatch in the record at byte offset {off} with data "
                "after it; the file was damaged after it was written (not a torn tail)"
            )
        yield off, payload
        off = stop


class RecordFile:
    """An append-only file of framed records; iterate it for the payloads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        fsync_every: int = 64,
        fsync_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        """The file."""
        self.readonly = readonly
        """A reader: no lock, no truncation, no appends."""
        self.fsync_every = fsync_every
        """Fsync once this many records are unsynced."""
        self.fsync_interval_s = fsync_interval_s
        """Fsync at the first append this long after the oldest unsynced one."""
        self.dropped_bytes = 0
        """Bytes of torn tail a writer cut off on open (0 for a reader)."""
        self._unsynced = 0
        self._oldest_unsynced = 0.0
        self._broken: str | None = None
        self._fd = -1
        if readonly:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            return
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            self._fd = os.open(self.path, flags)
            created = False
        try:
            self._lock()
            size = os.fstat(self._fd).st_size
            good_end = 0
            for off, payload in _scan(self._fd, self.path, size):
                good_end = off + HEADER.size + len(payload)
            if good_end < size:
                os.ftruncate(self._fd, good_end)
                _sync(self._fd)
                self.dropped_bytes = size - good_end
            if created:
                fsync_dir(self.path.parent)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> RecordFile:
        """A reader, safe on a file a live writer is appending to."""
        return cls(path, readonly=True)

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecordFileLockedError(
                f"{self.path} is already open for writing by another live writer; "
                "one writer per file (open it with open_readonly to read it)"
            ) from None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _check_writable(self) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: record file is closed")
        if self.readonly:
            raise ValueError(f"{self.path}: record file is open read-only")
        if self._broken is not None:
            raise OSError(f"{self.path}: unusable after a failed rollback ({self._broken})")

    def append(self, payload: bytes) -> None:
        """Append one record; fsync if the batch is due."""
        self._check_writable()
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"{self.path}: record of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        head = MAGIC + struct.pack("<II", len(payload), zlib.crc32(payload))
        frame = head + struct.pack("<I", zlib.crc32(head)) + payload
        written = os.write(self._fd, frame)
        if written != len(frame):
            # Left in place, the partial frame would become corruption in the middle once the
            # next record lands after it. We are the only writer, so the frame began at
            # `size - written`.
            try:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            except OSError as e:
                self._broken = str(e)
                raise
            raise OSError(
                f"{self.path}: short write ({written} of {len(frame)} bytes); record rolled back"
            )
        now = time.monotonic()
        if self._unsynced == 0:
            self._oldest_unsynced = now
        self._unsynced += 1
        if (
            self._unsynced >= self.fsync_every
            or now - self._oldest_unsynced >= self.fsync_interval_s
        ):
            self.flush()

    def flush(self) -> None:
        """Fsync every record appended so far."""
        if self.closed or self.readonly or self._unsynced == 0:
            return
        _sync(self._fd)
        self._unsynced = 0

    def __iter__(self) -> Iterator[bytes]:
        """The payloads, in order: a writer's up to now, a reader's up to the last good one."""
        if self.closed:
            raise ValueError(f"{self.path}: record file is closed")
        # A writer's file always ends on a record boundary (torn tails are cut on open, short
        # writes rolled back); a reader's may end in a live writer's in-flight record.
        for _, payload in _scan(self._fd, self.path, os.fstat(self._fd).st_size):
            yield payload

    def close(self) -> None:
        """Fsync, release the lock, close. Idempotent."""
        if self.closed:
            return
        try:
            if self._broken is None:
                self.flush()
        finally:
            os.close(self._fd)  # also releases the flock
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RunStore:
    """A run directory: `episodes.rec` (one `Episode` JSON per record), `metrics.rec` (one
    JSON object per record), `rollouts.rec` (the rollout journal: each episode as its rollout
    ended, before grading and scoring, so that a run killed mid-step resumes without losing
    or repeating a finished rollout: `turnrl.resume`) and `config.yaml` (replaced
    atomically)."""

    EPISODES = "episodes.rec"
    METRICS = "metrics.rec"
    ROLLOUTS = "rollouts.rec"
    CONFIG = "config.yaml"

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        readonly: bool = False,
        fsync_every: int = 64,
        fsync_interval_s: float = 1.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        """The run directory; created by a writer."""
        self.readonly = readonly
        """A reader for replay: no lock, no truncation, no writes."""
        self._files: dict[str, RecordFile] = {}
        if readonly:
            if not self.run_dir.is_dir():
                raise FileNotFoundError(f"{self.run_dir}: no such run directory")
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in (self.EPISODES, self.METRICS, self.ROLLOUTS):
                self._files[name] = RecordFile(
                    self.run_dir / name,
                    fsync_every=fsync_every,
                    fsync_interval_s=fsync_interval_s,
                )
        except BaseException:
            self.close()
            raise

    @classmethod
    def open_readonly(cls, run_dir: str | os.PathLike[str]) -> RunStore:
        """A reader, safe on a run a live writer is appending to."""
        return cls(run_dir, readonly=True)

    def _writer(self, name: str) -> RecordFile:
        if self.readonly:
            raise ValueError(f"{self.run_dir}: run store is open read-only")
        if name not in self._files:
            raise ValueError(f"{self.run_dir}: run store is closed")
        return self._files[name]

    def _read(self, name: str) -> Iterator[bytes]:
        if not self.readonly:
            yield from self._writer(name)
            return
        # A reader opens per read so that it sees files and records a live writer adds later.
        path = self.run_dir / name
        if not path.exists():
            return
        with RecordFile.open_readonly(path) as f:
            yield from f

    def append_episode(self, episode: Episode) -> None:
        self._writer(self.EPISODES).append(episode.model_dump_json().encode())

    def append_metrics(self, metrics: Mapping[str, Any]) -> None:
        self._writer(self.METRICS).append(json.dumps(metrics).encode())

    def append_rollout(self, episode: Episode) -> None:
        """Journal an episode whose rollout ended (ungraded); `episodes.rec` gets it scored."""
        self._writer(self.ROLLOUTS).append(episode.model_dump_json().encode())

    def episodes(self) -> Iterator[Episode]:
        yield from self._episodes(self.EPISODES)

    def rollouts(self) -> Iterator[Episode]:
        """The rollout journal, in the order rollouts ended."""
        yield from self._episodes(self.ROLLOUTS)

    def _episodes(self, name: str) -> Iterator[Episode]:
        for payload in self._read(name):
            if payload.endswith(_CURRENT_TAIL):
                yield Episode.model_validate_json(payload)
            else:
                yield Episode.model_validate(upgrade_episode(json.loads(payload)))

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for payload in self._read(self.METRICS)]

    def write_config(self, text: str, name: str = CONFIG) -> None:
        """Replace `name` (default `config.yaml`, the run's own config) atomically: readers see
        the old text or the new, never half."""
        if self.readonly:
            raise ValueError(f"{self.run_dir}: run store is open read-only")
        replace_file(self.run_dir / name, text)

    def config_text(self) -> str | None:
        """The stored `config.yaml`, or None when none was written."""
        path = self.run_dir / self.CONFIG
        return path.read_text(encoding="utf-8") if path.exists() else None

    @property
    def dropped_bytes(self) -> dict[str, int]:
        """Bytes of torn tail cut off each record file when this writer opened it."""
        return {name: f.dropped_bytes for name, f in self._files.items()}

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        """Fsync and close the record files. Idempotent."""
        files, self._files = self._files, {}
        errors: list[BaseException] = []
        for f in files.values():
            try:
                f.close()
            except BaseException as e:  # close the others even if one fails
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
