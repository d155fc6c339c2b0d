"""Behaviour of the record file and run store: round trips, torn tails, corruption, locking,
and recovery after a writer is SIGKILLed mid-run."""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.agent.store import (
    HEADER,
    CorruptRecordError,
    RecordFile,
    RecordFileLockedError,
    RunStore,
)

WRITER = Path(__file__).with_name("store_writer.py")
_spec = importlib.util.spec_from_file_location("store_writer", WRITER)
assert _spec is not None and _spec.loader is not None
store_writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store_writer)
make_episode = store_writer.make_episode
make_payload = store_writer.make_payload

PAYLOADS = [b"alpha", b"", b"gamma" * 20]


def write_records(path: Path, payloads: list[bytes]) -> bytes:
    with RecordFile(path) as f:
        for p in payloads:
            f.append(p)
    return path.read_bytes()


def frame(tmp_path: Path, payload: bytes) -> bytes:
    """The bytes of one valid frame, produced by the real writer."""
    return write_records(tmp_path / f"frame-{len(payload)}.rec", [payload])


def offsets(payloads: list[bytes]) -> list[int]:
    out, off = [], 0
    for p in payloads:
        out.append(off)
        off += HEADER.size + len(p)
    return [*out, off]


def test_episode_and_metrics_round_trip(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(6)]
    with RunStore(tmp_path / "run") as store:
        for ep in episodes:
            store.append_episode(ep)
        store.append_metrics({"step": 0, "loss": 0.25, "tags": ["a"]})
        store.append_metrics({"step": 1, "loss": 0.125})
        assert list(store.episodes()) == episodes
        store.write_config("lr: 1.0e-5\n")
        store.write_config("lr: 2.0e-5\n")
    assert any(len(ep.turns) > 1 for ep in episodes) and all(ep.n_tool_calls for ep in episodes)
    with RunStore(tmp_path / "run") as store:
        assert list(store.episodes()) == episodes
        store.append_episode(make_episode(6))
    reader = RunStore.open_readonly(tmp_path / "run")
    assert list(reader.episodes()) == [*episodes, make_episode(6)]
    assert reader.metrics() == [
        {"step": 0, "loss": 0.25, "tags": ["a"]},
        {"step": 1, "loss": 0.125},
    ]
    assert reader.config_text() == "lr: 2.0e-5\n"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.yaml",
        "episodes.rec",
        "metrics.rec",
        "rollouts.rec",
    ]
    with pytest.raises(ValueError, match="read-only"):
        reader.append_metrics({"step": 2})


TORN_TAILS: dict[str, Callable[[bytes], bytes]] = {
    "short-header": lambda fr: fr[:7],
    "short-payload": lambda fr: fr[: HEADER.size + 3],
    "bad-payload-crc": lambda fr: fr[:-1] + bytes([fr[-1] ^ 1]),
    # A power loss can extend a file before its data lands: the new bytes read as zeros.
    "zero-filled-payload": lambda fr: fr[:20] + bytes(len(fr) - 20),
    "zero-filled-extension": lambda fr: bytes(64),
}


@pytest.mark.parametrize("kind", TORN_TAILS)
def test_torn_tail_is_truncated_and_appends_continue(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "f.rec"
    good = write_records(path, PAYLOADS)
    torn = TORN_TAILS[kind](frame(tmp_path, b"delta" * 10))
    with path.open("ab") as f:
        f.write(torn)
    with RecordFile(path) as rf:
        assert rf.dropped_bytes == len(torn)
        assert path.read_bytes() == good
        assert list(rf) == PAYLOADS
        rf.append(b"epsilon")
    with RecordFile(path) as rf:
        assert rf.dropped_bytes == 0
        assert list(rf) == [*PAYLOADS, b"epsilon"]


@pytest.mark.parametrize("where", ["payload", "length", "magic", "zeroed"])
def test_corruption_in_the_middle_raises(tmp_path: Path, where: str) -> None:
    path = tmp_path / "f.rec"
    off = offsets(PAYLOADS)[2]  # the third record, with a fourth after it
    write_records(path, [*PAYLOADS, b"tail"])
    blob = bytearray(path.read_bytes())
    if where == "payload":
        blob[off + HEADER.size + 1] ^= 0x40
    elif where == "length":
        blob[off + 4] ^= 0x01
    elif where == "magic":
        blob[off] ^= 0xFF
    else:
        blob[off : off + HEADER.size] = bytes(HEADER.size)
    path.write_bytes(bytes(blob))
    message = rf"{re.escape(str(path))}.*byte offset {off}\b"
    with pytest.raises(CorruptRecordError, match=message):
        RecordFile(path)
    with RecordFile.open_readonly(path) as reader, pytest.raises(CorruptRecordError, match=message):
        list(reader)
    assert path.read_bytes() == bytes(blob)


def test_truncation_at_every_offset(tmp_path: Path) -> None:
    """A crash can tear the last write at any byte: each cut keeps exactly the whole records."""
    blob = write_records(tmp_path / "full.rec", PAYLOADS)
    ends = offsets(PAYLOADS)[1:]
    path = tmp_path / "cut.rec"
    for cut in range(len(blob) + 1):
        path.write_bytes(blob[:cut])
        kept = [p for p, end in zip(PAYLOADS, ends, strict=True) if end <= cut]
        with RecordFile(path) as rf:
            assert list(rf) == kept
        assert path.stat().st_size == max([0, *(e for e in ends if e <= cut)])


@settings(max_examples=150, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=40), min_size=1, max_size=6),
    data=st.data(),
)
def test_any_cut_plus_zero_fill_keeps_exactly_the_whole_records(
    payloads: list[bytes], data: st.DataObject
) -> None:
    """Cut a valid file anywhere, optionally extend it with zeros (a power loss can grow a file
    before its data is written): readers and writers get exactly the records still wholly
    present, the reader changes nothing, and the writer truncates to that boundary."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.rec"
        blob = write_records(path, payloads)
        cut = data.draw(st.integers(0, len(blob)), label="cut")
        damaged = blob[:cut] + bytes(data.draw(st.integers(0, 40), label="zeros"))
        path.write_bytes(damaged)
        bounds = offsets(payloads)
        kept = 0
        while (
            kept < len(payloads)
            and damaged[bounds[kept] : bounds[kept + 1]] == (blob[bounds[kept] : bounds[kept + 1]])
        ):
            kept += 1
        with RecordFile.open_readonly(path) as reader:
            assert list(reader) == payloads[:kept]
        assert path.read_bytes() == damaged
        with RecordFile(path) as writer:
            assert list(writer) == payloads[:kept]
            assert writer.dropped_bytes == len(damaged) - bounds[kept]
        assert path.read_bytes() == blob[: bounds[kept]]


def test_second_writer_fails_while_first_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "f.rec"
    first = RecordFile(path)
    first.append(b"one")
    with pytest.raises(RecordFileLockedError, match=re.escape(str(path))):
        RecordFile(path)
    other_process = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from turnrl.agent.store import RecordFile; RecordFile({str(path)!r})",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "RecordFileLockedError" in other_process.stderr
    first.close()
    first.close()  # idempotent
    with RecordFile(path) as second:
        assert list(second) == [b"one"]


def test_run_store_is_single_writer(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run"), pytest.raises(RecordFileLockedError, match=r"episodes\.rec"):
        RunStore(tmp_path / "run")
    RunStore(tmp_path / "run").close()


def test_reader_on_a_torn_tail_returns_good_records_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f.rec"
    write_records(path, PAYLOADS)
    with path.open("ab") as f:
        f.write(frame(tmp_path, b"in flight")[:-2])
    before = path.read_bytes()
    with RecordFile.open_readonly(path) as reader:
        assert list(reader) == PAYLOADS
        assert reader.dropped_bytes == 0
        with pytest.raises(ValueError, match="read-only"):
            reader.append(b"x")
    assert path.read_bytes() == before


def test_reader_follows_a_live_writer(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        reader = RunStore.open_readonly(tmp_path)
        assert list(reader.episodes()) == []
        store.append_episode(make_episode(0))
        store.append_metrics({"step": 0})
        assert list(reader.episodes()) == [make_episode(0)]
        assert reader.metrics() == [{"step": 0}]


def test_short_write_is_rolled_back(tmp_path: Path) -> None:
    """A write cut short by a file-size limit (as by a full disk) leaves no partial frame."""
    path = tmp_path / "f.rec"
    script = """if True:
        import resource, signal, sys
        from turnrl.agent.store import RecordFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        with RecordFile(sys.argv[1]) as f:
            f.append(b"a" * 100)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
            try:
                f.append(b"b" * 10_000)
            except OSError as e:
                print("rolled back:", e)
            f.append(b"c" * 10)
    """
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "short write" in done.stdout
    with RecordFile(path) as rf:
        assert rf.dropped_bytes == 0
        assert list(rf) == [b"a" * 100, b"c" * 10]


def kill_writer(run: Path, rng: random.Random, *args: str) -> int:
    """Start `store_writer.py`, SIGKILL it at a random moment after it reports progress, and
    return the last count it reported fsynced."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(run), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert proc.stdout is not None
        try:
            flushed, want = 0, rng.randint(1, 8)
            while flushed < want:
                line = proc.stdout.readline()
                assert line, f"writer exited early: {err.seek(0) or err.read()}"
                flushed = int(line)
            time.sleep(rng.uniform(0, 0.05))
            proc.kill()
            proc.wait(timeout=30)
            return max([flushed, *(int(n) for n in proc.stdout.read().split())])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def test_sigkill_recovery_of_episodes(tmp_path: Path) -> None:
    """Kill a run-store writer at random moments: every episode it reported fsynced survives
    intact and in order, the file is cut back to a record boundary, and appending resumes."""
    run = tmp_path / "run"
    rng = random.Random(20240611)
    for _ in range(5):
        flushed = kill_writer(run, rng)
        with RecordFile(run / "episodes.rec") as rf:
            payloads = list(rf)
        assert (run / "episodes.rec").stat().st_size == offsets(payloads)[-1]
        with RunStore(run) as store:
            episodes = list(store.episodes())
            assert len(episodes) >= flushed
            assert episodes == [make_episode(i) for i in range(len(episodes))]
            store.append_episode(make_episode(len(episodes)))
        assert list(RunStore.open_readonly(run).episodes())[-1] == make_episode(len(episodes))


def test_sigkill_recovery_of_torn_large_writes(tmp_path: Path) -> None:
    """The same with records of up to 512 KiB, so that the kill often lands inside `write()`
    and leaves a torn tail (a large write is interruptible between pages)."""
    path = tmp_path / "raw.rec"
    rng = random.Random(7)
    try:
        for _ in range(8):
            flushed = kill_writer(tmp_path, rng, "--raw")
            size = path.stat().st_size
            with RecordFile(path) as rf:
                payloads = list(rf)
                assert rf.dropped_bytes == size - offsets(payloads)[-1]
                assert len(payloads) >= flushed
                assert payloads == [make_payload(i) for i in range(len(payloads))]
                rf.append(make_payload(len(payloads)))
            assert path.stat().st_size == offsets([*payloads, make_payload(len(payloads))])[-1]
    finally:
        path.unlink(missing_ok=True)  # up to ~100 MiB; pytest keeps recent tmp dirs


def test_run_store_reports_what_it_cut(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        store.append_metrics({"step": 0})
    with (tmp_path / "metrics.rec").open("ab") as f:
        f.write(b"TRR1\x05")
    with RunStore(tmp_path) as store:
        assert store.dropped_bytes == {"episodes.rec": 0, "metrics.rec": 5, "rollouts.rec": 0}
        assert store.metrics() == [{"step": 0}]


def test_rollout_journal_is_its_own_record_file(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run") as store:
        store.append_rollout(make_episode(1))
        store.append_episode(make_episode(2))
        store.append_rollout(make_episode(3))
    reader = RunStore.open_readonly(tmp_path / "run")
    assert list(reader.rollouts()) == [make_episode(1), make_episode(3)]
    assert list(reader.episodes()) == [make_episode(2)]
    assert list(RunStore.open_readonly(tmp_path / "run").rollouts()) == list(reader.rollouts())
