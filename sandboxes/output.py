"""Turning the bytes a sandboxed program wrote into text an agent may read.

The worker caps each stream inside the sandbox (head and tail kept, the middle counted); here
the two ends are decoded with replacement (invalid UTF-8 never raises), NULs and terminal
control sequences are stripped (an observation must not carry escape codes that repaint a
log viewer, nor bytes a tokenizer treats specially), and the cut is marked with its size.
"""

from __future__ import annotations

import re

# ECMA-48 sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), other two-byte escapes,
# and the 8-bit CSI. Then every C0/C1 control character except newline and tab.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[@-Z\\-_]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize(data: bytes) -> str:
    """Decode as UTF-8 with replacement; drop NULs, escape sequences and control characters
    (newline and tab stay; `\\r\\n` becomes `\\n`)."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return _CONTROL.sub("", _ANSI.sub("", text))


def join_capture(head: bytes, tail: bytes, total: int) -> tuple[str, bool]:
    """The text of a capped stream: `(text, truncated)`. `total` counts every byte written;
    what fell between head and tail is replaced by a marker naming how much."""
    cut = total - len(head) - len(tail)
    if cut <= 0:
        return sanitize(head + tail), False
    return f"{sanitize(head)}\n…[{cut} bytes cut]…\n{sanitize(tail)}", True
