"""Returning freed CPU memory to the system between learner steps (glibc only).

A learner step on CPU allocates and frees gigabytes of tensors whose shapes change with every
batch (micro-batch rows x lengths). glibc malloc serves blocks under its mmap threshold from
per-thread arenas and keeps what is freed there for reuse; the threshold itself rises to the
largest block freed so far (up to 32 MiB), so most activations end up in arenas. Measured here
(benchmarks/bench_memory.py, embedded 135M model, 16 episodes of ~800 tokens, micro-batch
budget 8192): RSS after each step grew 7.6 -> 9.5 GB over 6 steps while the live tensors were
~2.3 GB, and the steps' peaks grew with it. Two remedies, both process-wide:

- `serve_large_blocks_by_mmap`: a fixed 1 MiB mmap threshold (`mallopt(M_MMAP_THRESHOLD)`), so
  every block of 1 MiB or more gets its own mapping and goes back to the system when freed.
  RSS after a step stays near the live size, and the peak drops (7.0 vs 8.0 GB on the same
  first step). Setting the threshold also stops glibc from raising it.
- `release_free_memory`: `malloc_trim(0)` returns the free pages of every arena (the smaller
  blocks, and what other threads freed: the loop's measurement passes run in worker threads).

`returned_to_system` applies both around one learner pass: the 1 MiB threshold inside it, and
on the way out glibc's own ceiling (32 MiB, where its dynamic threshold ends up after the first
large frees, so code outside the passes, such as the policy's decoding, allocates as it would
by default) and a trim. The threshold is process-wide: the loop never samples while the
learner runs. Elsewhere (macOS, musl) all of it is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks of this size or more are mapped on their own (1 MiB: a 576-wide float32 row block of
~450 rows; the per-layer activations of a micro-batch are all larger)."""

GLIBC_MAX_MMAP_THRESHOLD_BYTES = 32 << 20
"""The ceiling of glibc's dynamic mmap threshold on 64-bit systems (`DEFAULT_MMAP_THRESHOLD_MAX`):
what the threshold is after a process has freed a block that large."""

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        # Both symbols exist only in glibc.
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def serve_large_blocks_by_mmap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve blocks of `threshold` bytes or more by their own mappings from now on (the whole
    process); True when set."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> bool:
    """Return the free memory of every malloc arena to the system; True when some was."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


@contextlib.contextmanager
def returned_to_system(enabled: bool = True) -> Iterator[None]:
    """Inside, blocks of 1 MiB or more are mapped on their own; on exit the threshold goes
    to glibc's ceiling and every arena's free memory is returned (module docstring)."""
    if not enabled:
        yield
        return
    serve_large_blocks_by_mmap()
    try:
        yield
    finally:
        serve_large_blocks_by_mmap(GLIBC_MAX_MMAP_THRESHOLD_BYTES)
        release_free_memory()
