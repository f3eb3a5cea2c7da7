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
from collections.abc import Awaitable, Callable, Sequence
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

    # ------------------------------------------------------------ helpers

    def _credentials(self, ctx: pyfuse3.RequestContext) -> Credentials:
        return Credentials(ctx.uid, ctx.gid, self._groups.groups(ctx.pid))

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
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
        entry.attr_timeout = self.settings.attr_timeout_s
        entry.entry_timeout = self.settings.entry_timeout_s
        return entry

    def _remember(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """Count one kernel reference to ``attr.ino`` and return its entry."""
        self.lookups[attr.ino] = self.lookups.get(attr.ino, 0) + 1
        return self._entry(self.client.local_view(attr))

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
        """ENOENT (not cached), ENOTDIR, ENAMETOOLONG."""
        reply = await self.client.meta.query(
            Lookup(InodeId(parent_inode), name), self._credentials(ctx)
        )
        return self._remember(reply.attr)

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
        """ENOENT for an inode that is gone."""
        attr = await self.client.getattr(InodeId(inode), self._credentials(ctx))
        return self._entry(attr)

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
        result = await self.client.setattr(SetAttr(InodeId(inode), **changes), credentials)
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
        reply = await self.client.meta.mutate(
            Mknod(InodeId(parent_inode), name, mode, rdev), self._credentials(ctx)
        )
        return self._remember(reply.attr)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EEXIST, ENOENT, ENOTDIR, ENAMETOOLONG, ENOSPC."""
        reply = await self.client.meta.mutate(
            Mkdir(InodeId(parent_inode), name, mode), self._credentials(ctx)
        )
        return self._remember(reply.attr)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENOENT, EISDIR, EPERM (sticky); an open file lives on until released."""
        await self.client.meta.mutate(Unlink(InodeId(parent_inode), name), self._credentials(ctx))

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENOENT, ENOTDIR, ENOTEMPTY, EPERM (sticky)."""
        await self.client.meta.mutate(Rmdir(InodeId(parent_inode), name), self._credentials(ctx))

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EEXIST, ENAMETOOLONG, and the parent's errors."""
        reply = await self.client.meta.mutate(
            Symlink(InodeId(parent_inode), name, target), self._credentials(ctx)
        )
        return self._remember(reply.attr)

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

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """EPERM (a directory), EMLINK, EEXIST, ENOENT."""
        reply = await self.client.meta.mutate(
            Link(InodeId(inode), InodeId(new_parent_inode), new_name), self._credentials(ctx)
        )
        return self._remember(reply.attr)

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
        handle, attr = await self.client.create(
            InodeId(parent_inode),
            name,
            stat.S_IFREG | stat.S_IMODE(mode),
            credentials,
            exclusive=bool(flags & os.O_EXCL),
        )
        try:
            if flags & os.O_TRUNC and attr.size:
                attr = await handle.truncate(0)
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle.release()
            raise
        fh = self._new_fh()
        self._files[fh] = handle
        return self._file_info(fh, attr), self._remember(attr)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._file(fh).read(off, size)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Buffered; errors of the write-back surface at flush, fsync or close."""
        return await self._file(fh).write(off, buf)

    @_handler
    async def flush(self, fh: int) -> None:
        """close(2): durable on every replica and published (close-to-open)."""
        handle = self._file(fh)
        await handle.flush()

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._file(fh).fsync()

    async def release(self, fh: int) -> None:
        """Publish what is left and give the open back.  Never raises (the kernel
        discards release errors; close already reported them through flush)."""
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        try:
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
        # counts no lookup for them.
        if start_id < DOTDOT_COOKIE:
            for name, cookie in ((b".", DOT_COOKIE), (b"..", DOTDOT_COOKIE)):
                if cookie <= start_id:
                    continue
                reply = await self.client.meta.query(Lookup(handle.inode, name), handle.credentials)
                if not pyfuse3.readdir_reply(token, name, self._entry(reply.attr), cookie):
                    return
        cookie = start_id if start_id > DOTDOT_COOKIE else 0
        while True:
            entries = self._cached_entries(handle, cookie)
            if entries is None:
                reply = await self.client.meta.query(
                    ReadDir(handle.inode, cookie, READDIR_FETCH_ENTRIES), handle.credentials
                )
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
        await self.client.meta.mutate(
            SetXattr(InodeId(inode), name, value, 0), self._credentials(ctx)
        )

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """ENODATA when absent."""
        _refuse_acl(name)
        reply = await self.client.meta.query(GetXattr(InodeId(inode), name), self._credentials(ctx))
        value: bytes = reply.value
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        reply = await self.client.meta.query(ListXattr(InodeId(inode)), self._credentials(ctx))
        return list(reply.names)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """ENODATA when absent."""
        _refuse_acl(name)
        await self.client.meta.mutate(RemoveXattr(InodeId(inode), name), self._credentials(ctx))

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
