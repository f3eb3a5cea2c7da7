"""Behaviour of the dataserver chunk store as its users (the dataserver, the scrubber,
re-replication) see it: round trips, holes, version fencing, truncate, corruption detection,
directory format checks, reports, copies and concurrency.

Randomised tests print ``PAXFS_SEED=<n>``; rerun with that environment variable to replay.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataserver.chunk_store import (
    BLOCK_SIZE_BYTES,
    FORMAT_FILE_NAME,
    VERIFY_BATCH_BLOCKS,
    ChecksumError,
    ChunkExists,
    ChunkNotFound,
    ChunkStore,
    CorruptReplica,
    InvalidRequest,
    NoSpace,
    StaleVersion,
    StoreFormatError,
    StoreInUse,
    replica_file_name,
)
from wire.framing import FileRange
from wire.ids import ChunkId, ChunkVersion
from wire.replica_format import RawBlock, layout_for_capacity

B = BLOCK_SIZE_BYTES
CHUNK = 1024 * 1024
SEED = int(os.environ.get("PAXFS_SEED") or random.SystemRandom().randrange(2**32))

C1, C2 = ChunkId(1), ChunkId(2)
V1, V2, V5 = ChunkVersion(1), ChunkVersion(2), ChunkVersion(5)


def _rng(test_name: str) -> random.Random:
    print(f"PAXFS_SEED={SEED}")
    return random.Random(f"{SEED}:{test_name}")


def _payload(rng: random.Random, size: int, *, compressible: bool) -> bytes:
    if compressible:
        words = [b"chunk", b"store", b"paxfs", b"block", b"\x00" * 7]
        out = bytearray()
        while len(out) < size:
            out += rng.choice(words)
        return bytes(out[:size])
    return rng.randbytes(size)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    with ChunkStore(tmp_path / "data", chunk_size_bytes=CHUNK) as opened:
        yield opened


def _reopen(store: ChunkStore) -> ChunkStore:
    store.close()
    return ChunkStore(store.directory, chunk_size_bytes=store.chunk_size_bytes)


def _file_path(store: ChunkStore, chunk_id: ChunkId, version: ChunkVersion) -> Path:
    return Path(store.directory) / replica_file_name(chunk_id, version)


def _slot_offset(store: ChunkStore, block: int, slot: int) -> int:
    return layout_for_capacity(store.chunk_size_bytes).slot_offset(block, slot)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x10]))


# ---- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize("compressible", [False, True], ids=["random", "text"])
@pytest.mark.parametrize("size", [0, 1, B - 1, B, B + 1, CHUNK - 1, CHUNK])
def test_round_trip_survives_reopen(
    tmp_path: Path, size: int, compressed: bool, compressible: bool
) -> None:
    data = _payload(_rng("round_trip"), size, compressible=compressible)
    store = ChunkStore(tmp_path, chunk_size_bytes=CHUNK)
    store.create(C1, V1, compressed=compressed)
    store.write(C1, V1, 0, data)
    assert store.read(C1, V1, 0, CHUNK) == data
    store.sync(C1, V1)
    store.close(sync=False)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as reopened:
        assert reopened.read(C1, V1, 0, CHUNK) == data
        assert reopened.stat(C1).length_bytes == size
        assert reopened.verify(C1, V1) == []


def test_compression_saves_disk_and_incompressible_data_is_stored_raw(tmp_path: Path) -> None:
    rng = _rng("compression")
    text = _payload(rng, CHUNK, compressible=True)
    noise = rng.randbytes(CHUNK)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        for chunk_id, data in ((C1, text), (C2, noise)):
            store.create(chunk_id, V1, compressed=True)
            store.write(chunk_id, V1, 0, data)
            store.sync(chunk_id, V1)
        assert store.stat(C1).disk_bytes < CHUNK // 4
        assert store.stat(C2).disk_bytes < CHUNK + 64 * 1024
        raw = store.read_raw_block(C2, V1, 3)
        assert raw is not None and not raw.compressed and raw.payload == noise[3 * B : 4 * B]
        assert store.read(C1, V1, 0, CHUNK) == text
        assert store.read(C2, V1, 0, CHUNK) == noise


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_unaligned_pieces_and_reads_match_a_bytearray(store: ChunkStore, compressed: bool) -> None:
    rng = _rng("unaligned")
    store.create(C1, V1, compressed=compressed)
    model = bytearray()
    offset = 0
    while offset < CHUNK:
        piece = _payload(rng, min(rng.randrange(1, 3 * B), CHUNK - offset), compressible=True)
        store.write(C1, V1, offset, memoryview(piece))
        model += piece
        offset += len(piece)
    for _ in range(50):
        start = rng.randrange(CHUNK)
        size = rng.randrange(3 * B)
        assert store.read(C1, V1, start, size) == bytes(model[start : start + size])


def test_read_past_the_end_is_short_and_empty_beyond(store: ChunkStore) -> None:
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, b"x" * 100)
    assert store.read(C1, V1, 90, 50) == b"x" * 10
    assert store.read(C1, V1, 100, 50) == b""
    assert store.read(C1, V1, 5000, 50) == b""


def test_writes_outside_the_chunk_are_refused(store: ChunkStore) -> None:
    store.create(C1, V1, compressed=False)
    with pytest.raises(InvalidRequest):
        store.write(C1, V1, CHUNK - 1, b"ab")
    with pytest.raises(InvalidRequest):
        store.write(C1, V1, -1, b"a")
    with pytest.raises(InvalidRequest):
        store.truncate(C1, V1, CHUNK + 1)
    with pytest.raises(InvalidRequest):
        store.read(C1, V1, -5, 1)
    assert store.stat(C1).length_bytes == 0


# ---- holes -------------------------------------------------------------------------------


def test_sparse_regions_read_as_zeros_and_take_no_disk(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, chunk_size_bytes=64 * B) as store:
        store.create(C1, V1, compressed=False)
        store.write(C1, V1, 63 * B + 10, b"tail")
        store.write(C1, V1, 3, b"head")
        store.sync(C1, V1)
        data = store.read(C1, V1, 0, 64 * B)
        assert len(data) == 63 * B + 14
        assert data[:3] == bytes(3) and data[3:7] == b"head"
        assert data[7 : 63 * B + 10] == bytes(63 * B + 3)
        assert data[-4:] == b"tail"
        assert store.stat(C1).disk_bytes < 8 * B


# ---- versions ----------------------------------------------------------------------------


def test_old_version_is_fenced_after_bump(store: ChunkStore) -> None:
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, b"v1 data")
    store.sync(C1, V1)
    store.bump_version(C1, V1, V5)
    store.write(C1, V5, 0, b"v5")
    with pytest.raises(StaleVersion) as refused:
        store.write(C1, V1, 0, b"old writer")
    assert (refused.value.requested, refused.value.stored) == (V1, V5)
    for call in (
        lambda: store.read(C1, V1, 0, 10),
        lambda: store.sync(C1, V1),
        lambda: store.truncate(C1, V1, 0),
        lambda: store.verify(C1, V1),
        lambda: store.delete(C1, V1),
        lambda: store.bump_version(C1, V1, V2),
        lambda: store.read(C1, V2, 0, 10),
    ):
        with pytest.raises(StaleVersion):
            call()
    assert store.read(C1, V5, 0, 10) == b"v5 data"
    with pytest.raises(InvalidRequest):
        store.bump_version(C1, V5, V5)
    store.sync(C1, V5)
    reopened = _reopen(store)
    try:
        assert reopened.stat(C1).version == V5
        assert reopened.read(C1, V5, 0, 10) == b"v5 data"
        assert sorted(os.listdir(reopened.directory)) == [
            FORMAT_FILE_NAME,
            replica_file_name(C1, V5),
        ]
    finally:
        reopened.close()


def test_missing_and_duplicate_chunks(store: ChunkStore) -> None:
    with pytest.raises(ChunkNotFound):
        store.read(C1, V1, 0, 1)
    with pytest.raises(ChunkNotFound):
        store.stat(C1)
    store.create(C1, V1, compressed=False)
    with pytest.raises(ChunkExists):
        store.create(C1, V2, compressed=False)
    store.delete(C1, V1)
    with pytest.raises(ChunkNotFound):
        store.read(C1, V1, 0, 1)
    assert store.list_replicas() == []
    store.create(C1, V2, compressed=True)
    assert store.stat(C1).version == V2


def test_superseded_versions_left_on_disk_are_removed_at_open(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        store.create(C1, V1, compressed=False)
        store.write(C1, V1, 0, b"old")
    old_copy = (tmp_path / replica_file_name(C1, V1)).read_bytes()
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        store.bump_version(C1, V1, V2)
        store.write(C1, V2, 0, b"new")
    (tmp_path / replica_file_name(C1, V1)).write_bytes(old_copy)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert [(info.chunk_id, info.version) for info in store.list_replicas()] == [(C1, V2)]
        assert store.read(C1, V2, 0, 3) == b"new"
    assert not (tmp_path / replica_file_name(C1, V1)).exists()


# ---- truncate ----------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_truncate_shrinks_extends_with_zeros_and_persists(
    store: ChunkStore, compressed: bool
) -> None:
    data = _payload(_rng("truncate"), 10 * B, compressible=True)
    store.create(C1, V1, compressed=compressed)
    store.write(C1, V1, 0, data)
    store.sync(C1, V1)
    store.truncate(C1, V1, 3 * B + 100)
    assert store.read(C1, V1, 0, CHUNK) == data[: 3 * B + 100]
    store.truncate(C1, V1, 6 * B)
    assert store.read(C1, V1, 0, CHUNK) == data[: 3 * B + 100] + bytes(3 * B - 100)
    store.write(C1, V1, 5 * B, b"after")
    store.sync(C1, V1)
    expected = data[: 3 * B + 100] + bytes(2 * B - 100) + b"after" + bytes(B - 5)
    reopened = _reopen(store)
    try:
        assert reopened.read(C1, V1, 0, CHUNK) == expected
        reopened.truncate(C1, V1, 0)
        assert reopened.read(C1, V1, 0, CHUNK) == b""
        reopened.truncate(C1, V1, 2 * B)
        assert reopened.read(C1, V1, 0, CHUNK) == bytes(2 * B)
    finally:
        reopened.close()


def test_shrinking_and_overwriting_release_disk_space_after_sync(store: ChunkStore) -> None:
    data = _payload(_rng("release"), CHUNK, compressible=False)
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, data)
    store.sync(C1, V1)
    full = store.stat(C1).disk_bytes
    store.write(C1, V1, 0, data)
    store.sync(C1, V1)
    assert store.stat(C1).disk_bytes <= full + B
    store.truncate(C1, V1, B)
    store.sync(C1, V1)
    assert store.stat(C1).disk_bytes <= 3 * B
    assert store.usage().used_bytes == store.stat(C1).disk_bytes


# ---- corruption --------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_flipped_bit_is_named_by_read_and_verify(store: ChunkStore, compressed: bool) -> None:
    data = _payload(_rng("bitflip"), 8 * B, compressible=True)
    store.create(C1, V1, compressed=compressed)
    store.write(C1, V1, 0, data)
    store.sync(C1, V1)
    raw = store.read_raw_block(C1, V1, 5)
    assert raw is not None
    store.close()
    path = Path(store.directory) / replica_file_name(C1, V1)
    _flip_byte(path, _slot_offset(store, 5, 0) + raw.payload.__len__() // 2)
    with ChunkStore(store.directory, chunk_size_bytes=CHUNK) as reopened:
        with pytest.raises(ChecksumError) as caught:
            reopened.read(C1, V1, 0, CHUNK)
        assert caught.value.block_index == 5 and "block 5" in str(caught.value)
        with pytest.raises(ChecksumError):
            reopened.read(C1, V1, 5 * B + 7, 1)
        with pytest.raises(ChecksumError):
            reopened.read_raw_block(C1, V1, 5)
        assert reopened.read(C1, V1, 0, 5 * B) == data[: 5 * B]
        assert reopened.read(C1, V1, 6 * B, CHUNK) == data[6 * B :]
        assert reopened.verify(C1, V1) == [5]
        with pytest.raises(ChecksumError):
            reopened.write(C1, V1, 5 * B + 1, b"partial overwrite needs the old bytes")
        reopened.write(C1, V1, 5 * B, data[5 * B : 6 * B])
        assert reopened.verify(C1, V1) == []
        assert reopened.read(C1, V1, 0, CHUNK) == data


def _sent_bytes(payload: FileRange | bytes | memoryview) -> bytes:
    if isinstance(payload, FileRange):
        data = os.pread(payload.fd, payload.remaining, payload.offset)
        payload.close()
        return data
    return bytes(payload)


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_a_reply_range_is_sent_from_the_file_where_it_can_be(
    store: ChunkStore, compressed: bool
) -> None:
    """Whole uncompressed blocks become a range of the replica file (sent by sendfile),
    from any offset inside them; compressed blocks, holes and a short last block are
    copied.  Either way the bytes are the ones written."""
    data = _payload(_rng("to_send"), 10 * B + 123, compressible=True)
    store.create(C1, V1, compressed=compressed)
    store.write(C1, V1, 0, data)
    store.write(C1, V1, 14 * B, b"after a hole")
    store.sync(C1, V1)
    expected = data + bytes(14 * B - len(data)) + b"after a hole"
    for offset, size in [(0, 4 * B), (7, 3 * B), (B, 9 * B), (9 * B, 2 * B), (10 * B, 5 * B)]:
        payload, length = store.read_to_send(C1, V1, offset, size)
        assert length == len(expected)
        whole_raw_blocks = not compressed and offset + size <= 10 * B
        assert isinstance(payload, FileRange) == whole_raw_blocks, (offset, size)
        assert _sent_bytes(payload) == expected[offset : offset + size], (offset, size)


def test_a_flipped_bit_is_caught_before_a_range_is_sent(store: ChunkStore) -> None:
    data = _payload(_rng("to_send_flip"), 8 * B, compressible=False)
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, data)
    store.sync(C1, V1)
    store.close()
    _flip_byte(_file_path(store, C1, V1), _slot_offset(store, 3, 0) + 100)
    with ChunkStore(store.directory, chunk_size_bytes=CHUNK) as reopened:
        with pytest.raises(ChecksumError) as caught:
            reopened.read_to_send(C1, V1, 0, 8 * B)
        assert caught.value.block_index == 3
        assert _sent_bytes(reopened.read_to_send(C1, V1, 4 * B, 4 * B)[0]) == data[4 * B :]


def test_verify_covers_chunks_larger_than_one_lock_batch(tmp_path: Path) -> None:
    block_count = VERIFY_BATCH_BLOCKS + 32
    with ChunkStore(tmp_path, chunk_size_bytes=block_count * B) as store:
        store.create(C1, V1, compressed=False)
        for block in (0, VERIFY_BATCH_BLOCKS + 1, VERIFY_BATCH_BLOCKS + 6, block_count - 1):
            store.write(C1, V1, block * B, bytes([block % 251 + 1]) * B)
        store.sync(C1, V1)
        bad_block = VERIFY_BATCH_BLOCKS + 6
        offset = layout_for_capacity(block_count * B).slot_offset(bad_block, 0) + 99
        _flip_byte(_file_path(store, C1, V1), offset)
        assert store.verify(C1, V1) == [bad_block]


def test_damaged_index_entry_loses_only_its_block(store: ChunkStore) -> None:
    data = _payload(_rng("entry"), 4 * B, compressible=False)
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, data)
    store.close()
    layout = layout_for_capacity(CHUNK)
    _flip_byte(_file_path(store, C1, V1), layout.entry_offset(2) + 9)
    with ChunkStore(store.directory, chunk_size_bytes=CHUNK) as reopened:
        assert reopened.verify(C1, V1) == [2]
        with pytest.raises(ChecksumError) as caught:
            reopened.read(C1, V1, 2 * B, 1)
        assert caught.value.block_index == 2
        assert reopened.read(C1, V1, 3 * B, B) == data[3 * B :]


def test_damaged_header_marks_the_replica_and_it_can_be_deleted(store: ChunkStore) -> None:
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, b"payload")
    store.create(C2, V1, compressed=False)
    store.close()
    _flip_byte(_file_path(store, C1, V1), 30)
    with ChunkStore(store.directory, chunk_size_bytes=CHUNK) as reopened:
        infos = {info.chunk_id: info for info in reopened.list_replicas()}
        damage = infos[C1].damage
        assert damage is not None and "checksum" in damage
        assert infos[C2].damage is None
        with pytest.raises(CorruptReplica):
            reopened.read(C1, V1, 0, 10)
        with pytest.raises(CorruptReplica):
            reopened.verify(C1, V1)
        reopened.delete(C1, V1)
        assert [info.chunk_id for info in reopened.list_replicas()] == [C2]


def test_garbage_in_the_spare_slot_is_harmless(store: ChunkStore) -> None:
    data = _payload(_rng("spare"), 4 * B, compressible=False)
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, data)
    store.sync(C1, V1)
    with open(_file_path(store, C1, V1), "r+b") as handle:
        handle.seek(_slot_offset(store, 1, 1))
        handle.write(b"\xff" * B)
    assert store.read(C1, V1, 0, CHUNK) == data
    assert store.verify(C1, V1) == []


# ---- directory format --------------------------------------------------------------------


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    ChunkStore(tmp_path).close()
    (tmp_path / FORMAT_FILE_NAME).write_text("paxfs-chunk-store 9\n")
    with pytest.raises(StoreFormatError, match="format 9; this paxfs knows format 1"):
        ChunkStore(tmp_path)


def test_foreign_directories_and_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StoreFormatError, match="no FORMAT file and is not empty"):
        ChunkStore(tmp_path)
    (tmp_path / FORMAT_FILE_NAME).write_text("some other program\n")
    with pytest.raises(StoreFormatError, match="not a paxfs chunk store"):
        ChunkStore(tmp_path)
    (tmp_path / FORMAT_FILE_NAME).write_text("paxfs-chunk-store 1\n")
    with pytest.raises(StoreFormatError, match="'notes.txt' is not a paxfs chunk store file"):
        ChunkStore(tmp_path)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / replica_file_name(C1, V1)).write_bytes(b"GIF89a" + bytes(200))
    with pytest.raises(StoreFormatError, match="is not a paxfs chunk file"):
        ChunkStore(tmp_path)


def test_a_directory_is_used_by_one_store_at_a_time(tmp_path: Path) -> None:
    with ChunkStore(tmp_path):
        with pytest.raises(StoreInUse):
            ChunkStore(tmp_path)
    ChunkStore(tmp_path).close()


def test_leftover_temporary_files_are_removed_at_open(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        store.create(C1, V1, compressed=False)
        staged = store.stage(C2, V1, compressed=False)
        staged.write(0, b"never committed")
        temp_names = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
        assert len(temp_names) == 1
        assert [info.chunk_id for info in store.list_replicas()] == [C1]
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert sorted(os.listdir(tmp_path)) == [FORMAT_FILE_NAME, replica_file_name(C1, V1)]
        store.create(C2, V1, compressed=False)


def test_a_staged_replica_left_by_its_context_is_removed(store: ChunkStore) -> None:
    with store.stage(C1, V1, compressed=False) as staged:
        staged.write(0, b"abc")
    assert not any(name.endswith(".tmp") for name in os.listdir(store.directory))
    with pytest.raises(ChunkNotFound):
        store.stat(C1)


# ---- copies, reports, capacity -----------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_raw_copy_to_another_store_reads_the_same(tmp_path: Path, compressed: bool) -> None:
    data = _payload(_rng("copy"), 5 * B + 123, compressible=True)
    with (
        ChunkStore(tmp_path / "a", chunk_size_bytes=CHUNK) as source,
        ChunkStore(tmp_path / "b", chunk_size_bytes=4 * CHUNK) as target,
    ):
        source.create(C1, V2, compressed=compressed)
        source.write(C1, V2, B, data)
        source.truncate(C1, V2, CHUNK - 5)
        info = source.stat(C1)
        with target.stage(
            C1, V2, compressed=info.compressed, capacity_bytes=info.capacity_bytes
        ) as staged:
            for block in range(info.capacity_bytes // B):
                raw = source.read_raw_block(C1, V2, block)
                if raw is not None:
                    staged.write_raw_block(raw)
            staged.truncate(info.length_bytes)
            staged.commit()
        assert target.read(C1, V2, 0, CHUNK) == source.read(C1, V2, 0, CHUNK)
        assert target.stat(C1).capacity_bytes == CHUNK
        assert target.verify(C1, V2) == []


def test_a_block_damaged_in_transit_is_refused(store: ChunkStore) -> None:
    with store.stage(C1, V1, compressed=False) as staged:
        with pytest.raises(ChecksumError):
            staged.write_raw_block(RawBlock(0, 3, False, 12345, b"abc"))
        with pytest.raises(InvalidRequest):
            staged.write_raw_block(RawBlock(16, 3, False, 0, b"abc"))


def test_report_lists_every_replica_with_length_and_disk_use(store: ChunkStore) -> None:
    for chunk_id, size in ((ChunkId(7), 3 * B), (ChunkId(3), 10)):
        store.create(chunk_id, V2, compressed=False)
        store.write(chunk_id, V2, 0, b"z" * size)
    store.sync(ChunkId(7), V2)
    report = store.list_replicas()
    assert [(r.chunk_id, r.version, r.length_bytes) for r in report] == [
        (ChunkId(3), V2, 10),
        (ChunkId(7), V2, 3 * B),
    ]
    assert report[1].disk_bytes >= 3 * B
    assert all(r.damage is None and r.mtime_ns > 0 for r in report)
    usage = store.usage()
    assert usage.replica_count == 2
    assert usage.used_bytes == sum(r.disk_bytes for r in report)
    assert 0 < usage.available_bytes <= usage.fs_free_bytes
    assert usage.capacity_bytes == usage.fs_total_bytes


def test_capacity_cap_is_reported_and_enforced(tmp_path: Path) -> None:
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK, capacity_bytes_max=CHUNK) as store:
        store.create(C1, V1, compressed=False)
        store.write(C1, V1, 0, bytes(range(256)) * 2048)
        store.sync(C1, V1)
        usage = store.usage()
        assert usage.capacity_bytes == CHUNK
        assert usage.available_bytes == max(0, CHUNK - usage.used_bytes)
        store.create(C2, V1, compressed=False)
        with pytest.raises(NoSpace):
            store.write(C2, V1, 0, b"y" * CHUNK)


# ---- open-file limit and concurrency ------------------------------------------------------


def test_replicas_beyond_the_open_limit_are_closed_without_losing_writes(tmp_path: Path) -> None:
    rng = _rng("evict")
    contents: dict[ChunkId, bytes] = {}
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK, open_replicas_max=2) as store:
        fds_before = len(os.listdir("/proc/self/fd"))
        for number in range(6):
            chunk_id = ChunkId(100 + number)
            contents[chunk_id] = rng.randbytes(rng.randrange(1, 3 * B))
            store.create(chunk_id, V1, compressed=number % 2 == 0)
            store.write(chunk_id, V1, 0, contents[chunk_id])
        assert len(os.listdir("/proc/self/fd")) == fds_before + 2
        for chunk_id, data in contents.items():
            assert store.read(chunk_id, V1, 0, CHUNK) == data
        still_open = list(contents)[-2:]
        for chunk_id in still_open:
            store.write(chunk_id, V1, 0, b"unsynced")
        store.close(sync=False)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        for chunk_id, data in contents.items():
            assert store.read(chunk_id, V1, 0, CHUNK) == data


def test_threads_on_different_and_same_chunks(tmp_path: Path) -> None:
    rng = _rng("threads")
    thread_count = 8
    pieces = [rng.randbytes(B + 17) for _ in range(thread_count)]
    errors: list[BaseException] = []
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK, open_replicas_max=3) as store:
        store.create(C1, V1, compressed=True)
        barrier = threading.Barrier(thread_count)

        def worker(number: int) -> None:
            try:
                own = ChunkId(1000 + number)
                store.create(own, V1, compressed=number % 2 == 1)
                barrier.wait()
                for round_number in range(10):
                    store.write(own, V1, round_number * B, pieces[number])
                    store.write(C1, V1, number * (B + 17), pieces[number])
                    assert store.read(own, V1, round_number * B, B + 17) == pieces[number]
                    store.sync(own, V1)
                    store.sync(C1, V1)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(thread_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert store.read(C1, V1, 0, CHUNK) == b"".join(pieces)
        for number in range(thread_count):
            own = ChunkId(1000 + number)
            expected = bytearray()
            for round_number in range(10):
                expected[round_number * B :] = pieces[number]
            assert store.read(own, V1, 0, CHUNK) == bytes(expected)
            assert store.verify(own, V1) == []
