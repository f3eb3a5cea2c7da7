"""Concurrency on one chunk: reads run side by side, writes run alone and are not starved."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dataserver.chunk_file import ChunkFile
from dataserver.chunk_store import ChunkStore
from wire.ids import ChunkId, ChunkVersion

C1, V1 = ChunkId(1), ChunkVersion(1)
CHUNK = 1024 * 1024
WAIT_S = 5.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    with ChunkStore(tmp_path / "data", chunk_size_bytes=CHUNK) as opened:
        opened.create(C1, V1, compressed=False)
        opened.write(C1, V1, 0, b"x" * 1000)
        yield opened


def _in_thread(action: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()  # type: ignore[operator]
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _exclusive_waiting(store: ChunkStore) -> int:
    entry = store._locks._locks.get(C1)
    return 0 if entry is None else entry[0]._exclusive_waiting


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.001)


def test_reads_of_one_chunk_run_side_by_side(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_inside = threading.Barrier(2, timeout=WAIT_S)
    original = ChunkFile.read

    def meeting_read(self: ChunkFile, offset: int, size: int) -> bytes:
        both_inside.wait()  # breaks (BrokenBarrierError) if reads were one at a time
        return original(self, offset, size)

    monkeypatch.setattr(ChunkFile, "read", meeting_read)
    readers = [_in_thread(lambda: store.read(C1, V1, 0, 10)) for _ in range(2)]
    for thread, errors in readers:
        thread.join(2 * WAIT_S)
        assert errors == []


def test_a_waiting_write_goes_before_reads_that_come_after_it(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    first_read_inside = threading.Event()
    release_first_read = threading.Event()
    original = ChunkFile.read

    def slow_first_read(self: ChunkFile, offset: int, size: int) -> bytes:
        if not first_read_inside.is_set():
            first_read_inside.set()
            assert release_first_read.wait(WAIT_S)
        order.append(f"read {offset}")
        return original(self, offset, size)

    monkeypatch.setattr(ChunkFile, "read", slow_first_read)
    first, first_errors = _in_thread(lambda: store.read(C1, V1, 1, 1))
    assert first_read_inside.wait(WAIT_S)

    def write() -> None:
        store.write(C1, V1, 0, b"y")
        order.append("write")

    writer, writer_errors = _in_thread(write)
    _wait_until(lambda: _exclusive_waiting(store) == 1, "the writer waits for the chunk lock")
    late, late_errors = _in_thread(lambda: store.read(C1, V1, 2, 1))
    time.sleep(0.1)
    assert order == [], "the late read must wait behind the waiting write"
    release_first_read.set()
    for thread in (first, writer, late):
        thread.join(WAIT_S)
    assert first_errors == writer_errors == late_errors == []
    assert order == ["read 1", "write", "read 2"]
    assert store.read(C1, V1, 0, 1) == b"y"
