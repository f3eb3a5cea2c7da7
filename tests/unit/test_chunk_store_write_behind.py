"""Write-behind of replica files: written data leaves the page cache behind the writer,
writeback errors fail the next sync, and file systems without the calls still work."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataserver import write_behind
from dataserver.chunk_store import ChunkStore, CorruptReplica, replica_file_name
from dataserver.write_behind import (
    DROP_BEHIND_LAG_BYTES,
    SYNC_FILE_RANGE_WAIT_AFTER,
    SYNC_FILE_RANGE_WAIT_BEFORE,
    SYNC_FILE_RANGE_WRITE,
    WRITEBACK_START_BYTES,
    WriteBehind,
)
from wire.ids import ChunkId, ChunkVersion

MIB = 1024 * 1024
CHUNK = 32 * MIB
C1, V1 = ChunkId(1), ChunkVersion(1)
WAIT_AND_WRITE = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` resident in the page cache (mincore over a shared mapping)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(byte & 1 for byte in vector) * mmap.PAGESIZE
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def drops_clean_pages(directory: Path) -> bool:
    """Whether this file system drops clean pages on POSIX_FADV_DONTNEED (tmpfs cannot)."""
    probe = directory / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * MIB)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        return cached_bytes(probe) < MIB
    finally:
        probe.unlink()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    with ChunkStore(tmp_path / "data", chunk_size_bytes=CHUNK) as opened:
        yield opened


def test_a_long_write_keeps_only_its_newest_bytes_cached(store: ChunkStore) -> None:
    if not drops_clean_pages(Path(store.directory).parent):
        pytest.skip("this file system keeps clean pages on POSIX_FADV_DONTNEED")
    data = os.urandom(24 * MIB)
    store.create(C1, V1, compressed=False)
    for start in range(0, len(data), MIB):
        store.write(C1, V1, start, data[start : start + MIB])
    path = Path(store.directory) / replica_file_name(C1, V1)
    index_bytes = 64 * 1024
    during = cached_bytes(path)
    assert during <= DROP_BEHIND_LAG_BYTES + WRITEBACK_START_BYTES + index_bytes, during
    store.sync(C1, V1)
    assert cached_bytes(path) <= DROP_BEHIND_LAG_BYTES + index_bytes
    assert store.read(C1, V1, 0, len(data)) == data


def test_a_small_replica_stays_cached_after_its_sync(store: ChunkStore) -> None:
    if not drops_clean_pages(Path(store.directory).parent):
        pytest.skip("this file system keeps clean pages on POSIX_FADV_DONTNEED")
    store.create(C1, V1, compressed=False)
    store.write(C1, V1, 0, os.urandom(2 * MIB))
    store.sync(C1, V1)
    path = Path(store.directory) / replica_file_name(C1, V1)
    assert cached_bytes(path) >= 2 * MIB, "read right after close comes from memory"


def test_a_writeback_error_fails_the_next_sync_and_marks_the_replica(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create(C1, V1, compressed=False)

    def failing(fd: int, offset: int, length: int, flags: int) -> None:
        raise OSError(errno.EIO, "injected writeback error")

    monkeypatch.setattr(write_behind, "sync_file_range", failing)
    store.write(C1, V1, 0, os.urandom(2 * MIB))
    with pytest.raises(CorruptReplica, match="writeback failed"):
        store.sync(C1, V1)
    assert store.stat(C1).damage is not None
    with pytest.raises(CorruptReplica):
        store.read(C1, V1, 0, 10)


def test_a_file_system_without_sync_file_range_still_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int, flags: int) -> None:
        raise OSError(errno.EINVAL, "not here")

    monkeypatch.setattr(write_behind, "sync_file_range", unsupported)
    data = os.urandom(3 * MIB)
    with ChunkStore(tmp_path / "data", chunk_size_bytes=CHUNK) as store:
        store.create(C1, V1, compressed=False)
        store.write(C1, V1, 0, data)
        store.sync(C1, V1)
    with ChunkStore(tmp_path / "data", chunk_size_bytes=CHUNK) as store:
        assert store.read(C1, V1, 0, len(data)) == data


def test_ranges_are_merged_started_and_dropped_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, int, int, int]] = []

    def record_range(fd: int, offset: int, length: int, flags: int) -> None:
        calls.append(("range", offset, length, flags))

    def record_advice(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append(("drop", offset, length, advice))

    monkeypatch.setattr(write_behind, "sync_file_range", record_range)
    monkeypatch.setattr(os, "posix_fadvise", record_advice)
    behind = WriteBehind(-1, start_bytes=100, lag_bytes=250)
    behind.written(0, 60)
    assert calls == []  # contiguous and short: waits for more
    behind.written(60, 60)
    assert calls == [("range", 0, 120, SYNC_FILE_RANGE_WRITE)]
    behind.written(1000, 10)  # elsewhere, short
    behind.written(5000, 200)  # elsewhere: the short one starts, then this one
    assert calls[1:3] == [
        ("range", 1000, 10, SYNC_FILE_RANGE_WRITE),
        ("range", 5000, 200, SYNC_FILE_RANGE_WRITE),
    ]
    # 330 bytes handed over, lag 250: the oldest range is waited for and dropped.
    assert calls[3:] == [
        ("range", 0, 120, WAIT_AND_WRITE),
        ("drop", 0, 120, os.POSIX_FADV_DONTNEED),
    ]
    assert behind.cached_bytes == 210
    del calls[:]
    behind.written(5200, 60)
    behind.synced()  # clean now: the oldest go without waiting, the newest 60 stay
    assert calls == [
        ("drop", 1000, 10, os.POSIX_FADV_DONTNEED),
        ("drop", 5000, 200, os.POSIX_FADV_DONTNEED),
    ]
    assert behind.cached_bytes == 60
    assert behind.error is None
