"""Canonical serialisation of the namespace: snapshot, restore and digest.

The canonical form is a stream of msgpack objects in a fixed order (inodes ascending,
directory entries, xattrs, replies and opens sorted; the deletion queue in queue
order), so equal states give equal bytes on every replica.  The digest hashes those
bytes; the snapshot is the same bytes compressed with zstd.  Both are produced
piecewise, so a million-inode namespace never exists as one giant Python list.

Layout: header ``["paxfs-namespace", FORMAT]``, config, allocators, inode count, one
record per inode, deletion count and batches, session count, one record per session,
the dataserver-mode table (one record, rows by id; since format 2), the table of chunks
open for write (one record, ``[chunk, inode, index, opened_ns, recovering]`` rows by
chunk id; since format 3), ``"end"``.

Older formats still load: format 1 (before the dataserver-mode table) with an empty
table, so every dataserver starts normal; formats 1 and 2 (before the open-chunk table)
with no chunk open for write, as their paxfs knew none.  A data directory written by an
older paxfs keeps working.
"""

from __future__ import annotations

import dataclasses
import hashlib
import stat
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import zstandard

from wire import schema
from wire.cluster_admin_ops import DataserverMode
from wire.ids import DataserverId
from wire.invariant import InvariantViolation
from wire.namespace_ops import (
    DATASERVER_MODES_MAX,
    OPEN_CHUNKS_MAX,
    REPLY_TYPES,
    DataserverModeEntry,
)

from ._check import check_state
from ._nodes import DirNode, FileNode, Node, SpecialNode, SymlinkNode
from ._ops_cluster import valid_row
from ._state import NamespaceConfig, Session, State

MAGIC = "paxfs-namespace"
FORMAT = 3
FORMATS_LOADED = (1, 2, 3)
TRAILER = "end"
ZSTD_LEVEL = 3
PIECE_BYTES_MIN = 1 << 20
"""Packed records are gathered into pieces of about this size before hashing/compressing."""
RECORD_BYTES_MAX = 1 << 30
"""Largest single record (a directory with all its entries) a restore accepts."""
DELETION_BATCH = 4096
"""Deletion-queue entries per snapshot record."""


class SnapshotError(ValueError):
    """The bytes are not a namespace snapshot this code can load (says why)."""


# ---------------------------------------------------------------- writing


def _node_record(node: Node) -> list[Any]:
    xattrs = None if node.xattrs is None else sorted(node.xattrs.items())
    record: list[Any] = [
        node.ino,
        node.mode,
        node.uid,
        node.gid,
        node.nlink,
        node.atime_ns,
        node.mtime_ns,
        node.ctime_ns,
        node.goal,
        node.compress,
        xattrs,
    ]
    kind = type(node)
    if kind is FileNode:
        record.append(node.file_size)  # type: ignore[attr-defined]
        chunks = node.chunks  # type: ignore[attr-defined]
        record.append(None if chunks is None else chunks.tolist())
    elif kind is DirNode:
        record.append(node.parent.ino)  # type: ignore[attr-defined]
        record.append(
            sorted([name, child.ino] for name, child in node.entries.items())  # type: ignore[attr-defined]
        )
    elif kind is SymlinkNode:
        record.append(node.target)  # type: ignore[attr-defined]
    else:
        record.append(node.device)  # type: ignore[attr-defined]
    return record


def _session_record(session: Session) -> list[Any]:
    return [
        session.client,
        session.last_seen_ns,
        session.floor,
        [[seq, schema.encode_tagged(session.replies[seq])] for seq in sorted(session.replies)],
        sorted([ino, count] for ino, count in session.opens.items()),
    ]


def canonical_pieces(state: State) -> Iterator[bytes]:
    """The canonical bytes of ``state``, in pieces of about PIECE_BYTES_MIN."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    buffer: list[bytes] = []
    size = 0

    def emit(value: Any) -> bytes | None:
        nonlocal size
        packed = packer.pack(value)
        buffer.append(packed)
        size += len(packed)
        if size < PIECE_BYTES_MIN:
            return None
        piece = b"".join(buffer)
        buffer.clear()
        size = 0
        return piece

    def records() -> Iterator[Any]:
        yield [MAGIC, FORMAT]
        yield list(dataclasses.astuple(state.config))
        yield [state.next_ino, state.next_chunk, state.next_client]
        yield len(state.inodes)
        for node in state.inodes.values():
            yield _node_record(node)
        yield len(state.deletions)
        batch: list[list[int]] = []
        for chunk, version in state.deletions.items():
            batch.append([chunk, version])
            if len(batch) == DELETION_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch
        yield len(state.sessions)
        for client in sorted(state.sessions):
            yield _session_record(state.sessions[client])
        modes = state.dataserver_modes
        yield [[ds, int(row.mode), row.since_ns, row.address] for ds, row in sorted(modes.items())]
        yield [[chunk, *opened] for chunk, opened in sorted(state.open_chunks.items())]
        yield TRAILER

    for record in records():
        piece = emit(record)
        if piece is not None:
            yield piece
    if buffer:
        yield b"".join(buffer)


def snapshot(state: State) -> bytes:
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    parts = [compressor.compress(piece) for piece in canonical_pieces(state)]
    parts.append(compressor.flush())
    return b"".join(parts)


def digest(state: State) -> bytes:
    hasher = hashlib.blake2b(digest_size=32)
    for piece in canonical_pieces(state):
        hasher.update(piece)
    return hasher.digest()


# ---------------------------------------------------------------- reading


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise SnapshotError(f"corrupt snapshot: {what}")


def _is_int(value: Any) -> bool:
    return type(value) is int


def restore(data: bytes) -> State:
    """Rebuild the state from :func:`snapshot` bytes; :class:`SnapshotError` if they are
    not a complete, consistent snapshot of a known format."""
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=RECORD_BYTES_MAX)

    def read() -> Any:
        while True:
            try:
                return unpacker.unpack()
            except msgpack.OutOfData:
                piece = reader.read(PIECE_BYTES_MIN)
                if not piece:
                    raise SnapshotError("truncated snapshot") from None
                unpacker.feed(piece)

    try:
        state = _load(read)
        _expect(reader.read(1) == b"", "data after the trailer")
        check_state(state)
    except InvariantViolation as error:
        raise SnapshotError(f"inconsistent snapshot: {error}") from None
    except zstandard.ZstdError as error:
        raise SnapshotError(f"snapshot is not valid zstd data: {error}") from None
    except msgpack.BufferFull:
        raise SnapshotError(f"a snapshot record exceeds {RECORD_BYTES_MAX} bytes") from None
    except SnapshotError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as error:
        raise SnapshotError(f"corrupt snapshot: {type(error).__name__}: {error}") from None
    return state


def _load(read: Callable[[], Any]) -> State:
    header = read()
    _expect(isinstance(header, list) and len(header) == 2 and header[0] == MAGIC, "no header")
    snapshot_format = header[1]
    if snapshot_format not in FORMATS_LOADED:
        raise SnapshotError(
            f"snapshot format {snapshot_format!r} is not one of {FORMATS_LOADED} (newer paxfs?)"
        )
    config_fields = read()
    _expect(isinstance(config_fields, list), "config")
    state = State(NamespaceConfig(*config_fields))
    allocators = read()
    _expect(
        isinstance(allocators, list) and len(allocators) == 3 and all(map(_is_int, allocators)),
        "allocators",
    )
    state.next_ino, state.next_chunk, state.next_client = allocators
    count = read()
    _expect(_is_int(count) and count >= 1, "inode count")
    directories: list[tuple[DirNode, int, list[Any]]] = []
    for _ in range(count):
        node, links = _load_node(read())
        _expect(node.ino not in state.inodes, f"inode {node.ino} twice")
        _expect(not state.inodes or node.ino > state.ino_order[-1], "inodes out of order")
        state.register(node)
        if links is not None:
            assert isinstance(node, DirNode)
            directories.append((node, links[0], links[1]))
    for directory, parent, entries in directories:
        parent_node = state.inodes.get(parent)
        _expect(type(parent_node) is DirNode, f"parent of {directory.ino}")
        assert isinstance(parent_node, DirNode)
        directory.parent = parent_node
        for name, ino in entries:
            _expect(type(name) is bytes and ino in state.inodes, f"entry in {directory.ino}")
            directory.entries[name] = state.inodes[ino]
    queued = read()
    _expect(_is_int(queued) and queued >= 0, "deletion count")
    while len(state.deletions) < queued:
        batch = read()
        _expect(isinstance(batch, list) and 0 < len(batch) <= DELETION_BATCH, "queue batch")
        for chunk, version in batch:
            _expect(_is_int(chunk) and _is_int(version), "queue entry")
            _expect(chunk not in state.deletions, f"chunk {chunk} queued twice")
            state.deletions[chunk] = version
    _expect(len(state.deletions) == queued, "deletion count")
    sessions = read()
    _expect(_is_int(sessions), "session count")
    for _ in range(sessions):
        _load_session(state, read())
    if snapshot_format >= 2:
        _load_dataserver_modes(state, read())
    if snapshot_format >= 3:
        _load_open_chunks(state, read())
    _expect(read() == TRAILER, "missing trailer (truncated?)")
    _recount(state)
    return state


def _load_node(record: Any) -> tuple[Node, list[Any] | None]:
    if type(record) is not list or len(record) < 12:
        raise SnapshotError("corrupt snapshot: inode record")
    ino, mode, uid, gid, nlink, atime, mtime, ctime, goal, compress, xattrs = record[:11]
    if (
        type(ino) is not int
        or type(mode) is not int
        or type(uid) is not int
        or type(gid) is not int
        or type(nlink) is not int
        or type(atime) is not int
        or type(mtime) is not int
        or type(ctime) is not int
        or type(goal) is not int
        or type(compress) is not bool
    ):
        raise SnapshotError(f"corrupt snapshot: fields of inode {ino!r}")
    extra = record[11:]
    kind = stat.S_IFMT(mode)
    node: Node
    links = None
    if kind == stat.S_IFREG:
        _expect(len(extra) == 2 and _is_int(extra[0]), f"file {ino}")
        file_node = FileNode(ino, mode, uid, gid, atime, goal, compress)
        file_node.file_size = extra[0]
        if extra[1] is not None:
            _expect(type(extra[1]) is list, f"chunks of {ino}")
            file_node.chunks = array("q", extra[1])  # refuses anything but int64 values
        node = file_node
    elif kind == stat.S_IFDIR:
        _expect(len(extra) == 2 and _is_int(extra[0]) and type(extra[1]) is list, "directory")
        node = DirNode(ino, mode, uid, gid, atime, goal, compress, None)
        links = extra
    elif kind == stat.S_IFLNK:
        _expect(len(extra) == 1 and type(extra[0]) is bytes, f"symlink {ino}")
        node = SymlinkNode(ino, uid, gid, atime, goal, compress, extra[0])
    else:
        _expect(len(extra) == 1 and _is_int(extra[0]), f"special {ino}")
        node = SpecialNode(ino, mode, uid, gid, atime, goal, compress, extra[0])
    node.nlink = nlink
    node.mtime_ns = mtime
    node.ctime_ns = ctime
    if xattrs is not None:
        _expect(
            type(xattrs) is list
            and all(type(name) is bytes and type(value) is bytes for name, value in xattrs),
            f"xattrs of {ino}",
        )
        node.xattrs = dict(xattrs)
    return node, links


def _load_session(state: State, record: Any) -> None:
    _expect(isinstance(record, list) and len(record) == 5, "session record")
    client, last_seen, floor, replies, opens = record
    _expect(all(map(_is_int, (client, last_seen, floor))), "session fields")
    session = Session(client, last_seen)
    session.floor = floor
    for seq, reply in replies:
        _expect(_is_int(seq), "reply seq")
        session.replies[seq] = schema.decode_tagged(reply, REPLY_TYPES)
    for ino, count in opens:
        _expect(_is_int(ino) and _is_int(count) and ino in state.inodes, "open record")
        session.opens[ino] = count
        session.open_total += count
        state.open_counts[ino] = state.open_counts.get(ino, 0) + count
    _expect(client not in state.sessions, f"session {client} twice")
    state.sessions[client] = session


def _load_dataserver_modes(state: State, rows: Any) -> None:
    _expect(type(rows) is list and len(rows) <= DATASERVER_MODES_MAX, "dataserver-mode table")
    for row in rows:
        _expect(type(row) is list and len(row) == 4, "dataserver-mode row")
        ds, mode, since_ns, address = row
        _expect(valid_row(ds, mode, since_ns, address), f"dataserver-mode row {ds!r}")
        _expect(ds not in state.dataserver_modes, f"dataserver {ds} has two mode rows")
        state.dataserver_modes[ds] = DataserverModeEntry(
            DataserverId(ds), DataserverMode(mode), since_ns, address
        )


def _load_open_chunks(state: State, rows: Any) -> None:
    _expect(type(rows) is list and len(rows) <= OPEN_CHUNKS_MAX, "open-chunk table")
    for row in rows:
        _expect(type(row) is list and len(row) == 5 and all(map(_is_int, row)), "open-chunk row")
        chunk, ino, index, opened_ns, recovering = row
        _expect(chunk not in state.open_chunks, f"chunk {chunk} open twice")
        state.open_chunks[chunk] = (ino, index, opened_ns, recovering)


def _recount(state: State) -> None:
    """Derive the counters that are not stored."""
    for node in state.inodes.values():
        if type(node) is FileNode:
            state.chunk_count += node.chunk_count()
            stored = node.stored_bytes()
            state.chunk_bytes += stored
            state.replicated_bytes += stored * node.goal
        if node.nlink == 0 and type(node) is not DirNode:
            state.open_unlinked += 1
