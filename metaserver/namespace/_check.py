"""A full consistency check of the namespace: every derived fact recomputed from scratch.

O(size of the namespace): tests run it after every step, :func:`restore` after loading
a snapshot.  Any failure raises :class:`~wire.invariant.InvariantViolation`.
"""

from __future__ import annotations

import stat
from collections import Counter

from wire.ids import ROOT_INODE
from wire.invariant import invariant
from wire.namespace_ops import (
    LINK_MAX,
    NAME_MAX_BYTES,
    OPEN_FILES_PER_SESSION_MAX,
    REPLY_WINDOW,
    SESSIONS_MAX,
    XATTR_INODE_MAX_BYTES,
    XATTR_LIST_MAX_BYTES,
)

from ._cookies import cookie_of
from ._nodes import CHUNK_FIELDS, DirNode, FileNode, Node, SpecialNode, SymlinkNode
from ._state import State

TYPE_OF_CLASS = {
    FileNode: (stat.S_IFREG,),
    DirNode: (stat.S_IFDIR,),
    SymlinkNode: (stat.S_IFLNK,),
    SpecialNode: (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK),
}


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
    order = list(state.ino_order)
    invariant(order == sorted(set(order)), "scan order is not strictly ascending")
    invariant(set(inodes) <= set(order), "a live inode is missing from the scan order")
    invariant(list(inodes) == sorted(inodes), "inode table is not in allocation order")


def _check_node(state: State, ino: int, node: Node) -> None:
    invariant(node.ino == ino, f"inode {ino} is filed under {node.ino}")
    invariant(0 < ino < state.next_ino, f"inode {ino} was never allocated")
    kinds = TYPE_OF_CLASS[type(node)]
    invariant(stat.S_IFMT(node.mode) in kinds, f"inode {ino}: mode disagrees with its kind")
    invariant(1 <= node.goal, f"inode {ino}: goal {node.goal}")
    xattrs = node.xattrs
    if xattrs is not None:
        invariant(bool(xattrs), f"inode {ino}: empty xattr table kept")
        invariant(
            sum(len(name) + 1 for name in xattrs) <= XATTR_LIST_MAX_BYTES
            and sum(len(name) + len(value) for name, value in xattrs.items())
            <= XATTR_INODE_MAX_BYTES,
            f"inode {ino}: xattrs over their limits",
        )


def _check_directory(state: State, directory: DirNode, names: Counter[int]) -> None:
    subdirectories = 0
    for name, child in directory.entries.items():
        invariant(
            0 < len(name) <= NAME_MAX_BYTES
            and b"/" not in name
            and b"\0" not in name
            and name not in (b".", b".."),
            f"bad name {name!r} in {directory.ino}",
        )
        invariant(state.inodes.get(child.ino) is child, f"entry {name!r} names a dead inode")
        names[child.ino] += 1
        if type(child) is DirNode:
            subdirectories += 1
            invariant(child.parent is directory, f"directory {child.ino} has a wrong parent")
    invariant(
        directory.nlink == 2 + subdirectories,
        f"directory {directory.ino}: nlink {directory.nlink}, {subdirectories} subdirectories",
    )
    if directory.cookies is not None:
        expected = sorted((cookie_of(name), name) for name in directory.entries)
        invariant(directory.cookies.pairs() == expected, f"stale cookies in {directory.ino}")


def _check_links(state: State, names: Counter[int]) -> None:
    unlinked_open = 0
    for ino, node in state.inodes.items():
        if type(node) is DirNode:
            expected = 0 if ino == ROOT_INODE else 1
            invariant(names[ino] == expected, f"directory {ino} has {names[ino]} names")
            continue
        invariant(node.nlink == names[ino], f"inode {ino}: nlink {node.nlink}, {names[ino]} names")
        invariant(node.nlink <= LINK_MAX, f"inode {ino}: over LINK_MAX")
        if node.nlink == 0:
            invariant(ino in state.open_counts, f"inode {ino}: unlinked, unopened, not freed")
            unlinked_open += 1
    invariant(unlinked_open == state.open_unlinked, "open_unlinked counter is off")
    files = sum(1 for node in state.inodes.values() if type(node) is FileNode)
    directories = sum(1 for node in state.inodes.values() if type(node) is DirNode)
    invariant((files, directories) == (state.files, state.directories), "type counters off")


def _check_tree_is_rooted(state: State) -> None:
    limit = len(state.inodes)
    for node in state.inodes.values():
        if type(node) is not DirNode:
            continue
        steps = 0
        while node.ino != ROOT_INODE:
            node = node.parent
            steps += 1
            invariant(steps <= limit, "a directory cycle is cut off from the root")


def _check_chunks(state: State) -> None:
    chunk_size = state.chunk_size
    current: dict[int, int] = {}
    count = stored = replicated = 0
    for node in state.inodes.values():
        if type(node) is not FileNode:
            continue
        invariant(0 <= node.file_size <= state.config.max_file_size_bytes, f"size of {node.ino}")
        chunks = node.chunks
        if chunks is None:
            continue
        invariant(len(chunks) > 0 and len(chunks) % CHUNK_FIELDS == 0, f"chunks of {node.ino}")
        previous = -1
        for offset in range(0, len(chunks), CHUNK_FIELDS):
            index, chunk, version, length = chunks[offset : offset + CHUNK_FIELDS]
            invariant(index > previous, f"chunk indices of {node.ino} not ascending")
            previous = index
            invariant(0 < chunk < state.next_chunk, f"chunk id {chunk} never allocated")
            invariant(chunk not in current, f"chunk {chunk} referenced twice")
            invariant(version >= 1 and 0 <= length <= chunk_size, f"chunk {chunk} fields")
            invariant(
                length == 0 or index * chunk_size + length <= node.file_size,
                f"chunk {chunk} ends past the size of {node.ino}",
            )
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
        invariant(0 < chunk < state.next_chunk and version >= 1, f"queued chunk {chunk} bogus")
        live = current.get(chunk)
        invariant(live is None or live > version, f"queued chunk {chunk}v{version} is current")


def _check_sessions(state: State) -> None:
    invariant(len(state.sessions) <= SESSIONS_MAX, "too many sessions")
    opens: Counter[int] = Counter()
    for client, session in state.sessions.items():
        invariant(session.client == client and 0 < client < state.next_client, "session id")
        for seq in session.replies:
            invariant(
                session.floor <= seq < session.floor + REPLY_WINDOW,
                f"client {client} keeps reply {seq} outside its window",
            )
        invariant(session.open_total == sum(session.opens.values()), "open_total off")
        invariant(session.open_total <= OPEN_FILES_PER_SESSION_MAX, "too many opens")
        for ino, count in session.opens.items():
            invariant(count > 0, f"client {client} holds {count} opens of {ino}")
            node = state.inodes.get(ino)
            invariant(node is not None and type(node) is not DirNode, f"open of {ino}")
            opens[ino] += count
    invariant(dict(opens) == state.open_counts, "open counts disagree with the sessions")
