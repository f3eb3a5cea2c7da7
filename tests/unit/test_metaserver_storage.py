"""The metaserver storage on a real directory: durability, group commit, recovery, refusals.

Randomised parts derive from ``PAXFS_SEED`` (printed); rerun with it to replay.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from metaserver.storage import (
    EXIT_STORAGE_FAILURE,
    ClusterMismatch,
    FatalStorageError,
    LogRecord,
    RecordNumber,
    StorageClosed,
    StorageCorruption,
    StorageFormatError,
    StorageLocked,
    StorageOptions,
    open_storage,
)
from metaserver.storage.record_format import RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES

CLUSTER = "cluster-a"
SEED = int(os.environ.get("PAXFS_SEED") or random.SystemRandom().randrange(2**32))
REPO = Path(__file__).resolve().parents[2]
THREAD_WAIT_S = 30


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    print(f"PAXFS_SEED={SEED}")
    return random.Random(f"{SEED}:{request.node.name}")


class GatedSync:
    """An fdatasync that counts its calls and holds each one until ``gate`` is open."""

    def __init__(self, *, open_gate: bool = True) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(THREAD_WAIT_S), "test never opened the sync gate"
        os.fdatasync(fd)

    async def wait_entered(self) -> None:
        await trio.to_thread.run_sync(self.entered.wait, THREAD_WAIT_S)


class FatalRecorder:
    """An ``on_fatal`` that records instead of exiting, for in-process failure tests."""

    def __init__(self) -> None:
        self.errors: list[FatalStorageError] = []

    def __call__(self, error: FatalStorageError) -> None:
        self.errors.append(error)


def payloads_of(records: tuple[LogRecord, ...]) -> list[bytes]:
    return [record.payload for record in records]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("log-*.seg"))


async def write_log(
    directory: Path, batches: list[list[bytes]], options: StorageOptions | None = None
) -> None:
    async with open_storage(directory, CLUSTER, options) as storage:
        for batch in batches:
            await storage.append(batch)


async def reopen_records(directory: Path) -> tuple[LogRecord, ...]:
    async with open_storage(directory, CLUSTER) as storage:
        return storage.recovered.records


# --- round trip and group commit -------------------------------------------------------


async def test_records_survive_reopen_in_order_with_numbers(tmp_path: Path) -> None:
    async with open_storage(tmp_path, CLUSTER) as storage:
        assert storage.recovered.snapshot is None and storage.recovered.records == ()
        assert await storage.append([b"promise 1", b"accept 1"]) == range(1, 3)
        assert await storage.append([b"accept 2"]) == range(3, 4)
    async with open_storage(tmp_path, CLUSTER) as storage:
        assert storage.recovered.records == (
            LogRecord(RecordNumber(1), b"promise 1"),
            LogRecord(RecordNumber(2), b"accept 1"),
            LogRecord(RecordNumber(3), b"accept 2"),
        )
        assert storage.next_record_number == 4
        assert await storage.append([b"after restart"]) == range(4, 5)
    assert payloads_of(await reopen_records(tmp_path))[-1] == b"after restart"


async def test_concurrent_appends_share_one_fsync(tmp_path: Path) -> None:
    sync = GatedSync(open_gate=False)
    appenders = 100
    async with open_storage(tmp_path, CLUSTER, StorageOptions(fdatasync=sync)) as storage:
        first = await storage.submit([b"first"])
        await sync.wait_entered()  # the writer is inside the first fdatasync
        tickets = [await storage.submit([b"record %d" % i]) for i in range(appenders)]
        assert not first.durable and not any(t.durable for t in tickets)
        sync.gate.set()
        for ticket in tickets:
            await ticket.wait_durable()
        assert first.durable
        stats = storage.stats()
    assert sync.calls == 2  # one for "first", one for all the others
    assert stats.data_syncs == 2 and stats.records_written == appenders + 1
    assert len(await reopen_records(tmp_path)) == appenders + 1


async def test_tickets_become_durable_in_submission_order(tmp_path: Path) -> None:
    sync = GatedSync(open_gate=False)
    order: list[int] = []
    async with open_storage(tmp_path, CLUSTER, StorageOptions(fdatasync=sync)) as storage:
        tickets = [await storage.submit([b"%d" % i]) for i in range(20)]

        async def wait_for(index: int) -> None:
            await tickets[index].wait_durable()
            order.append(index)

        async with trio.open_nursery() as nursery:
            for index in reversed(range(20)):
                nursery.start_soon(wait_for, index)
            await sync.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            assert order == []
            sync.gate.set()
    assert sorted(order) == list(range(20))
    assert all(t.numbers == range(i + 1, i + 2) for i, t in enumerate(tickets))


async def test_append_now_is_durable_on_return_and_only_when_the_writer_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metaserver.storage import storage as storage_module

    # A loaded machine may stall an inline sync past the slow mark (tested below).
    monkeypatch.setattr(storage_module, "APPEND_NOW_SLOW_S", 60.0)
    sync = GatedSync()
    async with open_storage(tmp_path, CLUSTER, StorageOptions(fdatasync=sync)) as storage:
        ticket = storage.append_now([b"inline 1", b"inline 2"])
        assert ticket is not None and ticket.durable and ticket.numbers == range(1, 3)
        assert sync.calls == 1
        sync.gate.clear()
        queued = await storage.submit([b"queued"])
        await sync.wait_entered()  # the writer thread holds a batch
        assert storage.append_now([b"must wait"]) is None
        sync.gate.set()
        await queued.wait_durable()
        after = storage.append_now([b"inline 3"])
        assert after is not None and after.numbers == range(4, 5)
    assert payloads_of(await reopen_records(tmp_path)) == [
        b"inline 1",
        b"inline 2",
        b"queued",
        b"inline 3",
    ]
    off = StorageOptions(append_on_caller_thread=False)
    async with open_storage(tmp_path, CLUSTER, off) as storage:
        assert storage.append_now([b"x"]) is None


async def test_a_slow_inline_sync_sends_the_next_appends_to_the_thread_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metaserver.storage import storage as storage_module

    monkeypatch.setattr(storage_module, "APPEND_NOW_PAUSE_S", 0.2)
    delay_s = [storage_module.APPEND_NOW_SLOW_S * 3]

    def slow_sync(fd: int) -> None:
        time.sleep(delay_s[0])  # a loaded disk (runs on the event loop on purpose)
        os.fdatasync(fd)

    async with open_storage(tmp_path, CLUSTER, StorageOptions(fdatasync=slow_sync)) as storage:
        assert storage.append_now([b"slow"]) is not None
        delay_s[0] = 0.0
        assert storage.append_now([b"declined"]) is None
        await storage.append([b"by the thread"])
        await trio.sleep(0.25)
        assert storage.append_now([b"inline again"]) is not None
    assert payloads_of(await reopen_records(tmp_path)) == [
        b"slow",
        b"by the thread",
        b"inline again",
    ]


async def test_a_failed_inline_fdatasync_is_fatal_and_never_retried(tmp_path: Path) -> None:
    calls: list[int] = []

    def failing_sync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    fatal = FatalRecorder()
    options = StorageOptions(fdatasync=failing_sync, on_fatal=fatal)
    async with open_storage(tmp_path, CLUSTER, options) as storage:
        with pytest.raises(FatalStorageError, match="Input/output error"):
            storage.append_now([b"never acknowledged"])
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(FatalStorageError):
            await storage.append([b"later"])
        with pytest.raises(FatalStorageError):
            storage.append_now([b"later"])
    assert len(calls) == 1 and len(fatal.errors) == 1


async def test_empty_submit_waits_for_the_records_before_it(tmp_path: Path) -> None:
    sync = GatedSync(open_gate=False)
    async with open_storage(tmp_path, CLUSTER, StorageOptions(fdatasync=sync)) as storage:
        before = await storage.submit([b"promise"])
        barrier = storage.submit_nowait([])
        await sync.wait_entered()
        await trio.testing.wait_all_tasks_blocked()
        assert not barrier.durable
        sync.gate.set()
        await barrier.wait_durable()
        assert before.durable and barrier.numbers == range(2, 2)


async def test_back_pressure_at_the_queue_limit(tmp_path: Path) -> None:
    sync = GatedSync(open_gate=False)
    options = StorageOptions(
        fdatasync=sync, queue_records_max=4, queue_bytes_max=64, record_bytes_max=64
    )
    async with open_storage(tmp_path, CLUSTER, options) as storage:
        held = await storage.submit([b"a", b"b", b"c"])
        await sync.wait_entered()
        storage.submit_nowait([b"d"])  # exactly at the limit: 4 records in flight
        with pytest.raises(trio.WouldBlock):
            storage.submit_nowait([b"e"])
        with pytest.raises(ValueError, match="split it"):
            storage.submit_nowait([b"x"] * 5)
        with pytest.raises(ValueError, match="exceeds"):
            await storage.submit([bytes(65)])
        queued: list[range] = []

        async def blocked_submit() -> None:
            ticket = await storage.submit([b"e"])
            queued.append(ticket.numbers)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_submit)
            await trio.testing.wait_all_tasks_blocked()
            assert queued == []
            with pytest.raises(trio.WouldBlock):  # may not overtake the waiting submitter
                storage.submit_nowait([])
            sync.gate.set()
        await held.wait_durable()
        assert queued == [range(5, 6)]
    assert payloads_of(await reopen_records(tmp_path)) == [b"a", b"b", b"c", b"d", b"e"]


async def test_queue_bytes_limit_applies_like_the_records_limit(tmp_path: Path) -> None:
    sync = GatedSync(open_gate=False)
    options = StorageOptions(fdatasync=sync, queue_bytes_max=64, record_bytes_max=32)
    async with open_storage(tmp_path, CLUSTER, options) as storage:
        await storage.submit([bytes(30), bytes(30)])
        await sync.wait_entered()
        with pytest.raises(trio.WouldBlock):
            storage.submit_nowait([bytes(5)])
        last = storage.submit_nowait([bytes(4)])  # exactly 64 bytes in flight
        sync.gate.set()
        await last.wait_durable()
        storage.submit_nowait([bytes(32), bytes(32)])


async def test_write_batches_are_bounded(tmp_path: Path) -> None:
    sync = GatedSync(open_gate=False)
    options = StorageOptions(fdatasync=sync, write_batch_bytes_max=250)
    async with open_storage(tmp_path, CLUSTER, options) as storage:
        await storage.submit([b"first"])
        await sync.wait_entered()
        tickets = [storage.submit_nowait([bytes(100)]) for _ in range(10)]
        sync.gate.set()
        await tickets[-1].wait_durable()
        stats = storage.stats()
    assert stats.data_syncs == 1 + 5  # two 100-byte records per batch of at most 250 bytes
    assert stats.batches_written == 6


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="queue_records_max must be positive"):
        StorageOptions(queue_records_max=0)
    with pytest.raises(ValueError, match="record_bytes_max must fit"):
        StorageOptions(queue_bytes_max=10, record_bytes_max=11)


async def test_closing_finishes_queued_appends(tmp_path: Path, rng: random.Random) -> None:
    batches = [[rng.randbytes(rng.randrange(200)) for _ in range(rng.randrange(1, 5))]]
    batches += [[rng.randbytes(rng.randrange(200))] for _ in range(50)]
    async with open_storage(tmp_path, CLUSTER) as storage:
        for batch in batches:
            storage.submit_nowait(batch)
    assert payloads_of(await reopen_records(tmp_path)) == [p for b in batches for p in b]
    async with open_storage(tmp_path, CLUSTER) as storage:
        pass
    with pytest.raises(StorageClosed):
        storage.submit_nowait([b"late"])


async def test_segments_roll_over_and_reopen_across_them(
    tmp_path: Path, rng: random.Random
) -> None:
    payloads = [rng.randbytes(rng.randrange(1, 300)) for _ in range(200)]
    await write_log(
        tmp_path,
        [payloads[i : i + 7] for i in range(0, 200, 7)],
        StorageOptions(segment_bytes_target=2048),
    )
    assert len(segment_files(tmp_path)) > 5
    records = await reopen_records(tmp_path)
    assert payloads_of(records) == payloads
    assert [r.number for r in records] == list(range(1, 201))


# --- torn tails and corruption ------------------------------------------------------------


def _cut_last_record(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(b"three" * 20) - RECORD_HEADER_BYTES + keep])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _append_zeros(path: Path) -> None:
    with path.open("ab") as file:
        file.write(bytes(8192))


@pytest.mark.parametrize(
    ("damage", "survivors"),
    [
        pytest.param(lambda p: _cut_last_record(p, 3), 2, id="partial-length"),
        pytest.param(
            lambda p: _cut_last_record(p, RECORD_HEADER_BYTES + 10), 2, id="partial-payload"
        ),
        pytest.param(_flip_last_byte, 2, id="bad-checksum-at-end"),
        pytest.param(_append_zeros, 3, id="zero-filled-tail"),
    ],
)
async def test_torn_tail_is_cut_and_the_log_goes_on(
    tmp_path: Path,
    damage: Callable[[Path], None],
    survivors: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    written = [b"one", b"two" * 20, b"three" * 20]
    await write_log(tmp_path, [written[:1], written[1:]])
    (segment,) = segment_files(tmp_path)
    damage(segment)
    expected = written[:survivors]
    with caplog.at_level(logging.WARNING):
        async with open_storage(tmp_path, CLUSTER) as storage:
            assert payloads_of(storage.recovered.records) == expected
            assert await storage.append([b"four"]) == range(survivors + 1, survivors + 2)
    assert "cutting a torn tail" in caplog.text and segment.name in caplog.text
    assert payloads_of(await reopen_records(tmp_path)) == expected + [b"four"]


async def test_torn_tail_of_the_last_of_several_segments_is_cut(tmp_path: Path) -> None:
    payloads = [b"%03d" % i * 100 for i in range(12)]
    await write_log(tmp_path, [[p] for p in payloads], StorageOptions(segment_bytes_target=1000))
    segments = segment_files(tmp_path)
    assert len(segments) > 2
    segments[-1].write_bytes(segments[-1].read_bytes()[:-50])
    assert payloads_of(await reopen_records(tmp_path)) == payloads[:-1]


async def test_corrupt_middle_record_is_refused_and_left_alone(tmp_path: Path) -> None:
    await write_log(tmp_path, [[b"one" * 10, b"two" * 10, b"three" * 10]])
    (segment,) = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    middle = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 30
    data[middle + RECORD_HEADER_BYTES + 5] ^= 0x20
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption) as caught:
        async with open_storage(tmp_path, CLUSTER):
            pass
    message = str(caught.value)
    assert str(segment) in message and f"offset {middle}" in message
    assert segment.read_bytes() == bytes(data)  # never silently truncated


async def test_torn_tail_in_a_segment_that_is_not_the_last_is_refused(tmp_path: Path) -> None:
    await write_log(
        tmp_path, [[b"x" * 500] for _ in range(10)], StorageOptions(segment_bytes_target=1024)
    )
    first = segment_files(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-7])
    with pytest.raises(StorageCorruption, match="not the last"):
        await reopen_records(tmp_path)


async def test_missing_segment_in_the_middle_is_refused(tmp_path: Path) -> None:
    await write_log(
        tmp_path, [[b"x" * 500] for _ in range(10)], StorageOptions(segment_bytes_target=1024)
    )
    segment_files(tmp_path)[1].unlink()
    with pytest.raises(StorageCorruption, match="the one before ends at"):
        await reopen_records(tmp_path)


# --- directory identity ---------------------------------------------------------------------


async def test_another_clusters_directory_is_refused(tmp_path: Path) -> None:
    await write_log(tmp_path, [[b"one"]])
    with pytest.raises(ClusterMismatch, match="belongs to cluster 'cluster-a', not 'cluster-b'"):
        async with open_storage(tmp_path, "cluster-b"):
            pass


async def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    await write_log(tmp_path, [[b"one"]])
    (tmp_path / "FORMAT").write_text(f"paxfs-metaserver-storage 2\ncluster {CLUSTER}\n")
    with pytest.raises(StorageFormatError, match="format 2; this paxfs knows format 1"):
        await reopen_records(tmp_path)


async def test_a_directory_that_is_not_ours_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my files")
    with pytest.raises(StorageFormatError, match="not paxfs metaserver storage: it holds notes"):
        await reopen_records(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "FORMAT").write_text("paxfs-chunk-store 1\n")
    with pytest.raises(StorageFormatError, match="FORMAT reads 'paxfs-chunk-store 1'"):
        await reopen_records(tmp_path)


async def test_missing_directory_is_created_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(StorageFormatError, match="does not exist"):
        async with open_storage(tmp_path / "new", CLUSTER, StorageOptions(create_if_empty=False)):
            pass
    await write_log(tmp_path / "new", [[b"one"]])
    assert (tmp_path / "new" / "FORMAT").read_text() == (
        f"paxfs-metaserver-storage 1\ncluster {CLUSTER}\n"
    )


async def test_second_open_of_a_directory_is_refused_while_locked(tmp_path: Path) -> None:
    async with open_storage(tmp_path, CLUSTER):
        with pytest.raises(StorageLocked, match="in use by another metaserver"):
            async with open_storage(tmp_path, CLUSTER):
                pass
    async with open_storage(tmp_path, CLUSTER):
        pass  # released on close


# --- snapshots and truncation ---------------------------------------------------------------


async def test_snapshot_then_compaction_survives_restart(tmp_path: Path) -> None:
    state = b"namespace state " * 5000
    async with open_storage(tmp_path, CLUSTER, StorageOptions(segment_bytes_target=256)) as s:
        for i in range(20):
            await s.append([b"accept %d" % i])
        await s.save_snapshot(3, b"older state")
        await s.save_snapshot(18, state)
        assert s.snapshot_index == 18
        kept = await s.compact([b"promise 7", b"accept 19"])
        assert kept == range(21, 23)
        assert await s.append([b"accept 20"]) == range(23, 24)
    assert [p.name for p in tmp_path.glob("snapshot-*")] == ["snapshot-00000000000000000018.zst"]
    assert len(segment_files(tmp_path)) == 1
    assert (tmp_path / "snapshot-00000000000000000018.zst").stat().st_size < len(state) // 20
    async with open_storage(tmp_path, CLUSTER) as storage:
        assert storage.recovered.snapshot is not None
        assert storage.recovered.snapshot.index == 18
        assert storage.recovered.snapshot.data == state
        assert storage.recovered.records == (
            LogRecord(RecordNumber(21), b"promise 7"),
            LogRecord(RecordNumber(22), b"accept 19"),
            LogRecord(RecordNumber(23), b"accept 20"),
        )
        with pytest.raises(ValueError, match="older than snapshot 18"):
            await storage.save_snapshot(17, b"")


async def test_appends_during_compaction_stay_after_it(tmp_path: Path) -> None:
    sync = GatedSync(open_gate=False)
    async with open_storage(tmp_path, CLUSTER, StorageOptions(fdatasync=sync)) as storage:
        early = await storage.submit([b"old 1", b"old 2"])
        await sync.wait_entered()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(storage.compact, [b"minimal"])
            await trio.testing.wait_all_tasks_blocked()
            late = storage.submit_nowait([b"new"])
            sync.gate.set()
        await late.wait_durable()
        assert early.durable
    assert payloads_of(await reopen_records(tmp_path)) == [b"minimal", b"new"]


async def test_compaction_interrupted_before_cleanup_recovers_the_compacted_log(
    tmp_path: Path,
) -> None:
    await write_log(tmp_path, [[b"old %d" % i] for i in range(5)])
    (old_segment,) = segment_files(tmp_path)
    old_bytes = old_segment.read_bytes()
    async with open_storage(tmp_path, CLUSTER) as storage:
        await storage.compact([b"kept"])
    old_segment.write_bytes(old_bytes)  # as if the crash came before the old one was removed
    (tmp_path / "log-00000000000000000099.seg.tmp").write_bytes(b"half written")
    assert payloads_of(await reopen_records(tmp_path)) == [b"kept"]
    assert [p.name for p in segment_files(tmp_path)] == ["log-00000000000000000006.seg"]
    assert not list(tmp_path.glob("*.tmp"))


async def test_drop_records_before_removes_whole_old_segments(tmp_path: Path) -> None:
    async with open_storage(tmp_path, CLUSTER, StorageOptions(segment_bytes_target=200)) as s:
        for i in range(30):
            await s.append([b"record %03d" % i + bytes(40)])
        segments_before = len(segment_files(tmp_path))
        retained = await s.drop_records_before(RecordNumber(17))
        assert 1 < retained <= 17
        assert s.first_retained_record_number == retained
        assert len(segment_files(tmp_path)) < segments_before
        final = await s.drop_records_before(RecordNumber(10**6))
        (active,) = segment_files(tmp_path)  # the active segment is always kept
        assert active.name == f"log-{final:020d}.seg"
        await s.append([b"next"])
    records = await reopen_records(tmp_path)
    assert records[0].number == final and payloads_of(records)[-1] == b"next"


async def test_snapshot_size_limit(tmp_path: Path) -> None:
    async with open_storage(tmp_path, CLUSTER, StorageOptions(snapshot_bytes_max=100)) as storage:
        await storage.save_snapshot(1, bytes(100))
        with pytest.raises(ValueError, match="exceeds 100"):
            await storage.save_snapshot(2, bytes(101))
        assert storage.snapshot_index == 1


async def test_random_operations_match_a_model_across_reopens(
    tmp_path: Path, rng: random.Random
) -> None:
    """Appends, compactions, drops, snapshots and reopens in a seeded random order; after
    every reopen the storage must hold exactly what the model says."""
    options = StorageOptions(segment_bytes_target=rng.choice([200, 700, 4096]))
    model: list[LogRecord] = []
    snapshot: tuple[int, bytes] | None = None
    for _ in range(12):
        async with open_storage(tmp_path, CLUSTER, options) as storage:
            assert storage.recovered.records == tuple(model)
            recovered = storage.recovered.snapshot
            assert snapshot == (None if recovered is None else (recovered.index, recovered.data))
            for _ in range(rng.randrange(1, 25)):
                operation = rng.choices(
                    ["append", "append_now", "compact", "drop", "snapshot"], [5, 4, 1, 1, 1]
                )[0]
                if operation in ("append", "append_now"):
                    batch = [rng.randbytes(rng.randrange(80)) for _ in range(rng.randrange(4))]
                    ticket = storage.append_now(batch) if operation == "append_now" else None
                    if ticket is not None:
                        assert ticket.durable
                        numbers = ticket.numbers
                    else:
                        numbers = await storage.append(batch)
                    model += [
                        LogRecord(RecordNumber(n), p) for n, p in zip(numbers, batch, strict=True)
                    ]
                elif operation == "compact":
                    kept = [rng.randbytes(rng.randrange(80)) for _ in range(rng.randrange(3))]
                    numbers = await storage.compact(kept)
                    model = [
                        LogRecord(RecordNumber(n), p) for n, p in zip(numbers, kept, strict=True)
                    ]
                elif operation == "drop":
                    below = RecordNumber(rng.randrange(1, storage.next_record_number + 2))
                    retained = await storage.drop_records_before(below)
                    assert all(r.number < below for r in model if r.number < retained)
                    model = [r for r in model if r.number >= retained]
                else:
                    index = (snapshot[0] if snapshot else 0) + rng.randrange(3)
                    snapshot = (index, rng.randbytes(rng.randrange(500)))
                    await storage.save_snapshot(*snapshot)


async def test_corrupt_newest_snapshot_is_refused(tmp_path: Path) -> None:
    async with open_storage(tmp_path, CLUSTER) as storage:
        await storage.save_snapshot(5, b"state" * 100)
    (snapshot,) = tmp_path.glob("snapshot-*")
    data = bytearray(snapshot.read_bytes())
    data[-3] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption, match="snapshot body checksum"):
        await reopen_records(tmp_path)


# --- fatal errors -----------------------------------------------------------------------------


async def test_failed_fdatasync_stops_all_writing_and_is_never_retried(tmp_path: Path) -> None:
    calls: list[int] = []

    def failing_sync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    fatal = FatalRecorder()
    options = StorageOptions(fdatasync=failing_sync, on_fatal=fatal)
    async with open_storage(tmp_path, CLUSTER, options) as storage:
        with pytest.raises(
            FatalStorageError, match="appending records from 1 .*Input/output error"
        ):
            await storage.append([b"never acknowledged"])
        with pytest.raises(FatalStorageError):
            await storage.append([b"later"])
        with pytest.raises(FatalStorageError):
            await storage.save_snapshot(1, b"state")
    assert len(calls) == 1 and len(fatal.errors) == 1


async def test_failed_snapshot_fsync_is_fatal(tmp_path: Path) -> None:
    def failing_fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("snapshot"):
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    fatal = FatalRecorder()
    async with open_storage(
        tmp_path, CLUSTER, StorageOptions(fsync=failing_fsync, on_fatal=fatal)
    ) as storage:
        with pytest.raises(FatalStorageError, match="writing snapshot"):
            await storage.save_snapshot(1, b"state")
        with pytest.raises(FatalStorageError):
            await storage.append([b"x"])
    assert len(fatal.errors) == 1
    assert not list(tmp_path.glob("snapshot-*.zst"))


def test_failed_fdatasync_exits_the_process_with_a_clear_message(tmp_path: Path) -> None:
    script = f"""
import errno, trio
from metaserver.storage import StorageOptions, open_storage

def failing_sync(fd):
    raise OSError(errno.EIO, "Input/output error")

async def main():
    async with open_storage({str(tmp_path)!r}, "c", StorageOptions(fdatasync=failing_sync)) as s:
        await s.append([b"x"])
    print("ACKNOWLEDGED")

trio.run(main)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_STORAGE_FAILURE
    assert "ACKNOWLEDGED" not in result.stdout
    assert "fatal storage error" in result.stderr and "Input/output error" in result.stderr
