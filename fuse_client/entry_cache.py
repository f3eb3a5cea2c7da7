"""The mount's entry cache: names and attributes learnt from the namespace, answered
again while younger than the kernel's entry and attribute timeouts, and the signs of a
directory scan that :class:`fuse_client.fs.PaxfsOperations` then lists ahead.

Pure: no trio, no clock; the caller passes the time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from wire.ids import InodeId
from wire.invariant import invariant
from wire.namespace_ops import Attr, DirEntry

ENTRY_CACHE_NAMES_MAX = 65536
"""Names the mount remembers across directories (about 0.5 KiB each); past it the least
recently used directory is forgotten."""
ENTRY_CACHE_CHANGES_MAX = 4096
"""Local changes remembered to fence the fetches in flight; past it every fetch then in
flight is fenced as a whole."""
XATTR_NAMES_MAX = 16
"""Absent extended attribute names remembered per inode."""
STATAHEAD_FOUND_MISSES = 4
"""Names of one directory found at the namespace (not in the cache) in a row before the
directory is listed ahead: the sign of a scan (a stat loop, ``find``, ``rsync``)."""
STATAHEAD_PAUSE_S = 30.0
"""After a listing that stopped short (too large, or refused) the directory is not
listed ahead again for this long."""


@dataclass
class _CachedDir:
    names: dict[bytes, tuple[InodeId | None, float]] = field(default_factory=dict)
    """name -> (its inode, or None where the namespace said ENOENT; when it said so)."""
    found_misses: int = 0
    """Different names found at the namespace in a row (a path walk that finds the
    same name again and again is no scan)."""
    last_found: bytes = b""
    listing: bool = False
    pause_until_s: float = float("-inf")


class EntryCache:
    """Names and attributes this mount learnt from the namespace, answered again while
    younger than the configured entry and attribute timeouts.

    The kernel caches entries and attributes for those timeouts already; this cache
    answers a LOOKUP or GETATTR that the kernel's cache no longer can (its copy expired,
    or the entry came in with a directory listed ahead) without a namespace round trip,
    and with no more staleness: an answer carries only what is left of the timeouts,
    counted from the namespace's (linearizable) read.  Nothing negative is answered: a
    name the cache lacks, or knows as absent, goes to the namespace.

    A change made through this mount is never hidden from it: each change drops what it
    touches, and fences every fetch in flight when it happened (take :meth:`stamp`
    before a fetch, pass it to ``add*``: what changed since is refused).  A removal of a
    name the cache cannot resolve to an inode drops everything.

    Pure: the caller passes the time (monotonic seconds).
    """

    def __init__(
        self,
        entry_timeout_s: float,
        attr_timeout_s: float,
        names_max: int = ENTRY_CACHE_NAMES_MAX,
        changes_max: int = ENTRY_CACHE_CHANGES_MAX,
    ) -> None:
        invariant(names_max > 0 and changes_max > 0, "entry cache limits must be positive")
        self._entry_timeout_s = entry_timeout_s
        self._attr_timeout_s = attr_timeout_s
        self._names_max = names_max
        self._changes_max = changes_max
        self._dirs: OrderedDict[InodeId, _CachedDir] = OrderedDict()
        self._names = 0
        self._attrs: OrderedDict[InodeId, tuple[Attr, float]] = OrderedDict()
        self._absent_xattrs: OrderedDict[InodeId, dict[bytes | None, float]] = OrderedDict()
        """inode -> {xattr name (None: every name) -> when it was known absent}."""
        self._seq = 0
        self._floor = 0
        self._changed: dict[InodeId, int] = {}

    @property
    def enabled(self) -> bool:
        return self._entry_timeout_s > 0 and self._attr_timeout_s > 0

    def __len__(self) -> int:
        """Names held (with the absent ones)."""
        return self._names

    # ------------------------------------------------------------ answers

    def entry(self, parent: InodeId, name: bytes, now_s: float) -> tuple[Attr, float, float] | None:
        """``(attr, entry seconds left, attribute seconds left)`` of a name known to be
        there, while both are younger than their timeouts."""
        directory = self._dirs.get(parent)
        if directory is None:
            return None
        known = directory.names.get(name)
        if known is None:
            return None
        inode, entry_at = known
        if inode is None:
            return None
        entry_left = self._entry_timeout_s - (now_s - entry_at)
        cached = self._attrs.get(inode)
        if entry_left <= 0 or cached is None:
            return None
        attr, attr_at = cached
        attr_left = self._attr_timeout_s - (now_s - attr_at)
        if attr_left <= 0:
            return None
        directory.found_misses = 0
        self._dirs.move_to_end(parent)
        return attr, entry_left, attr_left

    def attr(self, inode: InodeId, now_s: float) -> tuple[Attr, float] | None:
        """``(attr, seconds left)`` while younger than the attribute timeout."""
        cached = self._attrs.get(inode)
        if cached is None:
            return None
        attr, attr_at = cached
        left = self._attr_timeout_s - (now_s - attr_at)
        return (attr, left) if left > 0 else None

    def xattr_absent(self, inode: InodeId, name: bytes, now_s: float) -> bool:
        """True while the inode is known, younger than the attribute timeout, to have
        no extended attribute ``name`` (the kernel asks for ``security.capability``
        before the first write to every file)."""
        absent = self._absent_xattrs.get(inode)
        if absent is None:
            return False
        return any(
            now_s - absent[key] < self._attr_timeout_s for key in (None, name) if key in absent
        )

    # ------------------------------------------------------------ what the namespace said

    def stamp(self) -> int:
        """Take before a fetch; what changes through this mount after it is fenced."""
        return self._seq

    def add(
        self, parent: InodeId, name: bytes, attr: Attr | None, stamp: int, now_s: float
    ) -> None:
        """The namespace said ``name`` in ``parent`` is ``attr`` (None: no such name)."""
        if not self._accepts(parent, stamp):
            return
        if attr is None:
            self._put_name(parent, name, None, now_s)
            self._dir(parent).found_misses = 0  # a scan finds what it looks for
        elif self._accepts(attr.ino, stamp):
            self._put_name(parent, name, attr.ino, now_s)
            self._put_attr(attr, now_s)

    def add_listing(
        self, parent: InodeId, entries: Sequence[DirEntry], stamp: int, now_s: float
    ) -> None:
        """A page of ``parent``'s entries as the namespace listed them."""
        if not self._accepts(parent, stamp):
            return
        for entry in entries:
            if self._accepts(entry.attr.ino, stamp):
                self._put_name(parent, entry.name, entry.attr.ino, now_s)
                self._put_attr(entry.attr, now_s)

    def unchanged_since(self, stamp: int, attrs: Iterable[Attr]) -> list[Attr]:
        """Those of ``attrs`` whose inode no change made here touched since ``stamp``.

        For the directory attributes a change answers with: take the stamp before
        sending the change and call this before recording it, so that a concurrent
        change here, whose effect the answer may lack, keeps them out."""
        return [attr for attr in attrs if self._accepts(attr.ino, stamp)]

    def add_attr(self, attr: Attr, stamp: int, now_s: float) -> None:
        if self._accepts(attr.ino, stamp):
            self._put_attr(attr, now_s)

    def add_xattr_absent(
        self, inode: InodeId, name: bytes | None, stamp: int, now_s: float
    ) -> None:
        """The namespace said the inode has no extended attribute ``name`` (None: none
        at all)."""
        if not self._accepts(inode, stamp):
            return
        absent = self._absent_xattrs.get(inode)
        if absent is None:
            absent = self._absent_xattrs[inode] = {}
        absent[name] = now_s
        self._absent_xattrs.move_to_end(inode)
        if len(absent) > XATTR_NAMES_MAX:
            absent.clear()
        while len(self._absent_xattrs) > self._names_max:  # never the inode just moved last
            self._absent_xattrs.popitem(last=False)

    # ------------------------------------------------------------ changes made here

    def changed(self, *inodes: InodeId) -> None:
        """These inodes' attributes (or, for a directory, its entries) changed here."""
        self._seq += 1
        for inode in inodes:
            self._changed[inode] = self._seq
            self._attrs.pop(inode, None)
            self._absent_xattrs.pop(inode, None)
        if len(self._changed) > self._changes_max:
            self._fence_in_flight()

    def added(
        self, parent: InodeId, name: bytes, attr: Attr, now_s: float, *, new_inode: bool
    ) -> None:
        """``name`` was made here in ``parent`` (create, mkdir, link, ...) as ``attr``;
        a ``new_inode`` has no extended attributes yet."""
        self.changed(parent, attr.ino)
        self._put_name(parent, name, attr.ino, now_s)
        self._put_attr(attr, now_s)
        if new_inode:
            self.add_xattr_absent(attr.ino, None, self._seq, now_s)

    def removed(self, parent: InodeId, *names: bytes) -> None:
        """These names of ``parent`` were removed or renamed away here."""
        touched = [parent]
        for name in names:
            known = self._pop_name(parent, name)
            if known is None:
                self.clear()
                return
            if known[0] is not None:
                touched.append(known[0])
        self.changed(*touched)

    def clear(self) -> None:
        """Forget everything and fence every fetch in flight."""
        self._dirs.clear()
        self._attrs.clear()
        self._absent_xattrs.clear()
        self._names = 0
        self._fence_in_flight()

    # ------------------------------------------------------------ listing ahead

    def note_found(self, parent: InodeId, name: bytes, now_s: float) -> bool:
        """``name`` of ``parent`` was found at the namespace, not here.  True when the
        directory should now be listed ahead (then :meth:`listing_started`)."""
        if not self.enabled:
            return False
        directory = self._dir(parent)
        if name == directory.last_found:
            return False
        directory.last_found = name
        directory.found_misses += 1
        return (
            directory.found_misses >= STATAHEAD_FOUND_MISSES
            and not directory.listing
            and now_s >= directory.pause_until_s
        )

    def listing_started(self, parent: InodeId, now_s: float) -> None:
        """One listing ahead per directory at a time, and one per entry timeout."""
        directory = self._dir(parent)
        directory.listing = True
        directory.found_misses = 0
        directory.pause_until_s = now_s + self._entry_timeout_s

    def listing_ended(self, parent: InodeId, now_s: float, *, complete: bool) -> None:
        directory = self._dirs.get(parent)
        if directory is None:
            return
        directory.listing = False
        if not complete:
            directory.pause_until_s = now_s + STATAHEAD_PAUSE_S

    # ------------------------------------------------------------ internals

    def _fence_in_flight(self) -> None:
        """Refuse every fetch stamped before now, whatever it touches."""
        self._changed.clear()
        self._seq += 1
        self._floor = self._seq

    def _accepts(self, inode: InodeId, stamp: int) -> bool:
        return stamp >= self._floor and self._changed.get(inode, -1) <= stamp

    def _dir(self, parent: InodeId) -> _CachedDir:
        directory = self._dirs.get(parent)
        if directory is None:
            directory = self._dirs[parent] = _CachedDir()
        self._dirs.move_to_end(parent)
        return directory

    def _put_name(self, parent: InodeId, name: bytes, inode: InodeId | None, now_s: float) -> None:
        directory = self._dir(parent)
        if name not in directory.names:
            self._names += 1
        directory.names[name] = (inode, now_s)
        while self._names > self._names_max and len(self._dirs) > 1:
            _, evicted = self._dirs.popitem(last=False)
            self._names -= len(evicted.names)
        if self._names > self._names_max:  # one directory holds them all: halve it
            for stale in list(directory.names)[: len(directory.names) // 2]:
                del directory.names[stale]
            self._names = len(directory.names)

    def _pop_name(self, parent: InodeId, name: bytes) -> tuple[InodeId | None, float] | None:
        directory = self._dirs.get(parent)
        if directory is None:
            return None
        known = directory.names.pop(name, None)
        if known is not None:
            self._names -= 1
        return known

    def _put_attr(self, attr: Attr, now_s: float) -> None:
        self._attrs[attr.ino] = (attr, now_s)
        self._attrs.move_to_end(attr.ino)
        while len(self._attrs) > self._names_max:
            self._attrs.popitem(last=False)
