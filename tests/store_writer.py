"""A writer for the SIGKILL test: `python store_writer.py RUN_DIR [--raw]`.

It resumes after the records already stored and appends `make_episode(i)` to the run store
(or, with `--raw`, `make_payload(i)` to `RUN_DIR/raw.rec`) in a loop; after each explicit
`flush()` it prints how many records are now fsynced. Raw payloads are megabytes built with
one memcpy, so most of the loop's time is spent inside `write()` and a kill often tears a
record. It stops by itself after a minute so that a lost test never leaves it running.
"""

from __future__ import annotations

import random
import struct
import sys
import time
from collections.abc import Callable

from turnrl.agent.records import Episode, StopReason, ToolCall, ToolResult, Turn
from turnrl.agent.store import RecordFile, RunStore


def make_episode(i: int) -> Episode:
    """Episode `i`, the same every time; some are large so that a kill can tear a write."""
    rng = random.Random(i)
    big = rng.random() < 0.3
    turns = []
    for t in range(rng.randint(1, 3)):
        n = rng.randint(20_000, 80_000) if big else rng.randint(1, 50)
        calls = [ToolCall(id=f"t{t}c0", name="search", raw='{"q": "x"}', arguments={"q": "x"})]
        turns.append(
            Turn(
                index=t,
                prompt_ids=[rng.randrange(50_000) for _ in range(5)] if t == 0 else [],
                completion_ids=[rng.randrange(50_000) for _ in range(n)],
                completion_logprobs=[-rng.random() for _ in range(n)],
                observation_ids=[rng.randrange(50_000) for _ in range(3)],
                text=f"episode {i} turn {t}",
                finish_reason="stop",
                tool_calls=calls,
                tool_results=[ToolResult(call_id=f"t{t}c0", text="found", cost={"calls": 1.0})],
                rewards={"format": 1.0, "tool": rng.random()},
            )
        )
    return Episode(
        episode_id=f"e{i}",
        task_id=f"task{i % 7}",
        group_id=f"g{i // 4}",
        turns=turns,
        stop_reason=StopReason.ANSWERED,
        answer=str(i),
        outcome={"exact_match": float(i % 2)},
        cost={"calls": float(len(turns))},
    )


def make_payload(i: int) -> bytes:
    """Raw record `i`: its index repeated over 16 to 512 KiB."""
    return struct.pack("<Q", i) * random.Random(i).randint(2 << 10, 64 << 10)


def append_forever(start: int, append: Callable[[int], None], flush: Callable[[], None]) -> None:
    rng = random.Random()
    deadline = time.monotonic() + 60
    i = start
    while time.monotonic() < deadline:
        for _ in range(rng.randint(1, 4)):
            append(i)
            i += 1
        flush()
        print(i, flush=True)


def main(run_dir: str, raw: bool) -> None:
    # Only explicit flushes fsync, so a printed count means exactly "fsynced".
    sync = {"fsync_every": 1 << 30, "fsync_interval_s": 1e9}
    if raw:
        with RecordFile(f"{run_dir}/raw.rec", **sync) as f:
            append_forever(sum(1 for _ in f), lambda i: f.append(make_payload(i)), f.flush)
    else:
        with RunStore(run_dir, **sync) as store:
            n = sum(1 for _ in store.episodes())
            append_forever(n, lambda i: store.append_episode(make_episode(i)), store.flush)


if __name__ == "__main__":
    main(sys.argv[1], raw="--raw" in sys.argv[2:])
