"""Crash safety of the chunk store: a child process is killed (``os._exit``) at a named
failpoint and the parent reopens the data directory and checks what survived.

A process crash keeps the page cache, so these tests cover the ordering of writes inside
the store; the torn states a power cut could add (an index entry on disk without the header,
or the other way round, a torn data slot) are produced by rewriting the file's bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dataserver.chunk_store import (
    BLOCK_SIZE_BYTES,
    FORMAT_FILE_NAME,
    ChecksumError,
    ChunkNotFound,
    ChunkStore,
    replica_file_name,
)
from wire.ids import ChunkId, ChunkVersion
from wire.replica_format import layout_for_capacity

B = BLOCK_SIZE_BYTES
CHUNK = 16 * B
C1 = ChunkId(0xABC)
V1, V2 = ChunkVersion(1), ChunkVersion(2)
CRASH_EXIT_CODE = 77

_PREAMBLE = """
import os, sys
from pathlib import Path
from dataserver.chunk_store import ChunkStore, replica_file_name
from wire.ids import ChunkId, ChunkVersion

B = 64 * 1024
C1 = ChunkId(0xABC)
V1, V2 = ChunkVersion(1), ChunkVersion(2)
DIRECTORY = sys.argv[1]
CRASH_AT = sys.argv[2]
PATH = Path(DIRECTORY) / replica_file_name(C1, V1)
before_crash = []
armed = []

def arm():
    armed.append(True)

def failpoint(point):
    if armed and point == CRASH_AT:
        for action in before_crash:
            action()
        os._exit({code})

def pattern(seed, size):
    return bytes((seed * 31 + i * 7) % 251 for i in range(size))

store = ChunkStore(DIRECTORY, chunk_size_bytes={chunk}, failpoint=failpoint)
"""


def pattern(seed: int, size: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(size))


def _crash_child(directory: Path, crash_at: str, body: str) -> None:
    """Run ``body`` in a child that must die at failpoint ``crash_at`` once ``arm()``ed."""
    script = _PREAMBLE.format(code=CRASH_EXIT_CODE, chunk=CHUNK) + textwrap.dedent(body)
    script += "\nraise SystemExit('the failpoint was never reached')\n"
    result = subprocess.run(
        [sys.executable, "-c", script, str(directory), crash_at],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == CRASH_EXIT_CODE, result.stderr


OVERWRITE_BODY = """
store.create(C1, V1, compressed=COMPRESSED)
store.write(C1, V1, 0, pattern(1, 8 * B))
store.sync(C1, V1)
store.write(C1, V1, 2 * B + 100, pattern(2, 3 * B))
store.write(C1, V1, 8 * B, pattern(3, 2 * B))
arm()
store.sync(C1, V1)
"""


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_crash_before_the_index_write_keeps_the_last_synced_state(
    tmp_path: Path, compressed: bool
) -> None:
    _crash_child(tmp_path, "sync:data_synced", f"COMPRESSED = {compressed}\n" + OVERWRITE_BODY)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert store.read(C1, V1, 0, CHUNK) == pattern(1, 8 * B)
        assert store.verify(C1, V1) == []


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_crash_after_the_index_write_shows_the_new_state(tmp_path: Path, compressed: bool) -> None:
    _crash_child(tmp_path, "sync:index_written", f"COMPRESSED = {compressed}\n" + OVERWRITE_BODY)
    expected = bytearray(pattern(1, 8 * B))
    expected[2 * B + 100 : 5 * B + 100] = pattern(2, 3 * B)
    expected += pattern(3, 2 * B)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert store.read(C1, V1, 0, CHUNK) == bytes(expected)
        assert store.verify(C1, V1) == []


def test_entries_on_disk_without_their_header_do_not_resurface(tmp_path: Path) -> None:
    """Power cut inside a growing sync: new index entries reached the disk, the header
    (the length) did not. The blocks past the old length must stay invisible, even after
    the length is extended again."""
    _crash_child(
        tmp_path,
        "sync:index_written",
        """
        store.create(C1, V1, compressed=False)
        store.write(C1, V1, 0, pattern(1, 3 * B - 10))
        store.sync(C1, V1)
        old_header = PATH.read_bytes()[:64]
        def restore_header():
            with open(PATH, "r+b") as handle:
                handle.write(old_header)
        before_crash.append(restore_header)
        store.write(C1, V1, 3 * B - 10, pattern(2, 3 * B + 100))
        arm()
        store.sync(C1, V1)
        """,
    )
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert store.read(C1, V1, 0, CHUNK) == pattern(1, 3 * B - 10)
        store.truncate(C1, V1, 8 * B)
        assert store.read(C1, V1, 0, CHUNK) == pattern(1, 3 * B - 10) + bytes(5 * B + 10)
        store.sync(C1, V1)
        assert store.verify(C1, V1) == []


def test_header_on_disk_without_its_entries_cuts_the_old_blocks(tmp_path: Path) -> None:
    """Power cut inside a shrinking sync: the new header (shorter length) reached the disk,
    the entries did not. Bytes past the new length must read as zeros once it grows again."""
    _crash_child(
        tmp_path,
        "sync:index_written",
        """
        store.create(C1, V1, compressed=False)
        store.write(C1, V1, 0, pattern(1, 6 * B))
        store.sync(C1, V1)
        old_index = PATH.read_bytes()[4096 : 4096 + 16 * 32]
        def restore_entries():
            with open(PATH, "r+b") as handle:
                handle.seek(4096)
                handle.write(old_index)
        before_crash.append(restore_entries)
        store.truncate(C1, V1, 2 * B + 50)
        arm()
        store.sync(C1, V1)
        """,
    )
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert store.read(C1, V1, 0, CHUNK) == pattern(1, 2 * B + 50)
        store.truncate(C1, V1, 6 * B)
        assert store.read(C1, V1, 0, CHUNK) == pattern(1, 2 * B + 50) + bytes(4 * B - 50)


def test_torn_block_behind_an_updated_index_is_never_returned(tmp_path: Path) -> None:
    """A lying disk persisted the index flip but only half of the new block."""
    layout = layout_for_capacity(CHUNK)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        store.create(C1, V1, compressed=False)
        store.write(C1, V1, 0, pattern(1, 4 * B))
        store.sync(C1, V1)
        store.write(C1, V1, 2 * B, pattern(2, B))
        store.sync(C1, V1)
    with open(tmp_path / replica_file_name(C1, V1), "r+b") as handle:
        handle.seek(layout.slot_offset(2, 1) + B // 2)
        handle.write(pattern(1, 4 * B)[2 * B + B // 2 : 3 * B])
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        with pytest.raises(ChecksumError) as caught:
            store.read(C1, V1, 0, CHUNK)
        assert caught.value.block_index == 2
        assert store.read(C1, V1, 0, 2 * B) == pattern(1, 2 * B)
        assert store.read(C1, V1, 3 * B, B) == pattern(1, 4 * B)[3 * B :]
        assert store.verify(C1, V1) == [2]


CREATE_BODY = """
with store.stage(C1, V1, compressed=False) as staged:
    staged.write(0, pattern(4, B + 3))
    arm()
    staged.commit()
"""


def test_crash_before_the_rename_leaves_no_replica_and_no_temp_file(tmp_path: Path) -> None:
    _crash_child(tmp_path, "commit:synced", CREATE_BODY)
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert os.listdir(tmp_path) == [FORMAT_FILE_NAME]
        with pytest.raises(ChunkNotFound):
            store.stat(C1)


def test_crash_after_the_rename_leaves_a_complete_replica(tmp_path: Path) -> None:
    _crash_child(tmp_path, "commit:renamed", CREATE_BODY)
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert store.read(C1, V1, 0, CHUNK) == pattern(4, B + 3)


def test_crash_during_a_version_bump_keeps_the_data(tmp_path: Path) -> None:
    _crash_child(
        tmp_path,
        "bump:renamed",
        """
        store.create(C1, V1, compressed=True)
        store.write(C1, V1, 0, pattern(5, 2 * B))
        store.sync(C1, V1)
        arm()
        store.bump_version(C1, V1, V2)
        """,
    )
    with ChunkStore(tmp_path, chunk_size_bytes=CHUNK) as store:
        assert store.stat(C1).version == V2
        assert store.read(C1, V2, 0, CHUNK) == pattern(5, 2 * B)
