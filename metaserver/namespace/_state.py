"""The tables of the namespace and the bookkeeping every op shares.

Rules of this file (and of every op module):

1. Pure: no I/O, no clock, no randomness.  Time arrives in the command; ids come from
   counters held here, so every replica allocates the same ids.
2. An op first checks everything (raising :class:`OpError` with an errno) and only then
   mutates: a failed op changes nothing.
3. No behaviour may depend on the iteration order of a dict unless that order is part
   of the state (the deletion queue) or is sorted first: replicas rebuilt from a
   snapshot hold the same dicts in a different order.
4. Counters (files, chunks, bytes…) are updated with every change so statfs is O(1);
   :meth:`State.check` recomputes them from scratch.
"""

from __future__ import annotations

import errno
from array import array
from dataclasses import dataclass

from wire.ids import ROOT_INODE, ChunkId, ChunkVersion
from wire.invariant import invariant
from wire.namespace_ops import GOAL_MAX, Credentials, DataserverModeEntry, DeletedChunk, Reply

from ._nodes import CHUNK_FIELDS, DirNode, FileNode, Node

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
ID_MAX = (1 << 32) - 2
"""Largest uid or gid (2**32 - 1 is the "no change" value of chown(2))."""
INO_ORDER_SLACK_MIN = 1024
"""Dead entries tolerated in the scan order before it is compacted."""


class OpError(Exception):
    """An op failed with ``code`` (a POSIX errno); raised before any mutation."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class NamespaceConfig:
    """Fixed when the namespace is created; part of every snapshot.

    ``created_ns`` stamps the root directory so that every replica starts identical.
    """

    chunk_size_bytes: int = 64 << 20
    max_file_size_bytes: int = 1 << 60
    inodes_max: int = 1 << 40
    session_timeout_ns: int = 60_000_000_000
    default_goal: int = 3
    default_compress: bool = False
    root_mode: int = 0o755
    root_uid: int = 0
    root_gid: int = 0
    created_ns: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size_bytes <= 1 << 40:
            raise ValueError(f"chunk_size_bytes {self.chunk_size_bytes} not in 1..2**40")
        if not self.chunk_size_bytes <= self.max_file_size_bytes <= INT64_MAX:
            raise ValueError("max_file_size_bytes must be in chunk_size_bytes..2**63-1")
        if not 1 <= self.inodes_max <= INT64_MAX:
            raise ValueError("inodes_max must be positive")
        if not 0 < self.session_timeout_ns <= INT64_MAX:
            raise ValueError("session_timeout_ns must be positive")
        if not 1 <= self.default_goal <= GOAL_MAX:
            raise ValueError(f"default_goal must be 1..{GOAL_MAX}")
        if self.root_mode & ~0o7777:
            raise ValueError("root_mode takes permission bits only")
        if not (0 <= self.root_uid <= ID_MAX and 0 <= self.root_gid <= ID_MAX):
            raise ValueError("root_uid/root_gid out of range")
        if not INT64_MIN <= self.created_ns <= INT64_MAX:
            raise ValueError("created_ns out of range")


class Session:
    """One client's session: liveness, retained replies and open files.

    ``replies`` holds the reply of every applied request with ``seq >= floor``; the
    client contract (``RequestContext``) bounds it by ``REPLY_WINDOW``.
    """

    __slots__ = ("client", "last_seen_ns", "floor", "replies", "opens", "open_total")

    def __init__(self, client: int, last_seen_ns: int) -> None:
        self.client = client
        self.last_seen_ns = last_seen_ns
        self.floor = 0
        self.replies: dict[int, Reply] = {}
        self.opens: dict[int, int] = {}
        self.open_total = 0


class Context:
    """Who runs the current op, when, and in which session (``None`` for queries)."""

    __slots__ = ("now_ns", "cred", "session")

    def __init__(self, now_ns: int, cred: Credentials, session: Session | None) -> None:
        self.now_ns = now_ns
        self.cred = cred
        self.session = session


class State:
    """Every table of the namespace.  Ops are functions over it (see ``_ops_*``)."""

    def __init__(self, config: NamespaceConfig) -> None:
        self.config = config
        self.chunk_size = config.chunk_size_bytes
        self.inodes: dict[int, Node] = {}
        # Live inode numbers in ascending order, plus dead ones not yet compacted out:
        # lets a chunk scan resume from any inode number in O(log n).
        self.ino_order: array[int] = array("q")
        self.ino_order_dead = 0
        self.next_ino: int = ROOT_INODE
        self.next_chunk = 1
        self.next_client = 1
        self.deletions: dict[int, int] = {}
        # Chunk id -> (inode, index, opened_ns, recovering) of each chunk whose current
        # version is open for write (by a client, or recovering by the leader: 1): opened
        # and not committed or dropped since.
        self.open_chunks: dict[int, tuple[int, int, int, int]] = {}
        self.open_counts: dict[int, int] = {}
        self.sessions: dict[int, Session] = {}
        self.dataserver_modes: dict[int, DataserverModeEntry] = {}
        self.files = 0
        self.directories = 0
        self.chunk_count = 0
        self.chunk_bytes = 0
        self.replicated_bytes = 0
        self.open_unlinked = 0

    # ------------------------------------------------------------ lookups

    def node(self, ino: int) -> Node:
        found = self.inodes.get(ino)
        if found is None:
            raise OpError(errno.ENOENT)
        return found

    def directory(self, ino: int) -> DirNode:
        found = self.inodes.get(ino)
        if found is None:
            raise OpError(errno.ENOENT)
        if type(found) is not DirNode:
            raise OpError(errno.ENOTDIR)
        return found

    def regular_file(self, ino: int) -> FileNode:
        found = self.inodes.get(ino)
        if found is None:
            raise OpError(errno.ENOENT)
        if type(found) is not FileNode:
            raise OpError(errno.EISDIR if type(found) is DirNode else errno.EINVAL)
        return found

    # ------------------------------------------------------------ inode life

    def reserve_ino(self) -> int:
        """The next inode number; ENOSPC at the configured inode limit.

        Numbers only grow: ``next_ino`` is part of every snapshot, never recomputed from
        the live inodes, so a freed number is never given out again.  That is why every
        inode reports the same generation (``INODE_GENERATION``, see ``make_attr``): a FUSE
        kernel that still holds a freed number until its FORGET can never meet a new inode
        under it.  Reusing numbers would need a per-inode generation in the state.
        """
        if len(self.inodes) >= self.config.inodes_max:
            raise OpError(errno.ENOSPC)
        ino = self.next_ino
        self.next_ino = ino + 1
        return ino

    def register(self, node: Node) -> None:
        """Make a new node live (its number came from :meth:`reserve_ino`)."""
        self.inodes[node.ino] = node
        self.ino_order.append(node.ino)
        kind = type(node)
        if kind is FileNode:
            self.files += 1
        elif kind is DirNode:
            self.directories += 1

    def drop_link(self, node: Node) -> None:
        """One name of a non-directory is gone: free it once unnamed and unopened."""
        node.nlink -= 1
        if node.nlink == 0:
            if node.ino in self.open_counts:
                self.open_unlinked += 1
            else:
                self.free(node)

    def free(self, node: Node) -> None:
        """Forget an inode; its chunks go to the deletion queue."""
        kind = type(node)
        invariant(node.nlink == 0 or kind is DirNode, "freeing a linked inode")
        invariant(node.ino not in self.open_counts, "freeing an open inode")
        del self.inodes[node.ino]
        if kind is FileNode:
            self.files -= 1
            self.drop_chunks(node, 0)  # type: ignore[arg-type]
        elif kind is DirNode:
            self.directories -= 1
        self.ino_order_dead += 1
        if self.ino_order_dead > max(INO_ORDER_SLACK_MIN, len(self.inodes)):
            # Dict order is allocation order, i.e. ascending inode numbers.
            self.ino_order = array("q", self.inodes)
            self.ino_order_dead = 0

    # ------------------------------------------------------------ chunks

    def queue_deletion(self, chunk: int, version: int) -> None:
        queued = self.deletions.get(chunk)
        if queued is None or queued < version:
            self.deletions[chunk] = version

    def drop_chunks(self, node: FileNode, position: int) -> None:
        """Drop the chunks of ``node`` from ``position`` (in chunks) on into the queue."""
        chunks = node.chunks
        if chunks is None:
            return
        start = position * CHUNK_FIELDS
        dropped_bytes = 0
        open_chunks = self.open_chunks
        for offset in range(start, len(chunks), CHUNK_FIELDS):
            self.queue_deletion(chunks[offset + 1], chunks[offset + 2])
            dropped_bytes += chunks[offset + 3]
            if open_chunks:
                open_chunks.pop(chunks[offset + 1], None)
        self.chunk_count -= (len(chunks) - start) // CHUNK_FIELDS
        self.chunk_bytes -= dropped_bytes
        self.replicated_bytes -= dropped_bytes * node.goal
        if start == 0:
            node.chunks = None
        else:
            del chunks[start:]

    def set_chunk_length(self, node: FileNode, offset: int, length: int) -> None:
        """Change the length of the chunk at int ``offset`` of ``node.chunks``."""
        chunks = node.chunks
        invariant(chunks is not None, "set_chunk_length on a file without chunks")
        assert chunks is not None
        delta = length - chunks[offset + 3]
        chunks[offset + 3] = length
        self.chunk_bytes += delta
        self.replicated_bytes += delta * node.goal

    def new_chunk(self, node: FileNode, position: int, index: int) -> tuple[int, int]:
        """Insert a fresh chunk (version 1, length 0) at ``index``; return (id, version)."""
        chunk = self.next_chunk
        self.next_chunk = chunk + 1
        record = array("q", (index, chunk, 1, 0))
        if node.chunks is None:
            node.chunks = record
        else:
            at = position * CHUNK_FIELDS
            node.chunks[at:at] = record
        self.chunk_count += 1
        return chunk, 1

    def deletion_entries(self, limit: int) -> tuple[DeletedChunk, ...]:
        entries: list[DeletedChunk] = []
        for chunk, version in self.deletions.items():
            if len(entries) >= limit:
                break
            entries.append(DeletedChunk(ChunkId(chunk), ChunkVersion(version)))
        return tuple(entries)

    # ------------------------------------------------------------ opens

    def add_open(self, session: Session, node: Node) -> None:
        ino = node.ino
        session.opens[ino] = session.opens.get(ino, 0) + 1
        session.open_total += 1
        self.open_counts[ino] = self.open_counts.get(ino, 0) + 1

    def release_open(self, session: Session, ino: int, count: int) -> None:
        """Release ``count`` opens of ``ino`` held by ``session``."""
        held = session.opens[ino]
        invariant(0 < count <= held, "releasing more opens than the session holds")
        if held == count:
            del session.opens[ino]
        else:
            session.opens[ino] = held - count
        session.open_total -= count
        total = self.open_counts[ino] - count
        if total:
            self.open_counts[ino] = total
            return
        del self.open_counts[ino]
        node = self.inodes[ino]
        if node.nlink == 0:
            self.open_unlinked -= 1
            self.free(node)

    def end_session(self, session: Session) -> None:
        """Close ``session``: release its opens in inode order (deterministic)."""
        for ino in sorted(session.opens):
            self.release_open(session, ino, session.opens[ino])
        del self.sessions[session.client]
