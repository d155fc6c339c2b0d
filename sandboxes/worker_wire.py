"""What crosses the worker's descriptors: frames, output captures, and a snippet's report.

Part of the warm worker (`worker.py`), shipped with it as one program (`pool.worker_source`), so
standard library only. Kept apart because these are the formats the two sides of a descriptor
agree on, and the reading side trusts none of them: the host reads the worker's frames, the
worker reads the reports of children that run the snippet's code.

Frames: a 4-byte big-endian length and a UTF-8 JSON object, requests from the host on the
worker's stdin and replies on its stdout, and the worker's commands to the stateful kernel on
`KERNEL_CMD_FD`. Output is capped in the sandbox (`Capture`, keeping head and tail), so a flood
never crosses the boundary; decoding and sanitising happen on the host.

A snippet's report (completed, exception) travels on its own descriptor (`REPORT_FD`) and is
bounded (`REPORT_BYTES`); a report that is not the expected JSON object is taken as "did not
complete".
"""

from __future__ import annotations

import base64
import json
import os
import struct

REPORT_FD = 3
REPORT_BYTES = 8192
"""Bytes of a snippet's report read at most; the honest report is well under (its exception
text is cut at 2000 characters), anything past it is drained and dropped."""
KERNEL_CMD_FD = 4


class Capture:
    """Keeps the first and last `cap // 2` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.half = max(cap // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    def dump(self) -> dict[str, object]:
        return {
            "head": base64.b64encode(bytes(self.head)).decode(),
            "tail": base64.b64encode(bytes(self.tail)).decode(),
            "total": self.total,
        }


def read_frame(fd: int) -> bytes | None:
    header = read_exact(fd, 4)
    if header is None:
        return None
    (n,) = struct.unpack(">I", header)
    return read_exact(fd, n)


def read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def write_frame(fd: int, obj: object) -> None:
    body = json.dumps(obj).encode()
    data = struct.pack(">I", len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


class ReportLines:
    """The stateful kernel's report channel, read line by line until the report of call
    `seq`. The snippet runs in the kernel's process and can write to the channel too: lines
    that are not that report (a flood, a stale or forged line) are dropped, each bounded by
    `REPORT_BYTES`, so the next call never reads this call's leftovers as its own."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.buf = bytearray()
        self.skipping = False
        """Inside an over-long line: drop bytes up to its newline."""
        self.found: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        while chunk and self.found is None:
            end = chunk.find(b"\n")
            part, chunk = (chunk, b"") if end < 0 else (chunk[:end], chunk[end + 1 :])
            if not self.skipping:
                self.buf += part[: REPORT_BYTES + 1 - len(self.buf)]
                self.skipping = len(self.buf) > REPORT_BYTES
            if end < 0:
                return
            line, self.skipping = bytes(self.buf), False
            self.buf.clear()
            if len(line) <= REPORT_BYTES and self.answers(line):
                self.found = line

    def answers(self, line: bytes) -> bool:
        try:
            rep = json.loads(line)
        except ValueError:
            return False
        return isinstance(rep, dict) and rep.get("seq") == self.seq


def parse_report(report: bytes) -> dict[str, object]:
    """The report of a snippet as `{"completed": bool, "exception": str | None}`; one that is
    missing, not JSON, or of the wrong shape (the snippet wrote to its report descriptor)
    reads as not completed."""
    try:
        rep = json.loads(report.split(b"\n")[0]) if report else None
    except ValueError:
        rep = None
    if not isinstance(rep, dict):
        return {"completed": False, "exception": "ReportError: no valid report" if report else None}
    completed, exception = rep.get("completed"), rep.get("exception")
    if not isinstance(completed, bool) or not isinstance(exception, (str, type(None))):
        return {"completed": False, "exception": "ReportError: malformed report"}
    return {"completed": completed, "exception": exception[:2000] if exception else exception}
