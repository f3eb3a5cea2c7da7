"""Chunks open for write: the namespace knows which chunk versions a writer opened and
has not committed, since when, and closes them by commit, reopen, truncate, unlink or a
leader's recovery; the table is replicated (deterministic, in snapshots)."""

from __future__ import annotations

import errno

import pytest

from metaserver.namespace import Namespace, SnapshotError
from wire.ids import ChunkId, ChunkVersion, InodeId
from wire.namespace_ops import (
    ChunkGoal,
    ChunkReply,
    CommitRecovery,
    CommitWrite,
    GetChunks,
    GetDeletions,
    NsError,
    OkReply,
    OpenChunk,
    RecoverChunk,
    ScanChunks,
    SetAttr,
    SystemCommand,
    Unlink,
)

from .test_namespace_support import (
    SMALL_CHUNK,
    Client,
    chunk_write,
    pack_snapshot,
    snapshot_records,
)

CS = SMALL_CHUNK


@pytest.fixture
def c() -> Client:
    return Client()


def scan(c: Client) -> dict[int, ChunkGoal]:
    entries: dict[int, ChunkGoal] = {}
    inode, index = InodeId(0), 0
    while True:
        page = c.qok(ScanChunks(inode, index))
        entries.update((entry.chunk, entry) for entry in page.entries)
        if page.done:
            return entries
        inode, index = page.next_inode, page.next_index


def open_chunk(c: Client, ino: int, index: int) -> tuple[ChunkReply, int]:
    """Open a chunk; return the reply and the command's time."""
    command = c.command(OpenChunk(InodeId(ino), index))
    reply = c.ns.apply(command)
    assert isinstance(reply, ChunkReply)
    return reply, command.time_ns


def recover(c: Client, chunk: int, version: int, opened_ns: int) -> object:
    op = RecoverChunk(ChunkId(chunk), ChunkVersion(version), opened_ns)
    return c.ns.apply(SystemCommand(c.tick(), op))


def commit_recovery(c: Client, chunk: int, version: int, opened_ns: int) -> object:
    op = CommitRecovery(ChunkId(chunk), ChunkVersion(version), opened_ns)
    return c.ns.apply(SystemCommand(c.tick(), op))


def test_an_opened_version_is_open_since_its_command_until_committed(c: Client) -> None:
    f = c.mknod(b"f")
    opened, at_ns = open_chunk(c, f, 0)
    assert scan(c)[opened.chunk].opened_ns == at_ns
    c.ok(CommitWrite(f, (chunk_write(0, opened.chunk, opened.version, 10),)))
    assert scan(c)[opened.chunk].opened_ns is None
    again, again_ns = open_chunk(c, f, 0)
    assert again.version == opened.version + 1
    assert scan(c)[opened.chunk].opened_ns == again_ns > at_ns
    c.ns.verify()


def test_a_commit_of_an_old_version_does_not_close_the_new_one(c: Client) -> None:
    f = c.mknod(b"f")
    old, _ = open_chunk(c, f, 0)
    new, new_ns = open_chunk(c, f, 0)
    stale = CommitWrite(f, (chunk_write(0, old.chunk, old.version, 10),))
    assert c.err(stale) == errno.ESTALE
    assert scan(c)[new.chunk].opened_ns == new_ns


def test_truncate_and_unlink_drop_open_chunks(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 2 * CS)
    first, _ = open_chunk(c, f, 0)
    second, _ = open_chunk(c, f, 1)
    c.ok(SetAttr(f, size=CS))
    assert set(scan(c)) == {first.chunk} and scan(c)[first.chunk].opened_ns is not None
    c.ok(Unlink(InodeId(1), b"f"))
    assert scan(c) == {}
    c.ns.verify()
    assert recover(c, second.chunk, second.version, 0) == NsError(errno.ESTALE)


def test_recovery_moves_an_open_chunk_to_the_next_version_keeping_its_length(c: Client) -> None:
    f = c.mknod(b"f")
    attr = c.write(f, 0, 9)
    opened, at_ns = open_chunk(c, f, 0)
    assert recover(c, opened.chunk, opened.version, at_ns) == OkReply()
    entry = scan(c)[opened.chunk]
    recovering_ns = c.now_ns
    assert (entry.version, entry.length, entry.opened_ns, entry.recovering) == (
        opened.version + 1,
        9,
        recovering_ns,
        True,
    )
    assert commit_recovery(c, opened.chunk, entry.version, at_ns) == NsError(errno.ESTALE)
    assert commit_recovery(c, opened.chunk, opened.version, recovering_ns) == NsError(errno.ESTALE)
    assert commit_recovery(c, opened.chunk, entry.version, recovering_ns) == OkReply()
    entry = scan(c)[opened.chunk]
    assert (entry.version, entry.length, entry.opened_ns) == (opened.version + 1, 9, None)
    assert c.attr(f).size == attr.size == 9
    assert (opened.chunk, opened.version) in {
        (e.chunk, e.version) for e in c.qok(GetDeletions()).entries
    }
    # The fenced writer's commit of the version it was given now fails.
    late = CommitWrite(f, (chunk_write(0, opened.chunk, opened.version, 12),))
    assert c.err(late) == errno.ESTALE
    assert c.qok(GetChunks(f)).size == 9
    c.ns.verify()


def test_recovery_is_refused_once_the_open_changed(c: Client) -> None:
    f = c.mknod(b"f")
    opened, at_ns = open_chunk(c, f, 0)
    # Not at that version, or not opened at that time: nothing happens.
    assert recover(c, opened.chunk, opened.version + 1, at_ns) == NsError(errno.ESTALE)
    assert recover(c, opened.chunk, opened.version, at_ns + 1) == NsError(errno.ESTALE)
    again, again_ns = open_chunk(c, f, 0)
    assert recover(c, opened.chunk, opened.version, at_ns) == NsError(errno.ESTALE)
    c.ok(CommitWrite(f, (chunk_write(0, again.chunk, again.version, 7),)))
    assert recover(c, again.chunk, again.version, again_ns) == NsError(errno.ESTALE)
    assert scan(c)[again.chunk].version == again.version


def test_a_writer_reopening_a_recovering_chunk_gets_a_version_past_it(c: Client) -> None:
    f = c.mknod(b"f")
    opened, at_ns = open_chunk(c, f, 0)
    assert recover(c, opened.chunk, opened.version, at_ns) == OkReply()
    recovering_ns = c.now_ns
    again, again_ns = open_chunk(c, f, 0)
    assert again.version == opened.version + 2
    entry = scan(c)[opened.chunk]
    assert (entry.opened_ns, entry.recovering) == (again_ns, False)
    stale = commit_recovery(c, opened.chunk, opened.version + 1, recovering_ns)
    assert stale == NsError(errno.ESTALE)
    # A recovery left unfinished is started again from the version it made.
    assert recover(c, again.chunk, again.version, again_ns) == OkReply()
    assert recover(c, again.chunk, again.version + 1, c.now_ns) == OkReply()
    assert scan(c)[again.chunk].version == again.version + 2
    c.ns.verify()


def test_open_chunks_survive_a_snapshot_and_change_the_digest(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 2 * CS)
    before = c.ns.digest()
    opened, at_ns = open_chunk(c, f, 1)
    restored = Namespace.restore(c.ns.snapshot())
    assert restored.digest() == c.ns.digest() != before
    c.ns = restored
    assert scan(c)[opened.chunk].opened_ns == at_ns
    assert recover(c, opened.chunk, opened.version, at_ns) == OkReply()
    restored = Namespace.restore(c.ns.snapshot())
    assert restored.digest() == c.ns.digest()
    c.ns = restored
    assert scan(c)[opened.chunk].recovering


def test_a_format_2_snapshot_loads_with_no_chunk_open(c: Client) -> None:
    f = c.mknod(b"f")
    opened, at_ns = open_chunk(c, f, 0)
    records = snapshot_records(c.ns.snapshot())
    assert records[0] == ["paxfs-namespace", 3] and records[-2] == [[opened.chunk, f, 0, at_ns, 0]]
    older = [["paxfs-namespace", 2], *records[1:-2], records[-1]]
    c.ns = Namespace.restore(pack_snapshot(older))
    assert scan(c)[opened.chunk].opened_ns is None


def test_a_snapshot_whose_open_chunk_is_not_in_its_file_is_refused(c: Client) -> None:
    f = c.mknod(b"f")
    opened, at_ns = open_chunk(c, f, 0)
    records = snapshot_records(c.ns.snapshot())
    assert records[-2] == [[opened.chunk, f, 0, at_ns, 0]]
    records[-2] = [[opened.chunk, f, 1, at_ns, 0]]
    with pytest.raises(SnapshotError, match="open chunk"):
        Namespace.restore(pack_snapshot(records))
    records[-2] = [[opened.chunk, f, 0, at_ns, 0], [opened.chunk, f, 0, at_ns, 0]]
    with pytest.raises(SnapshotError, match="open twice"):
        Namespace.restore(pack_snapshot(records))


def test_opens_past_the_limit_are_refused_but_reopening_an_open_chunk_is_not(
    c: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("metaserver.namespace._ops_data.OPEN_CHUNKS_MAX", 2)
    f = c.mknod(b"f")
    first, _ = open_chunk(c, f, 0)
    open_chunk(c, f, 1)
    assert c.err(OpenChunk(f, 2)) == errno.ENFILE
    again, _ = open_chunk(c, f, 0)
    assert again.version == first.version + 1
    c.ok(CommitWrite(f, (chunk_write(0, again.chunk, again.version, 3),)))
    open_chunk(c, f, 2)
