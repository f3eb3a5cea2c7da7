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
from fuse_client.entry_cache import EntryCache
from fuse_client.file_client import FileClient, FileIoError, OpenFile, errno_of
from wire.config import MountSettings
from wire.data_ops import Space
from wire.errors import RpcError
from wire.framing import Payload
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


STATAHEAD_ENTRIES_MAX = 8192
"""A directory is listed ahead up to this many entries (about 30 µs an entry for the
client; a scan of a larger one pays a lookup per name)."""
STATAHEAD_QUEUE_MAX = 16
"""Directories waiting to be listed ahead; more requests are dropped (only an
optimisation is lost)."""
STATAHEAD_WAIT_S = 0.5
"""How long a lookup the cache cannot answer waits for the listing of its directory
under way to bring the name (a page of 1024 entries takes tens of milliseconds) before
asking the namespace itself."""


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
        self,
        parent: int,
        name: bytes,
        attr: Attr,
        parent_attr: Attr | None,
        stamp: int,
        asked_at_s: float,
        *,
        new_inode: bool = True,
    ) -> pyfuse3.EntryAttributes:
        """``name`` was made in ``parent`` as ``attr``, which left the directory as
        ``parent_attr`` (the change was sent after ``stamp`` and ``asked_at_s``): cache
        both (so the kernel's next GETATTR of the directory needs no round trip), count
        the reference."""
        answered = () if parent_attr is None else (parent_attr,)
        parent_attrs = self.entries.unchanged_since(stamp, answered)
        self.entries.added(InodeId(parent), name, attr, asked_at_s, new_inode=new_inode)
        self._dirs_changed(parent_attrs, asked_at_s)
        return self._remember(attr)

    def _dirs_changed(self, dir_attrs: list[Attr], asked_at_s: float) -> None:
        """Cache the attributes a change made here answered with, for the directories
        :meth:`EntryCache.unchanged_since` kept (the change itself is recorded)."""
        for attr in dir_attrs:
            self.entries.add_attr(attr, self.entries.stamp(), asked_at_s)

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
        dots = name in (b".", b"..")
        if cached is None and not dots and (listing := self._listings.get(parent)) is not None:
            cached = await self._await_listing(parent, name, listing)
            asked_at_s = time.monotonic()
        if cached is not None:
            attr, entry_left_s, attr_left_s = cached
            return self._remember(attr, entry_left_s, attr_left_s)
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
        stamp = self.entries.stamp()
        with self._changing(parent_inode):
            reply = await self.client.meta.mutate(
                Mknod(InodeId(parent_inode), name, mode, rdev), self._credentials(ctx)
            )
        return self._made(parent_inode, name, reply.attr, reply.parent, stamp, asked_at_s)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EEXIST, ENOENT, ENOTDIR, ENAMETOOLONG, ENOSPC."""
        asked_at_s = time.monotonic()
        stamp = self.entries.stamp()
        with self._changing(parent_inode):
            reply = await self.client.meta.mutate(
                Mkdir(InodeId(parent_inode), name, mode), self._credentials(ctx)
            )
        return self._made(parent_inode, name, reply.attr, reply.parent, stamp, asked_at_s)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENOENT, EISDIR, EPERM (sticky); an open file lives on until released."""
        asked_at_s = time.monotonic()
        stamp = self.entries.stamp()
        dir_attrs: list[Attr] = []
        try:
            reply = await self.client.meta.mutate(
                Unlink(InodeId(parent_inode), name), self._credentials(ctx)
            )
            dir_attrs = self.entries.unchanged_since(stamp, reply.dirs)
        finally:
            self.entries.removed(InodeId(parent_inode), name)
        self._dirs_changed(dir_attrs, asked_at_s)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENOENT, ENOTDIR, ENOTEMPTY, EPERM (sticky)."""
        asked_at_s = time.monotonic()
        stamp = self.entries.stamp()
        dir_attrs: list[Attr] = []
        try:
            reply = await self.client.meta.mutate(
                Rmdir(InodeId(parent_inode), name), self._credentials(ctx)
            )
            dir_attrs = self.entries.unchanged_since(stamp, reply.dirs)
        finally:
            self.entries.removed(InodeId(parent_inode), name)
        self._dirs_changed(dir_attrs, asked_at_s)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EEXIST, ENAMETOOLONG, and the parent's errors."""
        asked_at_s = time.monotonic()
        stamp = self.entries.stamp()
        with self._changing(parent_inode):
            reply = await self.client.meta.mutate(
                Symlink(InodeId(parent_inode), name, target), self._credentials(ctx)
            )
        return self._made(parent_inode, name, reply.attr, reply.parent, stamp, asked_at_s)

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
        asked_at_s = time.monotonic()
        stamp = self.entries.stamp()
        dir_attrs: list[Attr] = []
        try:
            reply = await self.client.meta.mutate(
                Rename(
                    InodeId(parent_inode_old),
                    name_old,
                    InodeId(parent_inode_new),
                    name_new,
                    flags,
                ),
                self._credentials(ctx),
            )
            dir_attrs = self.entries.unchanged_since(stamp, reply.dirs)
        finally:
            self.entries.removed(InodeId(parent_inode_old), name_old)
            self.entries.removed(InodeId(parent_inode_new), name_new)
        self._dirs_changed(dir_attrs, asked_at_s)

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EPERM (a directory), EMLINK, EEXIST, ENOENT."""
        asked_at_s = time.monotonic()
        stamp = self.entries.stamp()
        with self._changing(new_parent_inode, inode):
            reply = await self.client.meta.mutate(
                Link(InodeId(inode), InodeId(new_parent_inode), new_name), self._credentials(ctx)
            )
        return self._made(
            new_parent_inode, new_name, reply.attr, reply.parent, stamp, asked_at_s, new_inode=False
        )

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
        stamp = self.entries.stamp()
        with self._changing(parent_inode):
            handle, made = await self.client.create(
                InodeId(parent_inode),
                name,
                stat.S_IFREG | stat.S_IMODE(mode),
                credentials,
                exclusive=bool(flags & os.O_EXCL),
            )
        attr = made.attr
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
        entry = self._made(
            parent_inode, name, attr, made.parent, stamp, asked_at_s, new_inode=new_inode
        )
        return self._file_info(fh, attr), entry

    @_handler
    async def read(self, fh: int, off: int, size: int) -> Payload:  # type: ignore[override]
        """The bytes, as the file client hands them (often a view: pyfuse3 takes any
        buffer and copies it into the reply)."""
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
