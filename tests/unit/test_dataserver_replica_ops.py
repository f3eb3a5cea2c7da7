"""Replica version rules, the incremental report, and the data directory's identity."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataserver.chunk_store import (
    BLOCK_SIZE_BYTES,
    ChunkNotFound,
    ChunkStore,
    CorruptReplica,
    StaleVersion,
    replica_file_name,
)
from dataserver.data_dir import DataDirError, open_data_dir
from dataserver.replica_ops import ReplicaChanges, ReplicaOps, VersionRefused
from wire.cluster_ops import ReplicaKey, ReplicaReport
from wire.ids import ChunkId, ChunkVersion
from wire.replica_format import layout_for_capacity


@dataclass(frozen=True)
class Target:
    """The version fields of a mutating request (what :class:`VersionedRequest` needs)."""

    chunk_id: ChunkId
    version: ChunkVersion
    base_version: ChunkVersion | None = None
    compressed: bool = False
    base_length_bytes: int | None = None


CHUNK = ChunkId(0x42)
V1, V2, V3 = ChunkVersion(1), ChunkVersion(2), ChunkVersion(3)
CHUNK_SIZE = 256 * 1024


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[ReplicaOps]:
    store = ChunkStore(tmp_path / "chunks", chunk_size_bytes=CHUNK_SIZE)
    yield ReplicaOps(store)
    store.close()


def test_a_write_for_a_new_chunk_creates_the_replica_and_reports_it(ops: ReplicaOps) -> None:
    assert ops.write(Target(CHUNK, V1), 10, b"hello") == 15
    assert ops.read(CHUNK, V1, 0, 100) == (bytes(10) + b"hello", 15)
    removed, added = ops.changes.take()
    assert removed == () and added == (ReplicaReport(CHUNK, V1, 0, False),)


def test_a_write_derives_the_new_version_from_its_base_by_renaming(ops: ReplicaOps) -> None:
    ops.write(Target(CHUNK, V1), 0, b"abc")
    ops.sync(Target(CHUNK, V1))
    ops.changes.take()
    ops.write(Target(CHUNK, V2, V1), 3, b"def")
    assert ops.read(CHUNK, V2, 0, 10)[0] == b"abcdef"
    with pytest.raises(StaleVersion):
        ops.read(CHUNK, V1, 0, 10)
    removed, added = ops.changes.take()
    assert removed == (ReplicaKey(CHUNK, V1),)
    assert [(r.version, r.length_bytes) for r in added] == [(V2, 3)]


def test_a_request_older_than_the_stored_version_is_refused(ops: ReplicaOps) -> None:
    ops.write(Target(CHUNK, V2), 0, b"new")
    with pytest.raises(VersionRefused, match="stale"):
        ops.write(Target(CHUNK, V1), 0, b"old writer")
    assert ops.read(CHUNK, V2, 0, 10)[0] == b"new"


def test_a_replica_that_missed_a_version_is_not_brought_forward(ops: ReplicaOps) -> None:
    """Stored v1, but v3 derives from v2: this replica was cut out at v1 and lacks v2's data."""
    ops.write(Target(CHUNK, V1), 0, b"v1 data")
    with pytest.raises(VersionRefused, match="missed updates"):
        ops.write(Target(CHUNK, V3, V2), 0, b"x")
    with pytest.raises(VersionRefused, match="missed updates"):
        ops.sync(Target(CHUNK, V3, V2))
    assert ops.read(CHUNK, V1, 0, 10)[0] == b"v1 data"


def test_a_derived_version_on_a_server_without_the_chunk_is_enoent_not_a_creation(
    ops: ReplicaOps,
) -> None:
    with pytest.raises(VersionRefused) as caught:
        ops.write(Target(CHUNK, V2, V1), 0, b"x")
    assert caught.value.missing
    with pytest.raises(ChunkNotFound):
        ops.store.stat(CHUNK)


def test_truncate_and_delete_are_reported(ops: ReplicaOps) -> None:
    ops.write(Target(CHUNK, V1), 0, bytes(1000))
    assert ops.truncate(Target(CHUNK, V2, V1), 10) == 10
    assert ops.sync(Target(CHUNK, V2, V1)) == 10
    ops.changes.take()
    assert ops.delete(CHUNK, V1) is False, "only the stored version is deleted"
    assert ops.delete(CHUNK, V2) is True
    assert ops.changes.take() == ((ReplicaKey(CHUNK, V2),), ())


def test_a_derived_version_drops_what_lies_past_the_base_length_durably(
    tmp_path: Path,
) -> None:
    """v1 holds 1000 bytes of which the metaserver committed 600 (a writer died before
    committing the rest): v2 derived from it starts with exactly those 600, also after a
    restart that loses every unsynced change."""
    store = ChunkStore(tmp_path / "chunks", chunk_size_bytes=CHUNK_SIZE)
    ops = ReplicaOps(store)
    ops.write(Target(CHUNK, V1), 0, bytes(range(250)) * 4)
    ops.sync(Target(CHUNK, V1))
    ops.changes.take()
    assert ops.write(Target(CHUNK, V2, V1, base_length_bytes=600), 700, b"new") == 703
    assert ops.read(CHUNK, V2, 0, 1000) == (
        bytes(range(250)) * 2 + bytes(range(100)) + bytes(100) + b"new",
        703,
    )
    removed, added = ops.changes.take()
    assert [(r.version, r.length_bytes) for r in added] == [(V2, 600)]
    store.close(sync=False)
    store = ChunkStore(tmp_path / "chunks", chunk_size_bytes=CHUNK_SIZE)
    ops = ReplicaOps(store)
    assert ops.read(CHUNK, V2, 0, 1000) == (bytes(range(250)) * 2 + bytes(range(100)), 600)
    store.close()


def test_a_derived_version_without_a_base_length_keeps_every_byte(ops: ReplicaOps) -> None:
    """A version derived after a pipeline failure keeps what the survivors hold: those
    bytes were acknowledged to the writer, who will not send them again."""
    ops.write(Target(CHUNK, V1), 0, b"acknowledged")
    assert ops.truncate(Target(CHUNK, V2, V1), 12) == 12
    assert ops.read(CHUNK, V2, 0, 100) == (b"acknowledged", 12)


def test_a_replica_at_its_version_is_written_without_looking_it_up(
    ops: ReplicaOps, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops.write(Target(CHUNK, V1), 0, b"first")
    looked_up: list[ChunkId] = []
    stat = ops.store.stat
    monkeypatch.setattr(
        ops.store, "stat", lambda chunk_id: looked_up.append(chunk_id) or stat(chunk_id)
    )
    assert ops.write(Target(CHUNK, V1), 5, b" second") == 12
    assert ops.truncate(Target(CHUNK, V1), 6) == 6
    assert ops.sync(Target(CHUNK, V1)) == 6
    assert ops.read(CHUNK, V1, 0, 100) == (b"first ", 6)
    assert looked_up == []
    ops.write(Target(CHUNK, V2, V1), 6, b"!")
    assert looked_up == [CHUNK], "deriving a version looks the replica up once"


def test_a_replica_found_corrupt_is_not_written_to(ops: ReplicaOps) -> None:
    ops.write(Target(CHUNK, V1), 0, bytes(BLOCK_SIZE_BYTES))
    ops.sync(Target(CHUNK, V1))
    path = Path(ops.store.directory) / replica_file_name(CHUNK, V1)
    slot = layout_for_capacity(CHUNK_SIZE).slot_offset(0, 0)
    with open(path, "r+b") as handle:
        handle.seek(slot)
        handle.write(b"\xff")
    with pytest.raises(CorruptReplica):
        ops.read(CHUNK, V1, 0, 10)
    with pytest.raises(CorruptReplica):
        ops.write(Target(CHUNK, V1), BLOCK_SIZE_BYTES, b"more")
    with pytest.raises(CorruptReplica):
        ops.sync(Target(CHUNK, V1))
    assert [f.reporter for f in ops.take_corrupt_findings()] == ["read"]


def test_the_full_report_lists_every_replica_and_restarts_the_incremental_one(
    ops: ReplicaOps,
) -> None:
    for chunk in range(5):
        ops.write(Target(ChunkId(chunk), V1), 0, b"x" * chunk)
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
