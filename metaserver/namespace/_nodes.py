"""In-memory inodes: one ``__slots__`` class per kind, no dict per inode.

Rules of this file:

1. A node holds exactly the fields its kind needs; the file type lives in the
   ``S_IFMT`` bits of ``mode`` and always agrees with the node's class.
2. A file's chunk list is one flat ``array('q')`` of ``[index, chunk, version, length]``
   quadruples sorted by index (``None`` while empty): about 100 bytes for a one-chunk
   file where a list of tuples would cost three times that.
3. Nothing here allocates ids, reads a clock or knows about sessions; the state
   (``_state.py``) does that and keeps the counters.
"""

from __future__ import annotations

import dataclasses
import stat
from array import array

from wire.invariant import invariant
from wire.namespace_ops import INODE_GENERATION, Attr

from ._cookies import CookieIndex

CHUNK_FIELDS = 4
"""Ints per chunk in a file's chunk array: index, chunk id, version, length."""
MODE_BITS = stat.S_IFMT(0o177777) | 0o7777
"""Every bit a valid ``st_mode`` may have: file type and permissions."""


class Node:
    """Fields every inode has.  Times are ns; ``xattrs`` is ``None`` until the first one."""

    __slots__ = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "goal",
        "compress",
        "xattrs",
    )

    def __init__(
        self,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        time_ns: int,
        goal: int,
        compress: bool,
    ) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.atime_ns = time_ns
        self.mtime_ns = time_ns
        self.ctime_ns = time_ns
        self.goal = goal
        self.compress = compress
        self.xattrs: dict[bytes, bytes] | None = None

    def size(self) -> int:
        return 0

    def rdev(self) -> int:
        return 0

    def stored_bytes(self) -> int:
        return 0

    def attr(self) -> Attr:
        return make_attr(
            self.ino,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev(),
            self.size(),
            (self.stored_bytes() + 511) >> 9,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.goal,
            self.compress,
        )


_ATTR_FIELDS = (
    "ino",
    "generation",
    "mode",
    "nlink",
    "uid",
    "gid",
    "rdev",
    "size",
    "blocks",
    "atime_ns",
    "mtime_ns",
    "ctime_ns",
    "goal",
    "compress",
)
invariant(
    _ATTR_FIELDS == tuple(field.name for field in dataclasses.fields(Attr)),
    "make_attr is out of step with the fields of Attr",
)
_new_object = object.__new__
_set_attribute = object.__setattr__


def make_attr(
    ino: int,
    mode: int,
    nlink: int,
    uid: int,
    gid: int,
    rdev: int,
    size: int,
    blocks: int,
    atime_ns: int,
    mtime_ns: int,
    ctime_ns: int,
    goal: int,
    compress: bool,
) -> Attr:
    """``Attr(...)`` without the generated frozen ``__init__``.

    That ``__init__`` calls ``object.__setattr__`` once per field, which made building
    the reply of a create cost more than the create itself; filling ``__dict__`` in
    one step is about ten times faster and yields an equal, equally frozen object (a
    test compares the two).
    """
    attr = _new_object(Attr)
    _set_attribute(
        attr,
        "__dict__",
        {
            "ino": ino,
            # Constant, because inode numbers are never reused (State.reserve_ino).
            "generation": INODE_GENERATION,
            "mode": mode,
            "nlink": nlink,
            "uid": uid,
            "gid": gid,
            "rdev": rdev,
            "size": size,
            "blocks": blocks,
            "atime_ns": atime_ns,
            "mtime_ns": mtime_ns,
            "ctime_ns": ctime_ns,
            "goal": goal,
            "compress": compress,
        },
    )
    return attr


class FileNode(Node):
    """A regular file: its size and chunk list."""

    __slots__ = ("file_size", "chunks")

    def __init__(
        self, ino: int, mode: int, uid: int, gid: int, time_ns: int, goal: int, compress: bool
    ) -> None:
        # Node.__init__ inlined: a create builds one of these per call.
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 1
        self.atime_ns = time_ns
        self.mtime_ns = time_ns
        self.ctime_ns = time_ns
        self.goal = goal
        self.compress = compress
        self.xattrs = None
        self.file_size = 0
        self.chunks: array[int] | None = None

    def size(self) -> int:
        return self.file_size

    def stored_bytes(self) -> int:
        chunks = self.chunks
        return 0 if chunks is None else sum(chunks[3::CHUNK_FIELDS])

    def attr(self) -> Attr:
        # Files are most of the namespace: skip the generic path's method calls.
        chunks = self.chunks
        stored = 0 if chunks is None else sum(chunks[3::CHUNK_FIELDS])
        return make_attr(
            self.ino,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            0,
            self.file_size,
            (stored + 511) >> 9,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.goal,
            self.compress,
        )

    def chunk_position(self, index: int) -> int:
        """Position (in chunks, not ints) of the first chunk whose index is >= ``index``."""
        chunks = self.chunks
        if chunks is None:
            return 0
        low, high = 0, len(chunks) // CHUNK_FIELDS
        while low < high:
            middle = (low + high) >> 1
            if chunks[middle * CHUNK_FIELDS] < index:
                low = middle + 1
            else:
                high = middle
        return low

    def chunk_offset(self, index: int, chunk: int) -> int | None:
        """Offset (in ints) of the record of chunk ``index`` when that record holds chunk
        id ``chunk``; None when the file has no chunk at ``index`` or another one there."""
        chunks = self.chunks
        offset = self.chunk_position(index) * CHUNK_FIELDS
        if chunks is None or offset >= len(chunks):
            return None
        return offset if chunks[offset] == index and chunks[offset + 1] == chunk else None

    def chunk_count(self) -> int:
        return 0 if self.chunks is None else len(self.chunks) // CHUNK_FIELDS


class DirNode(Node):
    """A directory: entries by name, its parent, and a readdir index built on demand.

    ``cookies`` is derived state (never snapshotted): it is built by the first readdir
    and then kept up to date by every entry added or removed, so that later pages cost
    O(page) and creates O(sqrt(entries)).
    """

    __slots__ = ("parent", "entries", "cookies")

    def __init__(
        self,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        time_ns: int,
        goal: int,
        compress: bool,
        parent: DirNode | None,
    ) -> None:
        super().__init__(ino, mode, uid, gid, 2, time_ns, goal, compress)
        self.parent: DirNode = self if parent is None else parent
        self.entries: dict[bytes, Node] = {}
        self.cookies: CookieIndex | None = None

    def size(self) -> int:
        return len(self.entries)

    def add_entry(self, name: bytes, node: Node) -> None:
        self.entries[name] = node
        if self.cookies is not None:
            self.cookies.add(name)

    def remove_entry(self, name: bytes) -> None:
        del self.entries[name]
        if self.cookies is not None:
            self.cookies.remove(name)

    def cookie_index(self) -> CookieIndex:
        if self.cookies is None:
            self.cookies = CookieIndex(self.entries)
        return self.cookies


class SymlinkNode(Node):
    __slots__ = ("target",)

    def __init__(
        self,
        ino: int,
        uid: int,
        gid: int,
        time_ns: int,
        goal: int,
        compress: bool,
        target: bytes,
    ) -> None:
        super().__init__(ino, stat.S_IFLNK | 0o777, uid, gid, 1, time_ns, goal, compress)
        self.target = target

    def size(self) -> int:
        return len(self.target)


class SpecialNode(Node):
    """A fifo, socket, or character or block device."""

    __slots__ = ("device",)

    def __init__(
        self,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        time_ns: int,
        goal: int,
        compress: bool,
        device: int,
    ) -> None:
        super().__init__(ino, mode, uid, gid, 1, time_ns, goal, compress)
        self.device = device

    def rdev(self) -> int:
        return self.device
