"""Ops on file data and its life cycle: opens, chunk writes, chunk lists, garbage.

A chunk is referenced by exactly one file at one index.  It leaves the file (and goes
to the deletion queue with its last version) when the file is freed or truncated below
it; a version bump queues only the old version.  So the queue never names a replica
that is still current, and no chunk leaves a file without entering the queue.

A chunk's current version is *open* (``State.open_chunks``, with the open's time) from
the OpenChunk that made it until a CommitWrite names it, a newer OpenChunk replaces it,
the chunk leaves its file, or the leader recovers it (RecoverChunk): the cluster manager
copies only versions that are not open, and recovers those left open too long.
"""

from __future__ import annotations

import errno
from bisect import bisect_left

from wire.ids import ChunkId, ChunkVersion, InodeId
from wire.invariant import invariant
from wire.namespace_ops import (
    CHUNK_PAGE_MAX,
    COMMIT_CHUNKS_MAX,
    OPEN_CHUNKS_MAX,
    OPEN_FILES_PER_SESSION_MAX,
    RELEASE_MANY_MAX,
    AttrReply,
    ChunkGoal,
    ChunkInfo,
    ChunkListReply,
    ChunkReply,
    ChunkScanReply,
    CommitRecovery,
    CommitWrite,
    DeletionsReply,
    GetChunks,
    GetDeletions,
    OkReply,
    Open,
    OpenChunk,
    RecoverChunk,
    Release,
    ReleaseMany,
    ScanChunks,
)

from ._nodes import CHUNK_FIELDS, DirNode, FileNode
from ._perms import privileges_to_drop
from ._state import INT64_MAX, INT64_MIN, Context, OpError, State

OK = OkReply()
SCAN_INODES_MAX = 16 * CHUNK_PAGE_MAX
"""Inodes one ScanChunks call may step over, so that a page costs bounded work even in a
namespace of empty files."""


def open_op(state: State, ctx: Context, op: Open) -> AttrReply:
    session = ctx.session
    assert session is not None  # only client commands reach open
    node = state.node(op.inode)
    if type(node) is DirNode:
        raise OpError(errno.EISDIR)
    if session.open_total >= OPEN_FILES_PER_SESSION_MAX:
        raise OpError(errno.EMFILE)
    state.add_open(session, node)
    return AttrReply(node.attr())


def release(state: State, ctx: Context, op: Release) -> OkReply:
    session = ctx.session
    assert session is not None  # only client commands reach release
    if op.inode not in session.opens:
        raise OpError(errno.EBADF)
    state.release_open(session, op.inode, 1)
    return OK


def release_many(state: State, ctx: Context, op: ReleaseMany) -> OkReply:
    session = ctx.session
    assert session is not None  # only client commands reach release
    if len(op.inodes) > RELEASE_MANY_MAX:
        raise OpError(errno.EINVAL)
    for inode in op.inodes:
        if inode in session.opens:
            state.release_open(session, inode, 1)
    return OK


def open_chunk(state: State, ctx: Context, op: OpenChunk) -> ChunkReply:
    node = state.regular_file(op.inode)
    index = op.index
    if index < 0:
        raise OpError(errno.EINVAL)
    if index * state.chunk_size >= state.config.max_file_size_bytes:
        raise OpError(errno.EFBIG)
    position = node.chunk_position(index)
    chunks = node.chunks
    offset = position * CHUNK_FIELDS
    exists = chunks is not None and offset < len(chunks) and chunks[offset] == index
    open_chunks = state.open_chunks
    if len(open_chunks) >= OPEN_CHUNKS_MAX and not (
        exists and chunks is not None and chunks[offset + 1] in open_chunks
    ):
        raise OpError(errno.ENFILE)
    if exists:
        assert chunks is not None
        chunk, version = chunks[offset + 1], chunks[offset + 2]
        state.queue_deletion(chunk, version)
        version += 1
        chunks[offset + 2] = version
        length = chunks[offset + 3]
    else:
        chunk, version = state.new_chunk(node, position, index)
        length = 0
    open_chunks[chunk] = (node.ino, index, ctx.now_ns, 0)
    return ChunkReply(ChunkId(chunk), ChunkVersion(version), length, node.goal, node.compress)


def commit_write(state: State, ctx: Context, op: CommitWrite) -> AttrReply:
    node = state.regular_file(op.inode)
    writes = op.writes
    if len(writes) > COMMIT_CHUNKS_MAX:
        raise OpError(errno.EINVAL)
    if op.mtime_ns is not None and not INT64_MIN <= op.mtime_ns <= INT64_MAX:
        raise OpError(errno.EINVAL)
    chunk_size = state.chunk_size
    seen: set[int] = set()
    for write in writes:
        if write.index < 0 or write.index in seen or not 0 <= write.end <= chunk_size:
            raise OpError(errno.EINVAL)
        seen.add(write.index)
    size = node.file_size
    grown: list[tuple[int, int]] = []
    chunks = node.chunks
    for write in writes:
        offset = node.chunk_position(write.index) * CHUNK_FIELDS
        if (
            chunks is None
            or offset >= len(chunks)
            or chunks[offset] != write.index
            or chunks[offset + 1] != write.chunk
            or chunks[offset + 2] != write.version
        ):
            raise OpError(errno.ESTALE)
        end = write.index * chunk_size + write.end
        if end > state.config.max_file_size_bytes:
            raise OpError(errno.EFBIG)
        size = max(size, end)
        if write.end > chunks[offset + 3]:
            grown.append((offset, write.end))
    for offset, length in grown:
        state.set_chunk_length(node, offset, length)
    open_chunks = state.open_chunks
    for write in writes:
        open_chunks.pop(write.chunk, None)
    node.file_size = size
    node.mode &= ~privileges_to_drop(ctx.cred, node)
    node.mtime_ns = ctx.now_ns if op.mtime_ns is None else op.mtime_ns
    node.ctime_ns = ctx.now_ns
    return AttrReply(node.attr())


def recover_chunk(state: State, now_ns: int, op: RecoverChunk) -> OkReply:
    """Move an open version to a recovering one as :class:`RecoverChunk` says."""
    opened = state.open_chunks.get(op.chunk)
    if opened is None or opened[2] != op.opened_ns:
        raise OpError(errno.ESTALE)
    ino, index, _, _ = opened
    node = state.inodes.get(ino)
    invariant(type(node) is FileNode, f"open chunk {op.chunk} of a freed inode {ino}")
    assert isinstance(node, FileNode)
    offset = node.chunk_offset(index, op.chunk)
    invariant(offset is not None, f"open chunk {op.chunk} is not at index {index} of inode {ino}")
    assert offset is not None and node.chunks is not None
    chunks = node.chunks
    if chunks[offset + 2] != op.version:
        raise OpError(errno.ESTALE)
    state.queue_deletion(op.chunk, op.version)
    chunks[offset + 2] = op.version + 1
    state.open_chunks[op.chunk] = (ino, index, now_ns, 1)
    return OK


def commit_recovery(state: State, op: CommitRecovery) -> OkReply:
    """Close a recovering version as :class:`CommitRecovery` says."""
    opened = state.open_chunks.get(op.chunk)
    if opened is None or opened[2:] != (op.opened_ns, 1):
        raise OpError(errno.ESTALE)
    node = state.inodes[opened[0]]
    assert isinstance(node, FileNode) and node.chunks is not None
    offset = node.chunk_position(opened[1]) * CHUNK_FIELDS
    if node.chunks[offset + 2] != op.version:
        raise OpError(errno.ESTALE)
    del state.open_chunks[op.chunk]
    return OK


def get_chunks(state: State, ctx: Context, op: GetChunks) -> ChunkListReply:
    node = state.regular_file(op.inode)
    if op.first_index < 0 or op.limit < 1:
        raise OpError(errno.EINVAL)
    count = node.chunk_count()
    start = node.chunk_position(op.first_index)
    stop = min(count, start + min(op.limit, CHUNK_PAGE_MAX))
    chunks = node.chunks
    infos: tuple[ChunkInfo, ...] = ()
    if chunks is not None:
        infos = tuple(
            ChunkInfo(
                chunks[offset],
                ChunkId(chunks[offset + 1]),
                ChunkVersion(chunks[offset + 2]),
                chunks[offset + 3],
            )
            for offset in range(start * CHUNK_FIELDS, stop * CHUNK_FIELDS, CHUNK_FIELDS)
        )
    return ChunkListReply(node.file_size, state.chunk_size, infos, stop < count)


def get_deletions(state: State, ctx: Context, op: GetDeletions) -> DeletionsReply:
    if op.limit < 1:
        raise OpError(errno.EINVAL)
    limit = min(op.limit, CHUNK_PAGE_MAX)
    return DeletionsReply(state.deletion_entries(limit), len(state.deletions))


def scan_chunks(state: State, ctx: Context, op: ScanChunks) -> ChunkScanReply:
    if op.inode < 0 or op.index < 0 or op.limit < 1:
        raise OpError(errno.EINVAL)
    limit = min(op.limit, CHUNK_PAGE_MAX)
    order = state.ino_order
    inodes = state.inodes
    entries: list[ChunkGoal] = []
    position = bisect_left(order, op.inode)
    stop = min(len(order), position + SCAN_INODES_MAX)
    while position < stop:
        ino = order[position]
        node = inodes.get(ino)
        if type(node) is FileNode and node.chunks is not None:
            chunks = node.chunks
            first = node.chunk_position(op.index) if ino == op.inode else 0
            for offset in range(first * CHUNK_FIELDS, len(chunks), CHUNK_FIELDS):
                if len(entries) >= limit:
                    return ChunkScanReply(tuple(entries), InodeId(ino), chunks[offset], False)
                entries.append(
                    ChunkGoal(
                        InodeId(ino),
                        chunks[offset],
                        ChunkId(chunks[offset + 1]),
                        ChunkVersion(chunks[offset + 2]),
                        chunks[offset + 3],
                        node.goal,
                        node.compress,
                        *_open_state(state, chunks[offset + 1]),
                    )
                )
        position += 1
    if position < len(order):
        return ChunkScanReply(tuple(entries), InodeId(order[position]), 0, False)
    return ChunkScanReply(tuple(entries), InodeId(state.next_ino), 0, True)


def _open_state(state: State, chunk: int) -> tuple[int | None, bool]:
    """(opened_ns, recovering) of a chunk for :class:`ChunkGoal`."""
    opened = state.open_chunks.get(chunk)
    return (None, False) if opened is None else (opened[2], opened[3] == 1)
