"""Ops on attributes: getattr, setattr, extended attributes, replication goal, statfs.

The ownership checks follow fs/attr.c (setattr_prepare, notify_change) and the xattr
checks fs/xattr.c (xattr_permission, xattr_resolve_name); see ``_perms.py``.
"""

from __future__ import annotations

import errno
import stat

from wire.namespace_ops import (
    GOAL_MAX,
    NAME_MAX_BYTES,
    XATTR_CREATE,
    XATTR_INODE_MAX_BYTES,
    XATTR_LIST_MAX_BYTES,
    XATTR_NAME_MAX_BYTES,
    XATTR_REPLACE,
    XATTR_VALUE_MAX_BYTES,
    AttrReply,
    GetAttr,
    GetXattr,
    ListXattr,
    OkReply,
    RemoveXattr,
    SetAttr,
    SetGoal,
    SetXattr,
    StatFs,
    StatFsReply,
    XattrListReply,
    XattrReply,
)

from ._nodes import CHUNK_FIELDS, MODE_BITS, DirNode, FileNode, Node, SymlinkNode
from ._perms import in_group, may_write, owns, privileges_to_drop
from ._state import ID_MAX, INT64_MAX, INT64_MIN, Context, OpError, State

OK = OkReply()
SET_ID_BITS = stat.S_ISUID | stat.S_ISGID
USER_PREFIX = b"user."
TRUSTED_PREFIX = b"trusted."
SECURITY_PREFIX = b"security."
SYSTEM_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
"""The only system.* attributes Linux file systems keep (POSIX ACLs, opaque here)."""
NAMESPACE_PREFIXES = (USER_PREFIX, TRUSTED_PREFIX, SECURITY_PREFIX, b"system.")


def getattr_op(state: State, ctx: Context, op: GetAttr) -> AttrReply:
    return AttrReply(state.node(op.inode).attr())


# ---------------------------------------------------------------- setattr


def _check_time(value: int | None, now: bool) -> None:
    if value is not None and (now or not INT64_MIN <= value <= INT64_MAX):
        raise OpError(errno.EINVAL)


def _is_privilege_drop(node: Node, mode: int) -> bool:
    """``mode`` only clears S_ISUID/S_ISGID of a regular file (or changes nothing).

    The FUSE kernel module asks the file system to drop those bits after a write or
    truncate by any writer, as a SETATTR of the mode: that must succeed for a non-owner.
    """
    old = node.mode & 0o7777
    new = mode & 0o7777
    return type(node) is FileNode and new & ~old == 0 and (old ^ new) & ~SET_ID_BITS == 0


def setattr(state: State, ctx: Context, op: SetAttr) -> AttrReply:
    node = state.node(op.inode)
    cred = ctx.cred
    size = op.size
    if size is not None:
        if size < 0:
            raise OpError(errno.EINVAL)
        if type(node) is not FileNode:
            raise OpError(errno.EISDIR if type(node) is DirNode else errno.EINVAL)
        if size > state.config.max_file_size_bytes:
            raise OpError(errno.EFBIG)  # inode_newsize_ok
    uid, gid, mode = op.uid, op.gid, op.mode
    # setattr_prepare: chown_ok, chgrp_ok, then chmod, then times.
    if uid is not None:
        if not 0 <= uid <= ID_MAX:
            raise OpError(errno.EINVAL)
        if cred.uid != 0 and not (cred.uid == node.uid and uid == node.uid):
            raise OpError(errno.EPERM)
    if gid is not None:
        if not 0 <= gid <= ID_MAX:
            raise OpError(errno.EINVAL)
        if cred.uid != 0 and not (
            cred.uid == node.uid and (gid == node.gid or in_group(cred, gid))
        ):
            raise OpError(errno.EPERM)
    if mode is not None:
        if mode < 0 or mode & ~MODE_BITS or stat.S_IFMT(mode) not in (0, stat.S_IFMT(node.mode)):
            raise OpError(errno.EINVAL)
        if type(node) is SymlinkNode:
            raise OpError(errno.EOPNOTSUPP)  # fchmodat(AT_SYMLINK_NOFOLLOW)
        if not owns(cred, node) and not _is_privilege_drop(node, mode):
            raise OpError(errno.EPERM)
    _check_time(op.atime_ns, op.atime_now)
    _check_time(op.mtime_ns, op.mtime_now)
    touch = op.atime_now and op.mtime_now
    explicit = op.atime_ns is not None or op.mtime_ns is not None or op.atime_now or op.mtime_now
    if touch and not owns(cred, node) and not may_write(cred, node):
        raise OpError(errno.EACCES)  # utimes(NULL) needs ownership or write permission
    if explicit and not touch and not owns(cred, node):
        raise OpError(errno.EPERM)
    chown = uid is not None or gid is not None
    if size is None and mode is None and not chown and not explicit:
        return AttrReply(node.attr())

    now = ctx.now_ns
    new_mode = node.mode
    if mode is not None:
        permissions = mode & 0o7777
        group = node.gid if gid is None else gid
        if cred.uid != 0 and not in_group(cred, group):
            permissions &= ~stat.S_ISGID
        new_mode = stat.S_IFMT(node.mode) | permissions
    if chown and type(node) is not DirNode:
        # chown_common: S_ISUID always goes, S_ISGID as setattr_should_drop_sgid says.
        drop = stat.S_ISUID
        if node.mode & stat.S_ISGID and (
            node.mode & stat.S_IXGRP or (cred.uid != 0 and not in_group(cred, node.gid))
        ):
            drop |= stat.S_ISGID
        new_mode &= ~drop
    if size is not None:
        assert type(node) is FileNode
        new_mode &= ~privileges_to_drop(cred, node)
        resize(state, node, size)
        node.mtime_ns = now
    node.mode = new_mode
    if uid is not None:
        node.uid = uid
    if gid is not None:
        node.gid = gid
    if op.atime_now:
        node.atime_ns = now
    elif op.atime_ns is not None:
        node.atime_ns = op.atime_ns
    if op.mtime_now:
        node.mtime_ns = now
    elif op.mtime_ns is not None:
        node.mtime_ns = op.mtime_ns
    node.ctime_ns = now
    return AttrReply(node.attr())


def resize(state: State, node: FileNode, size: int) -> None:
    """Truncate or extend: chunks wholly past ``size`` are dropped, the last one cut."""
    if size < node.file_size and node.chunks is not None:
        chunk_size = state.chunk_size
        first_dropped = -(-size // chunk_size)
        position = node.chunk_position(first_dropped)
        state.drop_chunks(node, position)
        chunks = node.chunks
        if chunks is not None and position > 0:
            offset = (position - 1) * CHUNK_FIELDS
            keep = size - chunks[offset] * chunk_size
            if chunks[offset + 3] > keep:
                state.set_chunk_length(node, offset, keep)
    node.file_size = size


# ---------------------------------------------------------------- xattrs


def _xattr_name(name: bytes) -> bytes:
    """Check an xattr name; return its namespace prefix."""
    if not name or len(name) > XATTR_NAME_MAX_BYTES:
        raise OpError(errno.ERANGE)
    if b"\0" in name:
        raise OpError(errno.EINVAL)
    for prefix in NAMESPACE_PREFIXES:
        if name.startswith(prefix):
            return prefix
    return b""


def _resolve_handler(name: bytes, prefix: bytes) -> None:
    """xattr_resolve_name: unknown namespaces are EOPNOTSUPP, a bare prefix EINVAL."""
    if not prefix or (prefix == b"system." and name not in SYSTEM_NAMES):
        raise OpError(errno.EOPNOTSUPP)
    if len(name) == len(prefix):
        raise OpError(errno.EINVAL)


def _xattr_permission(ctx: Context, node: Node, prefix: bytes, write: bool) -> None:
    """xattr_permission: trusted.* is root's; user.* lives on files and directories
    only, and on a sticky directory only its owner may write it."""
    denied = errno.EPERM if write else errno.ENODATA
    if prefix == TRUSTED_PREFIX and ctx.cred.uid != 0:
        raise OpError(denied)
    if prefix == USER_PREFIX:
        kind = type(node)
        if kind is not FileNode and kind is not DirNode:
            raise OpError(denied)
        if write and kind is DirNode and node.mode & stat.S_ISVTX and not owns(ctx.cred, node):
            raise OpError(errno.EPERM)


def setxattr(state: State, ctx: Context, op: SetXattr) -> OkReply:
    node = state.node(op.inode)
    if op.flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise OpError(errno.EINVAL)
    prefix = _xattr_name(op.name)
    if len(op.value) > XATTR_VALUE_MAX_BYTES:
        raise OpError(errno.E2BIG)
    _xattr_permission(ctx, node, prefix, write=True)
    _resolve_handler(op.name, prefix)
    xattrs = node.xattrs or {}
    old = xattrs.get(op.name)
    if old is None and op.flags & XATTR_REPLACE:
        raise OpError(errno.ENODATA)
    if old is not None and op.flags & XATTR_CREATE:
        raise OpError(errno.EEXIST)
    if old is None:
        listed = sum(len(name) + 1 for name in xattrs) + len(op.name) + 1
        stored = sum(len(name) + len(value) for name, value in xattrs.items())
        if listed > XATTR_LIST_MAX_BYTES or stored + len(op.name) + len(op.value) > (
            XATTR_INODE_MAX_BYTES
        ):
            raise OpError(errno.ENOSPC)
    else:
        stored = sum(len(name) + len(value) for name, value in xattrs.items())
        if stored - len(old) + len(op.value) > XATTR_INODE_MAX_BYTES:
            raise OpError(errno.ENOSPC)
    if node.xattrs is None:
        node.xattrs = xattrs
    xattrs[op.name] = op.value
    node.ctime_ns = ctx.now_ns
    return OK


def getxattr(state: State, ctx: Context, op: GetXattr) -> XattrReply:
    node = state.node(op.inode)
    prefix = _xattr_name(op.name)
    _xattr_permission(ctx, node, prefix, write=False)
    _resolve_handler(op.name, prefix)
    value = None if node.xattrs is None else node.xattrs.get(op.name)
    if value is None:
        raise OpError(errno.ENODATA)
    return XattrReply(value)


def listxattr(state: State, ctx: Context, op: ListXattr) -> XattrListReply:
    node = state.node(op.inode)
    if node.xattrs is None:
        return XattrListReply(())
    hide_trusted = ctx.cred.uid != 0
    return XattrListReply(
        tuple(
            sorted(
                name
                for name in node.xattrs
                if not (hide_trusted and name.startswith(TRUSTED_PREFIX))
            )
        )
    )


def removexattr(state: State, ctx: Context, op: RemoveXattr) -> OkReply:
    node = state.node(op.inode)
    prefix = _xattr_name(op.name)
    _xattr_permission(ctx, node, prefix, write=True)
    _resolve_handler(op.name, prefix)
    xattrs = node.xattrs
    if xattrs is None or op.name not in xattrs:
        raise OpError(errno.ENODATA)
    del xattrs[op.name]
    if not xattrs:
        node.xattrs = None
    node.ctime_ns = ctx.now_ns
    return OK


# ---------------------------------------------------------------- goal and statfs


def setgoal(state: State, ctx: Context, op: SetGoal) -> AttrReply:
    node = state.node(op.inode)
    if not owns(ctx.cred, node):
        raise OpError(errno.EPERM)
    goal = op.goal
    if goal is not None and not 1 <= goal <= GOAL_MAX:
        raise OpError(errno.EINVAL)
    if goal is not None and goal != node.goal:
        if type(node) is FileNode:
            state.replicated_bytes += node.stored_bytes() * (goal - node.goal)
        node.goal = goal
    if op.compress is not None:
        node.compress = op.compress
    return AttrReply(node.attr())


def statfs(state: State, ctx: Context, op: StatFs) -> StatFsReply:
    return StatFsReply(
        inodes=len(state.inodes),
        inodes_max=state.config.inodes_max,
        files=state.files,
        directories=state.directories,
        chunks=state.chunk_count,
        chunk_bytes=state.chunk_bytes,
        replicated_bytes=state.replicated_bytes,
        open_unlinked=state.open_unlinked,
        deletion_queue=len(state.deletions),
        sessions=len(state.sessions),
        chunk_size=state.chunk_size,
        name_max=NAME_MAX_BYTES,
    )
