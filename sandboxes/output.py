"""Turning the bytes a sandboxed program wrote into text an agent may read.

The worker caps each stream inside the sandbox (head and tail kept, the middle counted); here
the two ends are decoded with replacement (invalid UTF-8 never raises), NULs and terminal
control sequences are stripped (an observation must not carry escape codes that repaint a
log viewer, nor bytes a tokenizer treats specially), and the cut is marked with its size.

Invisible format characters are stripped too: bidi controls, which make a person's viewer
show text in another order than the model reads it ("Trojan Source", CVE-2021-42574), and
zero-width characters and Unicode tag characters, which hide text from a person (tags are the
"ASCII smuggling" channel: invisible, yet read by a model). One exception: a zero-width joiner
between two pictographs stays, so an emoji sequence such as a family or a rainbow flag stays
one glyph; there it hides nothing (it is what draws the sequence), and stripping it would
change what an agent's code printed. A zero-width non-joiner, which shapes Persian or Indic
words, goes: a word then renders unjoined but reads the same, and a stripped one can no longer
split a word that a person's search or a reviewer's eye would otherwise match.
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
_PICTOGRAPH = (
    "\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u21aa\u231a-\u23ff\u24c2\u25aa-\u25fe"
    "\u2600-\u27bf\u2934\u2935\u2b05-\u2b55\u3030\u303d\u3297\u3299\U0001f000-\U0001faff"
)
"""The blocks of Unicode's Extended_Pictographic property (emoji), the characters a zero-width
joiner joins into one glyph."""
_INVISIBLE = re.compile(
    # Bidi controls: embeddings and overrides, isolates, marks (LRM, RLM, ALM).
    "[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c"
    # Zero-width space, non-joiner, word joiner, BOM; invisible operators; deprecated format
    # controls; the Mongolian vowel separator; interlinear annotation; tag characters.
    "\u200b\u200c\u2060-\u2064\u206a-\u206f\ufeff\u180e\ufff9-\ufffb\U000e0001\U000e0020-\U000e007f]"
)
_LONE_JOINER = re.compile(f"(?<![{_PICTOGRAPH}\ufe0f])\u200d|\u200d(?![{_PICTOGRAPH}])")
"""A zero-width joiner anywhere but between a pictograph (or its emoji variation selector) and
a pictograph."""


def sanitize(data: bytes) -> str:
    """Decode as UTF-8 with replacement; drop NULs, escape sequences, control characters
    (newline and tab stay; `\\r\\n` becomes `\\n`) and invisible format characters (see
    the module docstring)."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    text = _INVISIBLE.sub("", _CONTROL.sub("", _ANSI.sub("", text)))
    return _LONE_JOINER.sub("", text) if "\u200d" in text else text


def join_capture(head: bytes, tail: bytes, total: int) -> tuple[str, bool]:
    """The text of a capped stream: `(text, truncated)`. `total` counts every byte written;
    what fell between head and tail is replaced by a marker naming how much."""
    cut = total - len(head) - len(tail)
    if cut <= 0:
        return sanitize(head + tail), False
    return f"{sanitize(head)}\n…[{cut} bytes cut]…\n{sanitize(tail)}", True
