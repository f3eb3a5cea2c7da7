"""Replica version rules, the incremental report, and the data directory's identity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dataserver.chunk_store import ChunkNotFound, ChunkStore, StaleVersion
from dataserver.data_dir import DataDirError, open_data_dir
from dataserver.replica_ops import ReplicaChanges, ReplicaOps, VersionRefused
from wire.cluster_ops import ReplicaKey, ReplicaReport
from wire.ids import ChunkId, ChunkVersion

CHUNK = ChunkId(0x42)
V1, V2, V3 = ChunkVersion(1), ChunkVersion(2), ChunkVersion(3)
CHUNK_SIZE = 256 * 1024


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[ReplicaOps]:
    store = ChunkStore(tmp_path / "chunks", chunk_size_bytes=CHUNK_SIZE)
    yield ReplicaOps(store)
    store.close()


def test_a_write_for_a_new_chunk_creates_the_replica_and_reports_it(ops: ReplicaOps) -> None:
    assert ops.write(CHUNK, V1, None, False, 10, b"hello") == 15
    assert ops.read(CHUNK, V1, 0, 100) == (bytes(10) + b"hello", 15)
    removed, added = ops.changes.take()
    assert removed == () and added == (ReplicaReport(CHUNK, V1, 0, False),)


def test_a_write_derives_the_new_version_from_its_base_by_renaming(ops: ReplicaOps) -> None:
    ops.write(CHUNK, V1, None, False, 0, b"abc")
    ops.sync(CHUNK, V1, None, False)
    ops.changes.take()
    ops.write(CHUNK, V2, V1, False, 3, b"def")
    assert ops.read(CHUNK, V2, 0, 10)[0] == b"abcdef"
    with pytest.raises(StaleVersion):
        ops.read(CHUNK, V1, 0, 10)
    removed, added = ops.changes.take()
    assert removed == (ReplicaKey(CHUNK, V1),)
    assert [(r.version, r.length_bytes) for r in added] == [(V2, 3)]


def test_a_request_older_than_the_stored_version_is_refused(ops: ReplicaOps) -> None:
    ops.write(CHUNK, V2, None, False, 0, b"new")
    with pytest.raises(VersionRefused, match="stale"):
        ops.write(CHUNK, V1, None, False, 0, b"old writer")
    assert ops.read(CHUNK, V2, 0, 10)[0] == b"new"


def test_a_replica_that_missed_a_version_is_not_brought_forward(ops: ReplicaOps) -> None:
    """Stored v1, but v3 derives from v2: this replica was cut out at v1 and lacks v2's data."""
    ops.write(CHUNK, V1, None, False, 0, b"v1 data")
    with pytest.raises(VersionRefused, match="missed updates"):
        ops.write(CHUNK, V3, V2, False, 0, b"x")
    with pytest.raises(VersionRefused, match="missed updates"):
        ops.sync(CHUNK, V3, V2, False)
    assert ops.read(CHUNK, V1, 0, 10)[0] == b"v1 data"


def test_a_derived_version_on_a_server_without_the_chunk_is_enoent_not_a_creation(
    ops: ReplicaOps,
) -> None:
    with pytest.raises(VersionRefused) as caught:
        ops.write(CHUNK, V2, V1, False, 0, b"x")
    assert caught.value.missing
    with pytest.raises(ChunkNotFound):
        ops.store.stat(CHUNK)


def test_truncate_and_delete_are_reported(ops: ReplicaOps) -> None:
    ops.write(CHUNK, V1, None, False, 0, bytes(1000))
    assert ops.truncate(CHUNK, V2, V1, False, 10) == 10
    assert ops.sync(CHUNK, V2, V1, False) == 10
    ops.changes.take()
    assert ops.delete(CHUNK, V1) is False, "only the stored version is deleted"
    assert ops.delete(CHUNK, V2) is True
    assert ops.changes.take() == ((ReplicaKey(CHUNK, V2),), ())


def test_the_full_report_lists_every_replica_and_restarts_the_incremental_one(
    ops: ReplicaOps,
) -> None:
    for chunk in range(5):
        ops.write(ChunkId(chunk), V1, None, False, 0, b"x" * chunk)
    report = ops.full_report()
    assert [(r.chunk_id, r.length_bytes) for r in report] == [(c, c) for c in range(5)]
    assert len(ops.changes) == 0


def test_changes_keep_the_latest_state_and_a_limit() -> None:
    changes = ReplicaChanges()
    changes.add(ReplicaReport(CHUNK, V1, 0, False))
    changes.add(ReplicaReport(CHUNK, V1, 500, False))
    changes.remove(CHUNK, V1)
    changes.add(ReplicaReport(CHUNK, V2, 500, False))
    for chunk in range(1, 4):
        changes.add(ReplicaReport(ChunkId(chunk), V1, 1, False))
    removed, added = changes.take(limit=3)
    assert removed == (ReplicaKey(CHUNK, V1),)
    assert [(r.chunk_id, r.version) for r in added] == [(CHUNK, V2), (1, V1)]
    changes.put_back(removed, added)
    changes.add(ReplicaReport(ChunkId(1), V2, 9, False))
    removed, added = changes.take()
    assert removed == (ReplicaKey(CHUNK, V1),)
    assert {(r.chunk_id, r.version) for r in added} == {(CHUNK, V2), (1, V2), (2, V1), (3, V1)}


def test_the_dataserver_id_is_drawn_once_and_kept(tmp_path: Path) -> None:
    first = open_data_dir(str(tmp_path / "data"))
    again = open_data_dir(str(tmp_path / "data"))
    assert first.dataserver_id == again.dataserver_id
    assert 0 < first.dataserver_id < 1 << 63
    assert other_id(tmp_path) != first.dataserver_id


def other_id(tmp_path: Path) -> int:
    return open_data_dir(str(tmp_path / "other")).dataserver_id


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("DATASERVER", "paxfs-dataserver 2\nid 0000000000000001\n", "format 2"),
        ("DATASERVER", "something else", "not a paxfs dataserver identity"),
        ("notes.txt", "mine", "not a paxfs dataserver directory"),
    ],
)
def test_a_directory_of_another_kind_is_refused(
    tmp_path: Path, name: str, text: str, match: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataDirError, match=match):
        open_data_dir(str(tmp_path))
