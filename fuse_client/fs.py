"""The paxfs file system as pyfuse3 ``Operations``: a thin layer over the file client.

Rules this module keeps (each one a bug someone paid for; see PITFALLS.md):

1. **Every handler is wrapped** (:func:`_handler`): a namespace or data-path error
   becomes ``FUSEError(errno)``; anything unexpected becomes EIO with its traceback
   logged.  No exception but ``FUSEError`` ever reaches pyfuse3, so the mount never
   dies of one.  ``forget`` and ``release`` never raise at all.  ENOSYS is never
   returned (it would disable the operation for the whole mount).
2. **Lookup counts are exact**: every successful lookup, create, mkdir, mknod, symlink,
   link, and every ``readdir_reply`` that returned True adds one; ``forget`` subtracts;
   an inode at zero is dropped with everything cached for it, so memory stays bounded.
3. **Inode numbers are the namespace's** (never reused; the root is 1 on both sides).
4. **Caller identity on every op**: the namespace gets the caller's uid, gid and
   supplementary groups (sticky bits, chown/chmod rules, setgid inheritance are its to
   enforce); the kernel checks plain permissions (``default_permissions``).
5. **Caches are short and deliberate**: entry and attribute timeouts from ``[mount]``;
   the page cache is kept at ``open`` only while the file's (mtime, size) are those this
   mount last saw (close-to-open).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from fuse_client.chunk_io import ChunkIoError
from fuse_client.file_client import FileClient, FileIoError, OpenFile, errno_of
from wire.config import MountSettings
from wire.data_ops import Space
from wire.errors import RpcError
from wire.ids import InodeId
from wire.invariant import InvariantViolation, invariant
from wire.namespace_ops import (
    READDIR_FIRST_COOKIE,
    READDIR_PAGE_MAX,
    Attr,
    Credentials,
    DirEntry,
    GetAttr,
    GetXattr,
    Link,
    ListXattr,
    Lookup,
    Mkdir,
    Mknod,
    ReadDir,
    ReadLink,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Symlink,
    Unlink,
)

log = logging.getLogger(__name__)

BLOCK_SIZE_BYTES = 64 * 1024
"""``st_blksize`` and ``f_bsize``: the dataserver block, the unit worth reading at once."""
GROUPS_CACHE_MAX = 1024
"""Processes whose supplementary groups are remembered."""
GROUPS_CACHE_TTL_S = 2.0
"""How long a process's groups are trusted (a process may call setgroups)."""
READDIR_FETCH_ENTRIES = 256
"""Entries fetched per namespace ReadDir; a kernel readdir buffer holds a few dozen."""
invariant(READDIR_FETCH_ENTRIES <= READDIR_PAGE_MAX, "readdir fetch above the page limit")
ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})
DOT_COOKIE = 1
DOTDOT_COOKIE = 2
invariant(DOTDOT_COOKIE < READDIR_FIRST_COOKIE, "dot cookies collide with entry cookies")

P = ParamSpec("P")
R = TypeVar("R")


def _handler(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Map expected errors to their errno, unexpected ones to EIO and a logged traceback."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (RpcError, ChunkIoError, FileIoError) as error:
            code = errno_of(error)
            if code == errno.EIO:
                log.warning("%s: %s", method.__name__, error)
            raise pyfuse3.FUSEError(code) from None
        except (Exception, InvariantViolation):
            log.exception("%s failed unexpectedly; answering EIO", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


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
STATAHEAD_ENTRIES_MAX = 8192
"""A directory is listed ahead up to this many entries (about 30 µs an entry for the
client; a scan of a larger one pays a lookup per name)."""
STATAHEAD_PAUSE_S = 30.0
"""After a listing that stopped short (too large, or refused) the directory is not
listed ahead again for this long."""
STATAHEAD_QUEUE_MAX = 16
"""Directories waiting to be listed ahead; more requests are dropped (only an
optimisation is lost)."""
STATAHEAD_WAIT_S = 0.5
"""How long a lookup the cache cannot answer waits for the listing of its directory
under way to bring the name (a page of 1024 entries takes tens of milliseconds) before
asking the namespace itself."""


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
        while len(self._absent_xattrs) > self._names_max or len(absent) > XATTR_NAMES_MAX:
            if len(absent) > XATTR_NAMES_MAX:
                absent.clear()
            else:
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
            self._floor = self._seq + 1
            self._seq += 1
            self._changed.clear()

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
        self._changed.clear()
        self._seq += 1
        self._floor = self._seq

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


class _Listing:
    """A directory being listed ahead; lookups that miss wait for its next page."""

    def __init__(self) -> None:
        self.page = trio.Event()

    def landed(self) -> None:
        self.page.set()
        self.page = trio.Event()


@dataclass
class _DirHandle:
    inode: InodeId
    credentials: Credentials
    entries: list[DirEntry] = field(default_factory=list)
    """The last page fetched, to serve the kernel's next readdir from."""
    after_cookie: int = -1
    """The cookie the page was fetched after."""


class GroupsCache:
    """Supplementary groups per process, read from /proc, remembered briefly (bounded)."""

    def __init__(self, capacity: int = GROUPS_CACHE_MAX, ttl_s: float = GROUPS_CACHE_TTL_S):
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._entries: OrderedDict[int, tuple[float, tuple[int, ...]]] = OrderedDict()

    def groups(self, pid: int) -> tuple[int, ...]:
        if pid <= 0:
            return ()
        now = time.monotonic()
        cached = self._entries.get(pid)
        if cached is not None and now - cached[0] < self._ttl_s:
            self._entries.move_to_end(pid)
            return cached[1]
        try:
            groups = tuple(sorted(pyfuse3.get_sup_groups(pid)))
        except (OSError, ValueError, RuntimeError):
            groups = ()  # the process is gone: its request is moot
        self._entries[pid] = (now, groups)
        self._entries.move_to_end(pid)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return groups

    def __len__(self) -> int:
        return len(self._entries)


class PaxfsOperations(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`FileClient` (see the module docstring)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, client: FileClient, settings: MountSettings) -> None:
        super().__init__()
        self.client = client
        self.settings = settings
        self.lookups: dict[int, int] = {}
        self._cache_stamps: dict[int, tuple[int, int]] = {}
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = itertools.count(1)
        self._groups = GroupsCache()
        self.entries = EntryCache(settings.entry_timeout_s, settings.attr_timeout_s)
        self._list_ahead_send, self._list_ahead_receive = trio.open_memory_channel[
            tuple[InodeId, Credentials]
        ](STATAHEAD_QUEUE_MAX)
        self._listings: dict[InodeId, _Listing] = {}

    # ------------------------------------------------------------ helpers

    def _credentials(self, ctx: pyfuse3.RequestContext) -> Credentials:
        return Credentials(ctx.uid, ctx.gid, self._groups.groups(ctx.pid))

    def _entry(
        self,
        attr: Attr,
        entry_timeout_s: float | None = None,
        attr_timeout_s: float | None = None,
    ) -> pyfuse3.EntryAttributes:
        """The kernel's view of ``attr``, cached there for the configured timeouts (or
        what is left of them, for an answer from :class:`EntryCache`)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = attr.generation
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blocks = attr.blocks
        entry.st_blksize = BLOCK_SIZE_BYTES
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        entry.attr_timeout = (
            self.settings.attr_timeout_s if attr_timeout_s is None else attr_timeout_s
        )
        entry.entry_timeout = (
            self.settings.entry_timeout_s if entry_timeout_s is None else entry_timeout_s
        )
        return entry

    def _remember(
        self,
        attr: Attr,
        entry_timeout_s: float | None = None,
        attr_timeout_s: float | None = None,
    ) -> pyfuse3.EntryAttributes:
        """Count one kernel reference to ``attr.ino`` and return its entry."""
        self.lookups[attr.ino] = self.lookups.get(attr.ino, 0) + 1
        return self._entry(self.client.local_view(attr), entry_timeout_s, attr_timeout_s)

    @contextmanager
    def _changing(self, *inodes: int) -> Iterator[None]:
        """Around a namespace change whose success the caller caches: when it fails (it
        may have been applied all the same, say before a timeout), the cache drops what
        it may have changed."""
        try:
            yield
        except BaseException:
            self.entries.changed(*(InodeId(inode) for inode in inodes))
            raise

    def _made(
        self, parent: int, name: bytes, attr: Attr, asked_at_s: float, *, new_inode: bool = True
    ) -> pyfuse3.EntryAttributes:
        """``name`` was made in ``parent`` as ``attr``: cache it, count the reference."""
        self.entries.added(InodeId(parent), name, attr, asked_at_s, new_inode=new_inode)
        return self._remember(attr)

    def _new_fh(self) -> int:
        return next(self._next_fh)

    def _file(self, fh: int) -> OpenFile:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    # ------------------------------------------------------------ names

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """ENOENT (not cached), ENOTDIR, ENAMETOOLONG.  Answered from :class:`EntryCache`
        while it holds the name; else one namespace read, and after a few of those in
        one directory the directory is listed ahead (a scan is under way)."""
        parent = InodeId(parent_inode)
        asked_at_s = time.monotonic()
        cached = self.entries.entry(parent, name, asked_at_s)
        if cached is not None:
            attr, entry_left_s, attr_left_s = cached
            return self._remember(attr, entry_left_s, attr_left_s)
        dots = name in (b".", b"..")
        listing = self._listings.get(parent)
        if listing is not None and not dots:
            cached = await self._await_listing(parent, name, listing)
            if cached is not None:
                attr, entry_left_s, attr_left_s = cached
                return self._remember(attr, entry_left_s, attr_left_s)
            asked_at_s = time.monotonic()
        credentials = self._credentials(ctx)
        stamp = self.entries.stamp()
        try:
            reply = await self.client.meta.query(Lookup(parent, name), credentials)
        except RpcError as error:
            if error.code == errno.ENOENT and not dots:
                self.entries.add(parent, name, None, stamp, asked_at_s)
            raise
        if not dots:
            self.entries.add(parent, name, reply.attr, stamp, asked_at_s)
            if self.entries.note_found(parent, name, asked_at_s):
                self._request_listing(parent, credentials, asked_at_s)
        return self._remember(reply.attr)

    async def _await_listing(
        self, parent: InodeId, name: bytes, listing: _Listing
    ) -> tuple[Attr, float, float] | None:
        """Wait (at most ``STATAHEAD_WAIT_S``) for the listing of ``parent`` under way
        to bring ``name`` into the cache; what the cache then says.  A listing that made
        a lookup wait that long is not waited for again (it may be stuck in the queue)."""
        deadline = trio.current_time() + STATAHEAD_WAIT_S
        while True:
            with trio.move_on_at(deadline):
                await listing.page.wait()
            cached = self.entries.entry(parent, name, time.monotonic())
            if cached is not None or self._listings.get(parent) is not listing:
                return cached
            if trio.current_time() >= deadline:
                del self._listings[parent]
                return None

    def _request_listing(self, parent: InodeId, credentials: Credentials, now_s: float) -> None:
        try:
            self._list_ahead_send.send_nowait((parent, credentials))
        except trio.WouldBlock:
            return
        self.entries.listing_started(parent, now_s)
        self._listings[parent] = _Listing()

    async def list_ahead_forever(self) -> None:
        """Run for the mount's lifetime: list the directories :meth:`lookup` asks for
        into the entry cache (statahead, as Lustre's).  Never raises."""
        async for parent, credentials in self._list_ahead_receive:
            complete = False
            try:
                complete = await self._list_ahead(parent, credentials)
            except (RpcError, ChunkIoError, FileIoError) as error:
                log.info("listing directory %d ahead: %s", parent, error)
            except Exception:  # noqa: BLE001 - an optimisation must not end the mount
                log.exception("listing directory %d ahead failed unexpectedly", parent)
            finally:
                self.entries.listing_ended(parent, time.monotonic(), complete=complete)
                listing = self._listings.pop(parent, None)
                if listing is not None:
                    listing.page.set()

    async def _list_ahead(self, parent: InodeId, credentials: Credentials) -> bool:
        """Cache ``parent``'s entries, page by page; False when it has more than
        ``STATAHEAD_ENTRIES_MAX``."""
        cookie = 0
        listed = 0
        while listed < STATAHEAD_ENTRIES_MAX:
            stamp = self.entries.stamp()
            asked_at_s = time.monotonic()
            reply = await self.client.meta.query(
                ReadDir(parent, cookie, READDIR_PAGE_MAX), credentials
            )
            self.entries.add_listing(parent, reply.entries, stamp, asked_at_s)
            listing = self._listings.get(parent)
            if listing is not None:
                listing.landed()
            listed += len(reply.entries)
            if reply.eof or not reply.entries:
                return True
            cookie = reply.entries[-1].cookie
        return False

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop kernel references; an inode at zero leaves every cache.  Never raises."""
        try:
            for inode, count in inode_list:
                left = self.lookups.get(inode, 0) - count
                if left > 0:
                    self.lookups[inode] = left
                else:
                    if left < 0:
                        log.error("forget of inode %d below zero (%d)", inode, left)
                    self.lookups.pop(inode, None)
                    self._cache_stamps.pop(inode, None)
        except Exception:  # noqa: BLE001 - forget must never raise (PITFALLS.md)
            log.exception("forget failed")

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """ENOENT for an inode that is gone.  Answered from :class:`EntryCache` while it
        holds the inode's attributes; else one namespace read."""
        asked_at_s = time.monotonic()
        cached = self.entries.attr(InodeId(inode), asked_at_s)
        if cached is not None:
            attr, attr_left_s = cached
            return self._entry(self.client.local_view(attr), attr_timeout_s=attr_left_s)
        stamp = self.entries.stamp()
        reply = await self.client.meta.query(GetAttr(InodeId(inode)), self._credentials(ctx))
        self.entries.add_attr(reply.attr, stamp, asked_at_s)
        return self._entry(self.client.local_view(reply.attr))

    @_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """chmod, chown, truncate/ftruncate, utimens; errors as the namespace's SetAttr
        (EPERM, EACCES, EISDIR, EINVAL, EFBIG; ENOENT after an unlink)."""
        credentials = self._credentials(ctx)
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size"] = attr.st_size
        if fields.update_atime or fields.update_mtime:
            # pyfuse3 turns UTIME_NOW into the current time.  The kernel only lets an
            # explicit time through for the owner or root, so from anyone else the
            # request was "now", which the namespace allows with write permission.
            explicit = credentials.uid == 0
            if not explicit:
                current = await self.client.meta.query(GetAttr(InodeId(inode)), credentials)
                explicit = current.attr.uid == credentials.uid
            if fields.update_atime:
                if explicit:
                    changes["atime_ns"] = attr.st_atime_ns
                else:
                    changes["atime_now"] = True
            if fields.update_mtime:
                if explicit:
                    changes["mtime_ns"] = attr.st_mtime_ns
                else:
                    changes["mtime_now"] = True
        if not changes:
            return self._entry(await self.client.getattr(InodeId(inode), credentials))
        try:
            result = await self.client.setattr(SetAttr(InodeId(inode), **changes), credentials)
        finally:
            self.entries.changed(InodeId(inode))
        return self._entry(result)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        """EINVAL for a non-symlink."""
        reply = await self.client.meta.query(ReadLink(InodeId(inode)), self._credentials(ctx))
        target: bytes = reply.target
        return target

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Regular files, fifos, sockets, devices (root); EEXIST, EPERM, ENOSPC."""
        asked_at_s = time.monotonic()
        with self._changing(parent_inode):
            reply = await self.client.meta.mutate(
                Mknod(InodeId(parent_inode), name, mode, rdev), self._credentials(ctx)
            )
        return self._made(parent_inode, name, reply.attr, asked_at_s)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EEXIST, ENOENT, ENOTDIR, ENAMETOOLONG, ENOSPC."""
        asked_at_s = time.monotonic()
        with self._changing(parent_inode):
            reply = await self.client.meta.mutate(
                Mkdir(InodeId(parent_inode), name, mode), self._credentials(ctx)
            )
        return self._made(parent_inode, name, reply.attr, asked_at_s)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENOENT, EISDIR, EPERM (sticky); an open file lives on until released."""
        try:
            await self.client.meta.mutate(
                Unlink(InodeId(parent_inode), name), self._credentials(ctx)
            )
        finally:
            self.entries.removed(InodeId(parent_inode), name)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENOENT, ENOTDIR, ENOTEMPTY, EPERM (sticky)."""
        try:
            await self.client.meta.mutate(
                Rmdir(InodeId(parent_inode), name), self._credentials(ctx)
            )
        finally:
            self.entries.removed(InodeId(parent_inode), name)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EEXIST, ENAMETOOLONG, and the parent's errors."""
        asked_at_s = time.monotonic()
        with self._changing(parent_inode):
            reply = await self.client.meta.mutate(
                Symlink(InodeId(parent_inode), name, target), self._credentials(ctx)
            )
        return self._made(parent_inode, name, reply.attr, asked_at_s)

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """renameat2 with RENAME_NOREPLACE / RENAME_EXCHANGE; errors in Linux's order.
        A replaced inode stays alive while open (the namespace counts opens)."""
        try:
            await self.client.meta.mutate(
                Rename(
                    InodeId(parent_inode_old),
                    name_old,
                    InodeId(parent_inode_new),
                    name_new,
                    flags,
                ),
                self._credentials(ctx),
            )
        finally:
            self.entries.removed(InodeId(parent_inode_old), name_old)
            self.entries.removed(InodeId(parent_inode_new), name_new)

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EPERM (a directory), EMLINK, EEXIST, ENOENT."""
        asked_at_s = time.monotonic()
        with self._changing(new_parent_inode, inode):
            reply = await self.client.meta.mutate(
                Link(InodeId(inode), InodeId(new_parent_inode), new_name), self._credentials(ctx)
            )
        return self._made(new_parent_inode, new_name, reply.attr, asked_at_s, new_inode=False)

    # ------------------------------------------------------------ files

    def _file_info(self, fh: int, attr: Attr) -> pyfuse3.FileInfo:
        """Keep the page cache only when the file is as this mount last saw it."""
        stamp = (attr.mtime_ns, attr.size)
        keep = self._cache_stamps.get(attr.ino) == stamp
        self._cache_stamps[attr.ino] = stamp
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """EISDIR, ENOENT, EMFILE; O_TRUNC truncates (the kernel passes it through)."""
        credentials = self._credentials(ctx)
        handle = await self.client.open(InodeId(inode), credentials)
        try:
            if flags & os.O_TRUNC and handle.size:
                self.entries.changed(handle.inode)
                attr = await handle.truncate(0)
            else:
                attr = self.client.local_view(handle.attr)
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle.release()
            raise
        fh = self._new_fh()
        self._files[fh] = handle
        return self._file_info(fh, attr)

    @_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """open(O_CREAT): EEXIST with O_EXCL, EISDIR, and mknod's errors."""
        credentials = self._credentials(ctx)
        asked_at_s = time.monotonic()
        with self._changing(parent_inode):
            handle, attr = await self.client.create(
                InodeId(parent_inode),
                name,
                stat.S_IFREG | stat.S_IMODE(mode),
                credentials,
                exclusive=bool(flags & os.O_EXCL),
            )
        try:
            if flags & os.O_TRUNC and attr.size:
                self.entries.changed(attr.ino)
                attr = await handle.truncate(0)
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle.release()
            raise
        fh = self._new_fh()
        self._files[fh] = handle
        # Without O_EXCL the name may have been made meanwhile by another client: its
        # inode is new only if nothing changed it since its birth (times all equal).
        new_inode = bool(flags & os.O_EXCL) or attr.atime_ns == attr.mtime_ns == attr.ctime_ns
        entry = self._made(parent_inode, name, attr, asked_at_s, new_inode=new_inode)
        return self._file_info(fh, attr), entry

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._file(fh).read(off, size)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Buffered; errors of the write-back surface at flush, fsync or close."""
        return await self._file(fh).write(off, buf)

    @_handler
    async def flush(self, fh: int) -> None:
        """close(2): durable on every replica and published (close-to-open).  No
        namespace call for a file this mount holds no writes of."""
        handle = self._file(fh)
        async with self._publishing(handle):
            await handle.flush()

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._file(fh)
        async with self._publishing(handle):
            await handle.fsync()

    @asynccontextmanager
    async def _publishing(self, handle: OpenFile) -> AsyncIterator[None]:
        """Around a publish: if the file had writes to publish, its cached attributes
        are dropped after (the size and times changed), whether or not it succeeded."""
        unpublished = handle.state.has_unpublished()
        try:
            yield
        finally:
            if unpublished:
                self.entries.changed(handle.inode)

    async def release(self, fh: int) -> None:
        """Publish what is left and give the open back.  Never raises (the kernel
        discards release errors; close already reported them through flush)."""
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        try:
            async with self._publishing(handle):
                await handle.release()
            committed = handle.state.committed_attr
            if committed is not None and committed.ino in self.lookups:
                # The kernel's page cache holds what this mount wrote (write-through).
                self._cache_stamps[committed.ino] = (committed.mtime_ns, committed.size)
        except (RpcError, ChunkIoError, FileIoError) as error:
            log.warning("release of inode %d: %s", handle.inode, error)
        except Exception:  # noqa: BLE001 - release must not take the mount down
            log.exception("release of inode %d failed unexpectedly", handle.inode)

    # ------------------------------------------------------------ directories

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._new_fh()
        self._dirs[fh] = _DirHandle(InodeId(inode), self._credentials(ctx))
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """readdirplus over the namespace's stable cookies (``next_id`` is the entry's
        cookie, so a listing resumed anywhere neither repeats nor skips an entry)."""
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        # "." and ".." take cookies 1 and 2 (the namespace's start at 3); the kernel
        # counts no lookup for them and ignores their attributes (it takes the inode
        # number and the type), so "." needs no namespace call.
        if start_id < DOT_COOKIE:
            dot = pyfuse3.EntryAttributes()
            dot.st_ino = handle.inode
            dot.st_mode = stat.S_IFDIR
            if not pyfuse3.readdir_reply(token, b".", dot, DOT_COOKIE):
                return
        if start_id < DOTDOT_COOKIE:
            reply = await self.client.meta.query(Lookup(handle.inode, b".."), handle.credentials)
            if not pyfuse3.readdir_reply(token, b"..", self._entry(reply.attr), DOTDOT_COOKIE):
                return
        cookie = start_id if start_id > DOTDOT_COOKIE else 0
        while True:
            entries = self._cached_entries(handle, cookie)
            if entries is None:
                stamp = self.entries.stamp()
                asked_at_s = time.monotonic()
                reply = await self.client.meta.query(
                    ReadDir(handle.inode, cookie, READDIR_FETCH_ENTRIES), handle.credentials
                )
                self.entries.add_listing(handle.inode, reply.entries, stamp, asked_at_s)
                handle.entries = list(reply.entries)
                handle.after_cookie = cookie
                entries = handle.entries
                if not entries:
                    return
                eof = reply.eof
            else:
                eof = False
            for entry in entries:
                if not pyfuse3.readdir_reply(
                    token, entry.name, self._entry(self.client.local_view(entry.attr)), entry.cookie
                ):
                    return
                self.lookups[entry.attr.ino] = self.lookups.get(entry.attr.ino, 0) + 1
                cookie = entry.cookie
            if eof:
                return

    def _cached_entries(self, handle: _DirHandle, cookie: int) -> list[DirEntry] | None:
        """The rest of the cached page after ``cookie``, if the page covers it."""
        if not handle.entries:
            return None
        if cookie == handle.after_cookie:
            return handle.entries
        for position, entry in enumerate(handle.entries):
            if entry.cookie == cookie:
                rest = handle.entries[position + 1 :]
                return rest or None
        return None

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Nothing to do: a namespace change is durable (fsynced by a quorum) when it
        returns."""

    # ------------------------------------------------------------ the rest

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Capacity as the live dataservers report it (raw bytes, all replicas),
        inodes as the namespace counts them."""
        counters, space = await self.client.statfs(self._credentials(ctx))
        data = pyfuse3.StatvfsData()
        if space is None:
            log.warning("statfs: the leader reports no space; showing none")
            space = Space(0, 0, 0, 0)
        data.f_bsize = BLOCK_SIZE_BYTES
        data.f_frsize = BLOCK_SIZE_BYTES
        data.f_blocks = space.capacity_bytes // BLOCK_SIZE_BYTES
        data.f_bfree = space.available_bytes // BLOCK_SIZE_BYTES
        data.f_bavail = data.f_bfree
        data.f_files = counters.inodes_max
        data.f_ffree = max(0, counters.inodes_max - counters.inodes)
        data.f_favail = data.f_ffree
        data.f_namemax = counters.name_max
        return data

    @_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        """ERANGE, EOPNOTSUPP (unknown namespace), E2BIG, EPERM, ENOSPC (pyfuse3 checks
        XATTR_CREATE / XATTR_REPLACE through getxattr first)."""
        _refuse_acl(name)
        try:
            await self.client.meta.mutate(
                SetXattr(InodeId(inode), name, value, 0), self._credentials(ctx)
            )
        finally:
            self.entries.changed(InodeId(inode))

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """ENODATA when absent (answered here while :class:`EntryCache` knows it is)."""
        _refuse_acl(name)
        asked_at_s = time.monotonic()
        if self.entries.xattr_absent(InodeId(inode), name, asked_at_s):
            raise pyfuse3.FUSEError(errno.ENODATA)
        stamp = self.entries.stamp()
        try:
            reply = await self.client.meta.query(
                GetXattr(InodeId(inode), name), self._credentials(ctx)
            )
        except RpcError as error:
            if error.code == errno.ENODATA:
                self.entries.add_xattr_absent(InodeId(inode), name, stamp, asked_at_s)
            raise
        value: bytes = reply.value
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        stamp = self.entries.stamp()
        asked_at_s = time.monotonic()
        reply = await self.client.meta.query(ListXattr(InodeId(inode)), self._credentials(ctx))
        if not reply.names:
            self.entries.add_xattr_absent(InodeId(inode), None, stamp, asked_at_s)
        return list(reply.names)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENODATA when absent."""
        _refuse_acl(name)
        try:
            await self.client.meta.mutate(RemoveXattr(InodeId(inode), name), self._credentials(ctx))
        finally:
            self.entries.changed(InodeId(inode))

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Only called without ``default_permissions``: the classic owner/group/other
        check against the namespace's attributes (root passes all but exec-by-nobody)."""
        credentials = self._credentials(ctx)
        reply = await self.client.meta.query(GetAttr(InodeId(inode)), credentials)
        return may_access(reply.attr, credentials, mode)

    # ------------------------------------------------------------ shutdown

    async def release_all(self) -> None:
        """After ``main()`` returned: publish and give back every open still held, and
        forget every kernel reference."""
        for fh in list(self._files):
            await self.release(fh)
        self._dirs.clear()
        self.lookups.clear()
        self._cache_stamps.clear()


def _refuse_acl(name: bytes) -> None:
    """POSIX ACLs are not supported: without FUSE_CAP_POSIX_ACL the kernel hands their
    xattrs to us, and storing them would make ``cp -a`` and ``setfacl`` believe the mode
    was set through an ACL.  EOPNOTSUPP makes them fall back to chmod."""
    if name in ACL_XATTRS:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)


def may_access(attr: Attr, credentials: Credentials, mode: int) -> bool:
    """access(2) semantics for ``mode`` (a mask of R_OK, W_OK, X_OK)."""
    if credentials.uid == 0:
        return not mode & os.X_OK or bool(attr.mode & 0o111) or stat.S_ISDIR(attr.mode)
    if attr.uid == credentials.uid:
        bits = (attr.mode >> 6) & 7
    elif attr.gid == credentials.gid or attr.gid in credentials.groups:
        bits = (attr.mode >> 3) & 7
    else:
        bits = attr.mode & 7
    return mode & bits == mode
