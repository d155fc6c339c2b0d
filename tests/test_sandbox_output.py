"""`sanitize` strips invisible format characters: bidi controls (which reorder what a person
sees), zero-width characters and tag characters (which hide text from a person), keeping a
zero-width joiner only inside an emoji sequence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnrl.sandboxes.output import join_capture, sanitize

BIDI = [chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]]
"""Embeddings and overrides (LRE, RLE, PDF, LRO, RLO), isolates (LRI, RLI, FSI, PDI) and the
marks (LRM, RLM, ALM)."""
ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]
"""Zero-width space, non-joiner, joiner, word joiner, byte-order mark."""
TAGS = ["\U000e0001", *(chr(c) for c in range(0xE0020, 0xE0080))]
"""Unicode tag characters: invisible, yet a model reads them (text smuggled past a person)."""
INVISIBLE = [*BIDI, *ZERO_WIDTH, *TAGS]

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man, woman, girl
RAINBOW_FLAG = "\U0001f3f3\ufe0f\u200d\U0001f308"  # white flag, VS16, rainbow
RUNNER_WOMAN = "\U0001f3c3\U0001f3fd\u200d\u2640\ufe0f"  # runner, skin tone, female sign


@pytest.mark.parametrize("char", INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
def test_each_invisible_character_is_stripped(char: str) -> None:
    assert sanitize(f"a{char}b{char}".encode()) == "ab"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        # Trojan Source (CVE-2021-42574): shown reversed, read in order.
        ("access = 'user\u202e \u2066// admin\u2069 \u2066'", "access = 'user // admin '"),
        ("if x:\u2067 # comment\u2069", "if x: # comment"),
        ("pass\u200bword", "password"),  # a split a person's search would miss
        ("\ufeffBOM at the start", "BOM at the start"),
        (
            "hi\U000e0001\U000e0069\U000e0067\U000e006e\U000e006f\U000e0072\U000e0065\U000e007f",
            "hi",
        ),
        ("\u200dalone\u200d", "alone"),  # a joiner with no pictograph on either side
        ("x\u200d\U0001f600", "x\U0001f600"),  # a pictograph on one side only
        ("\U0001f600\u200dx", "\U0001f600x"),
        ("\U0001f600\u200d\u200d\U0001f600", "\U0001f600\U0001f600"),  # doubled: both go
        ("mi\u200cخواهم", "miخواهم"),  # non-joiner: stripped everywhere (module docstring)
    ],
)
def test_sanitize_invisible(raw: str, text: str) -> None:
    assert sanitize(raw.encode()) == text


@pytest.mark.parametrize(
    "emoji", [FAMILY, RAINBOW_FLAG, RUNNER_WOMAN, "\u2764\ufe0f\u200d\U0001f525"]
)
def test_emoji_joiner_sequences_stay_whole(emoji: str) -> None:
    assert sanitize(f"[{emoji}] {emoji}{emoji}".encode()) == f"[{emoji}] {emoji}{emoji}"


def test_marked_cut_strips_on_both_sides() -> None:
    text, truncated = join_capture("a\u202eb".encode(), "c\u200bd".encode(), 100)
    assert truncated and text.startswith("ab\n") and text.endswith("\ncd")


@given(
    st.lists(
        st.one_of(st.text(max_size=6), st.sampled_from(INVISIBLE), st.sampled_from([FAMILY])),
        max_size=20,
    )
)
def test_no_invisible_character_survives(parts: list[str]) -> None:
    """Whatever surrounds them, only emoji joiners are left."""
    out = sanitize("".join(parts).encode())
    assert not (set(INVISIBLE) - {"\u200d"}) & set(out)
    for i, c in enumerate(out):
        if c == "\u200d":
            assert 0 < i < len(out) - 1
            assert ord(out[i - 1]) >= 0x2000 and ord(out[i + 1]) >= 0x2000
