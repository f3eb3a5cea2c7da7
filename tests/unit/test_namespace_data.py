"""File data: chunk allocation and commit, truncation, the deletion queue, open files,
chunk lists for readers and the healing scan."""

from __future__ import annotations

import errno

import pytest

from metaserver.namespace import Namespace, NamespaceConfig
from wire.ids import ROOT_INODE, ChunkId, ChunkVersion, InodeId
from wire.namespace_ops import (
    COMMIT_CHUNKS_MAX,
    RELEASE_MANY_MAX,
    AckDeletions,
    ChunkInfo,
    CommitWrite,
    DeletedChunk,
    GetChunks,
    GetDeletions,
    Open,
    OpenChunk,
    Release,
    ReleaseMany,
    Rename,
    ScanChunks,
    SetAttr,
    SetGoal,
    StatFs,
    SystemCommand,
    Unlink,
)

from .test_namespace_support import SMALL_CHUNK, Client, chunk_write

ROOT = InodeId(ROOT_INODE)
CS = SMALL_CHUNK


@pytest.fixture
def c() -> Client:
    return Client()


def chunks_of(c: Client, ino: int) -> list[tuple[int, int, int, int]]:
    reply = c.qok(GetChunks(InodeId(ino)))
    return [(i.index, i.chunk, i.version, i.length) for i in reply.chunks]


def queue(c: Client) -> list[tuple[int, int]]:
    return [(e.chunk, e.version) for e in c.qok(GetDeletions()).entries]


def ack(c: Client, entries: list[tuple[int, int]]) -> None:
    op = AckDeletions(tuple(DeletedChunk(ChunkId(a), ChunkVersion(b)) for a, b in entries))
    c.ns.apply(SystemCommand(c.tick(), op))


# ---------------------------------------------------------------- writes


def test_a_hole_gets_a_new_chunk_at_version_1(c: Client) -> None:
    f = c.mknod(b"f")
    first = c.ok(OpenChunk(f, 0))
    second = c.ok(OpenChunk(f, 5))
    assert (first.version, second.version) == (1, 1)
    assert first.chunk != second.chunk and first.length == 0


def test_reopening_a_chunk_bumps_its_version_and_keeps_its_id(c: Client) -> None:
    f = c.mknod(b"f")
    first = c.ok(OpenChunk(f, 0))
    again = c.ok(OpenChunk(f, 0))
    assert again.chunk == first.chunk and again.version == first.version + 1


def test_commit_sets_chunk_length_and_file_size(c: Client) -> None:
    f = c.mknod(b"f")
    attr = c.write(f, 3, 2 * CS)
    assert attr.size == 3 + 2 * CS
    assert [(i, length) for i, _, _, length in chunks_of(c, f)] == [(0, CS), (1, CS), (2, 3)]
    assert attr.blocks == 1


def test_a_write_inside_the_file_does_not_shrink_it(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 3 * CS)
    assert c.write(f, 2, 3).size == 3 * CS
    assert [length for *_, length in chunks_of(c, f)] == [CS, CS, CS]


def test_commit_with_a_superseded_version_is_estale(c: Client) -> None:
    f = c.mknod(b"f")
    old = c.ok(OpenChunk(f, 0))
    c.ok(OpenChunk(f, 0))  # another writer takes over: version bumped
    stale = CommitWrite(f, (chunk_write(0, old.chunk, old.version, 4),))
    assert c.err(stale) == errno.ESTALE
    assert c.attr(f).size == 0


def test_commit_of_a_chunk_truncated_away_is_estale(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, CS)
    opened = c.ok(OpenChunk(f, 0))
    c.ok(SetAttr(f, size=0))
    assert c.err(CommitWrite(f, (chunk_write(0, opened.chunk, opened.version, 4),))) == (
        errno.ESTALE
    )


def test_commit_is_all_or_nothing(c: Client) -> None:
    f = c.mknod(b"f")
    good = c.ok(OpenChunk(f, 0))
    bad = c.ok(OpenChunk(f, 1))
    c.ok(OpenChunk(f, 1))
    writes = (chunk_write(0, good.chunk, good.version, 5), chunk_write(1, bad.chunk, 1, 5))
    assert c.err(CommitWrite(f, writes)) == errno.ESTALE
    assert c.attr(f).size == 0 and chunks_of(c, f)[0][3] == 0


@pytest.mark.parametrize(
    "writes",
    [
        (chunk_write(0, 1, 1, CS + 1),),
        (chunk_write(0, 1, 1, -1),),
        (chunk_write(-1, 1, 1, 1),),
        (chunk_write(0, 1, 1, 1), chunk_write(0, 1, 1, 2)),
    ],
)
def test_malformed_commits_are_einval(c: Client, writes: tuple) -> None:  # type: ignore[type-arg]
    f = c.mknod(b"f")
    c.ok(OpenChunk(f, 0))
    assert c.err(CommitWrite(f, writes)) == errno.EINVAL


def test_commit_of_too_many_chunks_at_once_is_einval(c: Client) -> None:
    f = c.mknod(b"f")
    writes = tuple(chunk_write(i, 1, 1, 1) for i in range(COMMIT_CHUNKS_MAX + 1))
    assert c.err(CommitWrite(f, writes)) == errno.EINVAL


def test_writes_to_directories_or_symlinks_are_refused(c: Client) -> None:
    d = c.mkdir(b"d")
    s = c.symlink(b"s", b"t")
    assert c.err(OpenChunk(d, 0)) == errno.EISDIR
    assert c.err(OpenChunk(s, 0)) == errno.EINVAL
    assert c.err(OpenChunk(InodeId(999), 0)) == errno.ENOENT


def test_a_chunk_past_the_largest_file_is_efbig() -> None:
    c = Client(Namespace(NamespaceConfig(chunk_size_bytes=CS, max_file_size_bytes=4 * CS)))
    f = c.mknod(b"f")
    c.ok(OpenChunk(f, 3))
    assert c.err(OpenChunk(f, 4)) == errno.EFBIG
    assert c.err(SetAttr(f, size=4 * CS + 1)) == errno.EFBIG
    assert c.err(OpenChunk(f, -1)) == errno.EINVAL


def test_commit_takes_the_given_mtime_or_now(c: Client) -> None:
    f = c.mknod(b"f")
    opened = c.ok(OpenChunk(f, 0))
    attr = c.ok(CommitWrite(f, (chunk_write(0, opened.chunk, opened.version, 1),), 77)).attr
    assert attr.mtime_ns == 77 and attr.ctime_ns == c.now_ns


# ---------------------------------------------------------------- truncate


def test_truncate_drops_whole_chunks_and_cuts_the_last(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 3 * CS)
    ids = [chunk for _, chunk, _, _ in chunks_of(c, f)]
    c.ok(SetAttr(f, size=CS + 5))
    assert [(i, length) for i, _, _, length in chunks_of(c, f)] == [(0, CS), (1, 5)]
    assert queue(c) == [(ids[2], 1)]
    assert c.attr(f).size == CS + 5


def test_truncate_on_a_chunk_boundary_keeps_no_empty_tail(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 2 * CS)
    c.ok(SetAttr(f, size=CS))
    assert [(i, length) for i, _, _, length in chunks_of(c, f)] == [(0, CS)]


def test_extending_a_file_makes_a_hole_and_no_chunks(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 3)
    attr = c.ok(SetAttr(f, size=10 * CS)).attr
    assert attr.size == 10 * CS and len(chunks_of(c, f)) == 1
    assert c.qok(GetChunks(f)).chunks == (ChunkInfo(0, ChunkId(1), ChunkVersion(1), 3),)


def test_truncate_sets_mtime_and_ctime(c: Client) -> None:
    f = c.mknod(b"f")
    attr = c.ok(SetAttr(f, size=5)).attr
    assert attr.mtime_ns == attr.ctime_ns == c.now_ns


def test_truncate_of_a_directory_is_eisdir_and_of_a_negative_size_einval(c: Client) -> None:
    d = c.mkdir(b"d")
    f = c.mknod(b"f")
    assert c.err(SetAttr(d, size=0)) == errno.EISDIR
    assert c.err(SetAttr(f, size=-1)) == errno.EINVAL


def test_truncate_of_a_symlink_is_einval(c: Client) -> None:
    """vfs_truncate: only regular files have a size to set."""
    assert c.err(SetAttr(c.symlink(b"s", b"t"), size=0)) == errno.EINVAL


def test_statfs_counts_inodes_files_and_chunk_bytes_through_create_write_and_unlink(
    c: Client,
) -> None:
    before = c.qok(StatFs())
    f = c.create(b"f")
    c.mkdir(b"d")
    made = c.qok(StatFs())
    assert (made.inodes, made.files, made.directories) == (
        before.inodes + 2,
        before.files + 1,
        before.directories + 1,
    )
    assert made.inodes_max - made.inodes == before.inodes_max - before.inodes - 2  # free
    c.write(f, 0, 2 * CS + 5)
    written = c.qok(StatFs())
    goal = c.attr(f).goal
    assert (written.chunks, written.chunk_bytes, written.replicated_bytes) == (
        3,
        2 * CS + 5,
        (2 * CS + 5) * goal,
    )
    c.ok(Unlink(ROOT, b"f"))
    held = c.qok(StatFs())  # still open: nothing is freed yet
    assert (held.inodes, held.files, held.open_unlinked, held.chunks) == (
        before.inodes + 2,
        before.files + 1,
        1,
        3,
    )
    c.ok(Release(f))
    gone = c.qok(StatFs())
    assert (gone.inodes, gone.files, gone.open_unlinked) == (before.inodes + 1, before.files, 0)
    assert (gone.chunks, gone.chunk_bytes, gone.replicated_bytes) == (0, 0, 0)
    assert gone.deletion_queue == 3


# ---------------------------------------------------------------- garbage


def test_unlink_of_the_last_link_queues_every_chunk(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 2 * CS)
    ids = sorted(chunk for _, chunk, _, _ in chunks_of(c, f))
    c.ok(Unlink(ROOT, b"f"))
    assert sorted(queue(c)) == [(i, 1) for i in ids]
    stats = c.qok(StatFs())
    assert (stats.chunks, stats.chunk_bytes, stats.deletion_queue) == (0, 0, 2)


def test_a_version_bump_queues_only_the_old_version(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 4)
    c.write(f, 0, 4)
    (chunk,) = [chunk for _, chunk, _, _ in chunks_of(c, f)]
    assert queue(c) == [(chunk, 1)]
    assert chunks_of(c, f)[0][2] == 2
    c.ok(Unlink(ROOT, b"f"))
    assert queue(c) == [(chunk, 2)]


def test_rename_over_a_file_queues_its_chunks(c: Client) -> None:
    f = c.mknod(b"f")
    c.mknod(b"g")
    c.write(f, 0, 4)
    c.ok(Rename(ROOT, b"g", ROOT, b"f"))
    assert len(queue(c)) == 1


def test_an_open_unlinked_file_keeps_its_chunks_until_the_last_release(c: Client) -> None:
    f = c.create(b"f")
    c.ok(Open(f))
    c.write(f, 0, 4)
    c.ok(Unlink(ROOT, b"f"))
    c.ok(Release(f))
    assert queue(c) == [] and chunks_of(c, f)[0][3] == 4
    c.ok(Release(f))
    assert len(queue(c)) == 1


def test_acknowledged_deletions_leave_the_queue(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 3 * CS)
    c.ok(Unlink(ROOT, b"f"))
    entries = queue(c)
    ack(c, entries[:2])
    assert queue(c) == entries[2:]


def test_an_ack_of_an_older_version_keeps_the_newer_entry(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 4)
    c.write(f, 0, 4)
    (chunk,) = [chunk for _, chunk, _, _ in chunks_of(c, f)]
    c.ok(Unlink(ROOT, b"f"))
    ack(c, [(chunk, 1)])
    assert queue(c) == [(chunk, 2)]
    ack(c, [(chunk, 2)])
    assert queue(c) == []


def test_the_deletion_queue_is_paged(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 5 * CS)
    c.ok(Unlink(ROOT, b"f"))
    page = c.qok(GetDeletions(2))
    assert len(page.entries) == 2 and page.total == 5
    assert c.qerr(GetDeletions(0)) == errno.EINVAL


# ---------------------------------------------------------------- opens


def test_release_without_an_open_is_ebadf(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(Release(f)) == errno.EBADF


def test_release_many_releases_one_open_per_listing_and_skips_what_is_not_held(
    c: Client,
) -> None:
    f, g, h = c.create(b"f"), c.create(b"g"), c.mknod(b"h")
    c.ok(Open(f))
    for name in (b"f", b"g", b"h"):
        c.ok(Unlink(ROOT, name))
    assert c.qok(StatFs()).open_unlinked == 2
    c.ok(ReleaseMany((f, h, g)))  # h was never opened: skipped
    assert c.qok(StatFs()).open_unlinked == 1 and c.attr(f).nlink == 0
    c.ok(ReleaseMany((f, f)))  # one open of f left: the second listing is skipped
    assert c.qok(StatFs()).open_unlinked == 0 and c.qok(StatFs()).files == 0
    assert c.err(ReleaseMany((f,) * (RELEASE_MANY_MAX + 1))) == errno.EINVAL


def test_opening_a_directory_is_eisdir(c: Client) -> None:
    assert c.err(Open(c.mkdir(b"d"))) == errno.EISDIR


def test_opens_are_counted_per_session(c: Client) -> None:
    f = c.create(b"f")
    other = Client(c.ns)
    other.ok(Open(f))
    c.ok(Unlink(ROOT, b"f"))
    c.ok(Release(f))
    assert other.attr(f).nlink == 0
    assert c.err(Release(f)) == errno.EBADF
    other.ok(Release(f))
    assert c.qok(StatFs()).files == 0


# ---------------------------------------------------------------- reading and scanning


def test_get_chunks_pages_from_an_index(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 6 * CS)
    page = c.qok(GetChunks(f, 2, 3))
    assert [i.index for i in page.chunks] == [2, 3, 4] and page.more
    last = c.qok(GetChunks(f, 5, 3))
    assert [i.index for i in last.chunks] == [5] and not last.more
    assert page.size == 6 * CS and page.chunk_size == CS


def test_get_chunks_of_a_directory_is_eisdir(c: Client) -> None:
    assert c.qerr(GetChunks(c.mkdir(b"d"))) == errno.EISDIR


def test_scan_visits_every_chunk_once_with_its_goal(c: Client) -> None:
    files = [c.mknod(b"f%d" % i) for i in range(5)]
    c.mkdir(b"empty")
    for i, f in enumerate(files):
        c.write(f, 0, (i + 1) * CS)
    c.ok(SetGoal(files[2], goal=5))
    seen = []
    cursor = (InodeId(0), 0)
    while True:
        page = c.qok(ScanChunks(cursor[0], cursor[1], 4))
        seen.extend(page.entries)
        if page.done:
            break
        cursor = (page.next_inode, page.next_index)
    assert len(seen) == 15 and len({e.chunk for e in seen}) == 15
    assert {e.goal for e in seen if e.inode == files[2]} == {5}
    assert {e.goal for e in seen if e.inode != files[2]} == {3}


def test_setgoal_changes_replicated_bytes(c: Client) -> None:
    f = c.mknod(b"f")
    c.write(f, 0, 10)
    assert c.qok(StatFs()).replicated_bytes == 30
    c.ok(SetGoal(f, goal=1))
    assert c.qok(StatFs()).replicated_bytes == 10
    assert c.err(SetGoal(f, goal=0)) == errno.EINVAL
    assert c.err(SetGoal(f, goal=17)) == errno.EINVAL


def test_goal_and_compression_are_inherited_from_the_parent(c: Client) -> None:
    d = c.mkdir(b"d")
    c.ok(SetGoal(d, goal=2, compress=True))
    sub = c.mkdir(b"sub", d)
    f = c.mknod(b"f", sub)
    attr = c.attr(f)
    assert (attr.goal, attr.compress) == (2, True)
    opened = c.ok(OpenChunk(f, 0))
    assert (opened.goal, opened.compress) == (2, True)
