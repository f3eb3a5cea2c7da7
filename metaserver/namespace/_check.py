"""A full consistency check of the namespace: every derived fact recomputed from scratch.

O(size of the namespace): tests run it after every step, :func:`restore` after loading
a snapshot.  Any failure raises :class:`~wire.invariant.InvariantViolation`.  Checks
inside per-inode loops test first and format their message only on failure.
"""

from __future__ import annotations

import stat
from collections import Counter

from wire.ids import ROOT_INODE
from wire.invariant import InvariantViolation, invariant
from wire.namespace_ops import (
    LINK_MAX,
    NAME_MAX_BYTES,
    OPEN_CHUNKS_MAX,
    OPEN_FILES_PER_SESSION_MAX,
    REPLY_WINDOW,
    SESSIONS_MAX,
    XATTR_INODE_MAX_BYTES,
    XATTR_LIST_MAX_BYTES,
)

from ._cookies import cookie_of
from ._nodes import CHUNK_FIELDS, DirNode, FileNode, Node, SpecialNode, SymlinkNode
from ._ops_cluster import check_dataserver_modes
from ._state import State

TYPE_OF_CLASS = {
    FileNode: (stat.S_IFREG,),
    DirNode: (stat.S_IFDIR,),
    SymlinkNode: (stat.S_IFLNK,),
    SpecialNode: (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK),
}
DOTS = (b".", b"..")


def check_state(state: State) -> None:
    inodes = state.inodes
    root = inodes.get(ROOT_INODE)
    invariant(type(root) is DirNode, "no root directory")
    assert isinstance(root, DirNode)
    invariant(root.parent is root, "the root's parent is not itself")
    names: Counter[int] = Counter()
    for ino, node in inodes.items():
        _check_node(state, ino, node)
        if type(node) is DirNode:
            _check_directory(state, node, names)
    _check_links(state, names)
    _check_tree_is_rooted(state)
    _check_chunks(state)
    _check_sessions(state)
    check_dataserver_modes(state)
    order = state.ino_order
    invariant(
        all(order[i] < order[i + 1] for i in range(len(order) - 1)),
        "scan order is not strictly ascending",
    )
    invariant(set(inodes) <= set(order), "a live inode is missing from the scan order")
    invariant(list(inodes) == sorted(inodes), "inode table is not in allocation order")


def _check_node(state: State, ino: int, node: Node) -> None:
    if node.ino != ino or not 0 < ino < state.next_ino:
        raise InvariantViolation(f"inode {node.ino} filed under {ino} (next {state.next_ino})")
    if stat.S_IFMT(node.mode) not in TYPE_OF_CLASS[type(node)] or node.goal < 1:
        raise InvariantViolation(f"inode {ino}: mode {node.mode:o} or goal {node.goal}")
    xattrs = node.xattrs
    if xattrs is not None and (
        not xattrs
        or sum(len(name) + 1 for name in xattrs) > XATTR_LIST_MAX_BYTES
        or sum(len(name) + len(value) for name, value in xattrs.items()) > XATTR_INODE_MAX_BYTES
    ):
        raise InvariantViolation(f"inode {ino}: xattrs empty or over their limits")


def _check_directory(state: State, directory: DirNode, names: Counter[int]) -> None:
    subdirectories = 0
    inodes = state.inodes
    for name, child in directory.entries.items():
        if (
            not 0 < len(name) <= NAME_MAX_BYTES
            or b"/" in name
            or b"\0" in name
            or name in DOTS
            or inodes.get(child.ino) is not child
        ):
            raise InvariantViolation(f"bad entry {name!r} in directory {directory.ino}")
        names[child.ino] += 1
        if type(child) is DirNode:
            subdirectories += 1
            if child.parent is not directory:
                raise InvariantViolation(f"directory {child.ino} has a wrong parent")
    if directory.nlink != 2 + subdirectories:
        raise InvariantViolation(
            f"directory {directory.ino}: nlink {directory.nlink}, {subdirectories} subdirs"
        )
    if directory.cookies is not None:
        expected = sorted((cookie_of(name), name) for name in directory.entries)
        invariant(directory.cookies.pairs() == expected, "stale readdir cookie index")


def _check_links(state: State, names: Counter[int]) -> None:
    unlinked_open = files = directories = 0
    for ino, node in state.inodes.items():
        kind = type(node)
        if kind is DirNode:
            directories += 1
            if names[ino] != (0 if ino == ROOT_INODE else 1):
                raise InvariantViolation(f"directory {ino} has {names[ino]} names")
            continue
        files += kind is FileNode
        if node.nlink != names[ino] or node.nlink > LINK_MAX:
            raise InvariantViolation(f"inode {ino}: nlink {node.nlink}, {names[ino]} names")
        if node.nlink == 0:
            if ino not in state.open_counts:
                raise InvariantViolation(f"inode {ino}: unlinked, unopened, not freed")
            unlinked_open += 1
    invariant(unlinked_open == state.open_unlinked, "open_unlinked counter is off")
    invariant((files, directories) == (state.files, state.directories), "type counters off")


def _check_tree_is_rooted(state: State) -> None:
    """Every directory reaches the root through its parents (no detached cycle)."""
    rooted: set[int] = {ROOT_INODE}
    for node in state.inodes.values():
        if type(node) is not DirNode:
            continue
        path: list[int] = []
        while node.ino not in rooted:
            path.append(node.ino)
            invariant(len(path) <= len(state.inodes), "a directory cycle is cut off the root")
            node = node.parent
        rooted.update(path)


def _check_chunks(state: State) -> None:
    chunk_size = state.chunk_size
    current: dict[int, int] = {}
    count = stored = replicated = 0
    for node in state.inodes.values():
        if type(node) is not FileNode:
            continue
        if not 0 <= node.file_size <= state.config.max_file_size_bytes:
            raise InvariantViolation(f"size of {node.ino}")
        chunks = node.chunks
        if chunks is None:
            continue
        if not chunks or len(chunks) % CHUNK_FIELDS:
            raise InvariantViolation(f"chunk array of {node.ino}")
        previous = -1
        for offset in range(0, len(chunks), CHUNK_FIELDS):
            index, chunk, version, length = chunks[offset : offset + CHUNK_FIELDS]
            if (
                index <= previous
                or not 0 < chunk < state.next_chunk
                or chunk in current
                or version < 1
                or not 0 <= length <= chunk_size
                or (length and index * chunk_size + length > node.file_size)
            ):
                raise InvariantViolation(
                    f"file {node.ino}: chunk {index}: id {chunk} v{version} length {length}"
                )
            previous = index
            current[chunk] = version
            count += 1
            stored += length
            replicated += length * node.goal
    invariant(
        (count, stored, replicated)
        == (state.chunk_count, state.chunk_bytes, state.replicated_bytes),
        "chunk counters off",
    )
    for chunk, version in state.deletions.items():
        live = current.get(chunk)
        still_current = live is not None and live <= version
        if not 0 < chunk < state.next_chunk or version < 1 or still_current:
            raise InvariantViolation(f"queued chunk {chunk} v{version} (current: {live})")
    invariant(len(state.open_chunks) <= OPEN_CHUNKS_MAX, "too many open chunks")
    for chunk, (ino, index, _opened_ns, recovering) in state.open_chunks.items():
        holder = state.inodes.get(ino)
        if (
            recovering not in (0, 1)
            or not isinstance(holder, FileNode)
            or holder.chunk_offset(index, chunk) is None
        ):
            raise InvariantViolation(f"open chunk {chunk} is not chunk {index} of file {ino}")


def _check_sessions(state: State) -> None:
    invariant(len(state.sessions) <= SESSIONS_MAX, "too many sessions")
    opens: Counter[int] = Counter()
    for client, session in state.sessions.items():
        if session.client != client or not 0 < client < state.next_client:
            raise InvariantViolation(f"session {client} is misfiled")
        for seq in session.replies:
            if not session.floor <= seq < session.floor + REPLY_WINDOW:
                raise InvariantViolation(f"client {client} keeps reply {seq} off its window")
        if session.open_total != sum(session.opens.values()) or (
            session.open_total > OPEN_FILES_PER_SESSION_MAX
        ):
            raise InvariantViolation(f"client {client}: open_total {session.open_total}")
        for ino, count in session.opens.items():
            node = state.inodes.get(ino)
            if count <= 0 or node is None or type(node) is DirNode:
                raise InvariantViolation(f"client {client} holds {count} opens of {ino}")
            opens[ino] += count
    invariant(dict(opens) == state.open_counts, "open counts disagree with the sessions")
