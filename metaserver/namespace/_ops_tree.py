"""Ops on the directory tree: create, link, unlink, rename, lookup, readdir, readlink.

Where several errors apply, each op reports the one Linux reports, checking in the
order of fs/namei.c (e.g. do_renameat2, vfs_rename, may_delete); the Linux function
each step mirrors is named in a comment.  Access-permission bits (rwx on directories)
are the kernel's to check (``default_permissions``); the ownership rules below are not.
"""

from __future__ import annotations

import errno
import stat

from wire.namespace_ops import (
    LINK_MAX,
    NAME_MAX_BYTES,
    OPEN_FILES_PER_SESSION_MAX,
    READDIR_PAGE_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    SYMLINK_TARGET_MAX_BYTES,
    Create,
    DirEntry,
    EntryReply,
    Link,
    Lookup,
    Mkdir,
    Mknod,
    OkReply,
    ReadDir,
    ReadDirReply,
    ReadLink,
    ReadLinkReply,
    Rename,
    Rmdir,
    Symlink,
    Unlink,
)

from ._nodes import MODE_BITS, DirNode, FileNode, Node, SpecialNode, SymlinkNode
from ._perms import in_group, sticky_forbids
from ._state import Context, OpError, State

OK = OkReply()
DOTS = (b".", b"..")
SPECIAL_TYPES = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
DEVICE_TYPES = (stat.S_IFCHR, stat.S_IFBLK)
RDEV_MAX = (1 << 32) - 1


def check_name(name: bytes) -> None:
    """EINVAL for an empty name or one with ``/`` or NUL; ENAMETOOLONG past 255 bytes."""
    if not name:
        raise OpError(errno.EINVAL)
    if len(name) > NAME_MAX_BYTES:
        raise OpError(errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name:
        raise OpError(errno.EINVAL)


def _check_new_name(parent: DirNode, name: bytes) -> None:
    # filename_create: a dot name or an existing name is EEXIST.
    if name in DOTS:
        raise OpError(errno.EEXIST)
    check_name(name)
    if name in parent.entries:
        raise OpError(errno.EEXIST)


def _new_owner(ctx: Context, parent: DirNode, mode: int) -> tuple[int, int, int]:
    """(uid, gid, mode) of a new inode: inode_init_owner and mode_strip_sgid.

    In a setgid directory the group is the directory's, a new subdirectory inherits
    S_ISGID, and a group-executable setgid file made by a non-member loses S_ISGID.
    """
    cred = ctx.cred
    if not parent.mode & stat.S_ISGID:
        return cred.uid, cred.gid, mode
    gid = parent.gid
    if stat.S_ISDIR(mode):
        mode |= stat.S_ISGID
    elif (
        mode & (stat.S_ISGID | stat.S_IXGRP) == (stat.S_ISGID | stat.S_IXGRP)
        and cred.uid != 0
        and not in_group(cred, gid)
    ):
        mode &= ~stat.S_ISGID
    return cred.uid, gid, mode


def _touch(parent: DirNode, now_ns: int) -> None:
    parent.mtime_ns = now_ns
    parent.ctime_ns = now_ns


def _link_new(state: State, ctx: Context, parent: DirNode, name: bytes, node: Node) -> EntryReply:
    state.register(node)
    parent.add_entry(name, node)
    _touch(parent, ctx.now_ns)
    return EntryReply(node.attr())


# ---------------------------------------------------------------- creation


def mknod(state: State, ctx: Context, op: Mknod) -> EntryReply:
    mode = op.mode
    if mode < 0 or mode & ~MODE_BITS:
        raise OpError(errno.EINVAL)
    kind = stat.S_IFMT(mode) or stat.S_IFREG
    # may_mknod runs before the path is even looked up.
    if kind == stat.S_IFDIR:
        raise OpError(errno.EPERM)
    if kind != stat.S_IFREG and kind not in SPECIAL_TYPES:
        raise OpError(errno.EINVAL)
    parent = state.directory(op.parent)
    _check_new_name(parent, op.name)
    if kind in DEVICE_TYPES and ctx.cred.uid != 0:
        raise OpError(errno.EPERM)  # vfs_mknod: CAP_MKNOD
    if not 0 <= op.rdev <= RDEV_MAX:
        raise OpError(errno.EINVAL)
    ino = state.reserve_ino()
    uid, gid, mode = _new_owner(ctx, parent, kind | (mode & 0o7777))
    node: Node
    if kind == stat.S_IFREG:
        node = FileNode(ino, mode, uid, gid, ctx.now_ns, parent.goal, parent.compress)
    else:
        device = op.rdev if kind in DEVICE_TYPES else 0
        node = SpecialNode(ino, mode, uid, gid, ctx.now_ns, parent.goal, parent.compress, device)
    return _link_new(state, ctx, parent, op.name, node)


def create(state: State, ctx: Context, op: Create) -> EntryReply:
    session = ctx.session
    assert session is not None  # only client commands reach create
    mode = op.mode
    if mode < 0 or mode & ~MODE_BITS or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise OpError(errno.EINVAL)
    parent = state.directory(op.parent)
    if op.name in DOTS:
        # do_open: an existing name with O_EXCL is EEXIST, then a directory EISDIR.
        raise OpError(errno.EEXIST if op.exclusive else errno.EISDIR)
    check_name(op.name)
    if session.open_total >= OPEN_FILES_PER_SESSION_MAX:
        raise OpError(errno.EMFILE)
    existing = parent.entries.get(op.name)
    if existing is not None:
        if op.exclusive or type(existing) is SymlinkNode:
            # A symlink would be followed by the kernel before it ever sent CREATE.
            raise OpError(errno.EEXIST)
        if type(existing) is DirNode:
            raise OpError(errno.EISDIR)
        state.add_open(session, existing)
        return EntryReply(existing.attr())
    ino = state.reserve_ino()
    uid, gid, mode = _new_owner(ctx, parent, stat.S_IFREG | (mode & 0o7777))
    node = FileNode(ino, mode, uid, gid, ctx.now_ns, parent.goal, parent.compress)
    reply = _link_new(state, ctx, parent, op.name, node)
    state.add_open(session, node)
    return reply


def mkdir(state: State, ctx: Context, op: Mkdir) -> EntryReply:
    if op.mode < 0 or op.mode & ~MODE_BITS:
        raise OpError(errno.EINVAL)
    parent = state.directory(op.parent)
    _check_new_name(parent, op.name)
    ino = state.reserve_ino()
    # vfs_mkdir keeps only rwx and sticky bits of the requested mode.
    requested = stat.S_IFDIR | (op.mode & 0o1777)
    uid, gid, mode = _new_owner(ctx, parent, requested)
    node = DirNode(ino, mode, uid, gid, ctx.now_ns, parent.goal, parent.compress, parent)
    parent.nlink += 1
    return _link_new(state, ctx, parent, op.name, node)


def symlink(state: State, ctx: Context, op: Symlink) -> EntryReply:
    target = op.target
    # getname() of the target comes first: empty is ENOENT, too long ENAMETOOLONG.
    if not target:
        raise OpError(errno.ENOENT)
    if len(target) > SYMLINK_TARGET_MAX_BYTES:
        raise OpError(errno.ENAMETOOLONG)
    if b"\0" in target:
        raise OpError(errno.EINVAL)
    parent = state.directory(op.parent)
    _check_new_name(parent, op.name)
    ino = state.reserve_ino()
    uid, gid, _ = _new_owner(ctx, parent, stat.S_IFLNK | 0o777)
    node = SymlinkNode(ino, uid, gid, ctx.now_ns, parent.goal, parent.compress, target)
    return _link_new(state, ctx, parent, op.name, node)


def link(state: State, ctx: Context, op: Link) -> EntryReply:
    node = state.node(op.inode)
    parent = state.directory(op.new_parent)
    _check_new_name(parent, op.new_name)
    # vfs_link
    if type(node) is DirNode:
        raise OpError(errno.EPERM)
    if node.nlink == 0:
        raise OpError(errno.ENOENT)
    if node.nlink >= LINK_MAX:
        raise OpError(errno.EMLINK)
    node.nlink += 1
    node.ctime_ns = ctx.now_ns
    parent.add_entry(op.new_name, node)
    _touch(parent, ctx.now_ns)
    return EntryReply(node.attr())


# ---------------------------------------------------------------- removal


def unlink(state: State, ctx: Context, op: Unlink) -> OkReply:
    parent = state.directory(op.parent)
    if op.name in DOTS:
        raise OpError(errno.EISDIR)  # do_unlinkat: not LAST_NORM
    check_name(op.name)
    node = parent.entries.get(op.name)
    if node is None:
        raise OpError(errno.ENOENT)
    # may_delete: the sticky bit first, then the type.
    if sticky_forbids(ctx.cred, parent, node):
        raise OpError(errno.EPERM)
    if type(node) is DirNode:
        raise OpError(errno.EISDIR)
    parent.remove_entry(op.name)
    _touch(parent, ctx.now_ns)
    node.ctime_ns = ctx.now_ns
    state.drop_link(node)
    return OK


def rmdir(state: State, ctx: Context, op: Rmdir) -> OkReply:
    parent = state.directory(op.parent)
    if op.name == b"..":
        raise OpError(errno.ENOTEMPTY)  # do_rmdir: LAST_DOTDOT
    if op.name == b".":
        raise OpError(errno.EINVAL)  # do_rmdir: LAST_DOT
    check_name(op.name)
    node = parent.entries.get(op.name)
    if node is None:
        raise OpError(errno.ENOENT)
    if sticky_forbids(ctx.cred, parent, node):
        raise OpError(errno.EPERM)
    if type(node) is not DirNode:
        raise OpError(errno.ENOTDIR)
    if node.entries:
        raise OpError(errno.ENOTEMPTY)
    parent.remove_entry(op.name)
    parent.nlink -= 1
    _touch(parent, ctx.now_ns)
    node.nlink = 0
    state.free(node)
    return OK


def _is_ancestor(ancestor: DirNode, node: DirNode) -> bool:
    """Whether ``ancestor`` is ``node`` or lies on its path to the root."""
    while True:
        if node is ancestor:
            return True
        parent = node.parent
        if parent is node:
            return False
        node = parent


def rename(state: State, ctx: Context, op: Rename) -> OkReply:
    flags = op.flags
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
        raise OpError(errno.EINVAL)
    if flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT):
        raise OpError(errno.EINVAL)
    if flags & RENAME_WHITEOUT:
        raise OpError(errno.EINVAL)  # no whiteouts: no overlayfs upper layer here
    exchange = bool(flags & RENAME_EXCHANGE)
    old_parent = state.directory(op.old_parent)
    new_parent = state.directory(op.new_parent)
    if op.old_name in DOTS:
        raise OpError(errno.EBUSY)
    if op.new_name in DOTS:
        raise OpError(errno.EEXIST if flags & RENAME_NOREPLACE else errno.EBUSY)
    check_name(op.old_name)
    source = old_parent.entries.get(op.old_name)
    if source is None:
        raise OpError(errno.ENOENT)
    check_name(op.new_name)
    target = new_parent.entries.get(op.new_name)
    if target is not None and flags & RENAME_NOREPLACE:
        raise OpError(errno.EEXIST)
    if target is None and exchange:
        raise OpError(errno.ENOENT)
    if old_parent is not new_parent:
        # lock_rename's trap: neither may be an ancestor of the other's parent.
        if type(source) is DirNode and _is_ancestor(source, new_parent):
            raise OpError(errno.EINVAL)
        if type(target) is DirNode and _is_ancestor(target, old_parent):
            raise OpError(errno.EINVAL if exchange else errno.ENOTEMPTY)
    if source is target:
        return OK  # two names of one inode: rename(2) does nothing and succeeds
    cred = ctx.cred
    if sticky_forbids(cred, old_parent, source):
        raise OpError(errno.EPERM)
    if target is not None:
        if sticky_forbids(cred, new_parent, target):
            raise OpError(errno.EPERM)
        if not exchange:
            if type(source) is DirNode:
                if type(target) is not DirNode:
                    raise OpError(errno.ENOTDIR)
                if target.entries:
                    raise OpError(errno.ENOTEMPTY)
            elif type(target) is DirNode:
                raise OpError(errno.EISDIR)
    now = ctx.now_ns
    if exchange:
        assert target is not None
        _exchange(old_parent, op.old_name, source, new_parent, op.new_name, target)
        target.ctime_ns = now
    else:
        _move(state, old_parent, op.old_name, source, new_parent, op.new_name, target, now)
    source.ctime_ns = now
    _touch(old_parent, now)
    _touch(new_parent, now)
    return OK


def _move(
    state: State,
    old_parent: DirNode,
    old_name: bytes,
    source: Node,
    new_parent: DirNode,
    new_name: bytes,
    target: Node | None,
    now_ns: int,
) -> None:
    if target is None:
        new_parent.add_entry(new_name, source)
    else:
        new_parent.entries[new_name] = source  # same name: its cookie is unchanged
    old_parent.remove_entry(old_name)
    if type(source) is DirNode:
        source.parent = new_parent
        if old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
    if target is not None:
        target.ctime_ns = now_ns
        if type(target) is DirNode:
            new_parent.nlink -= 1
            target.nlink = 0
            state.free(target)
        else:
            state.drop_link(target)


def _exchange(
    old_parent: DirNode,
    old_name: bytes,
    source: Node,
    new_parent: DirNode,
    new_name: bytes,
    target: Node,
) -> None:
    old_parent.entries[old_name] = target
    new_parent.entries[new_name] = source
    if old_parent is new_parent:
        return
    if type(source) is DirNode:
        source.parent = new_parent
        old_parent.nlink -= 1
        new_parent.nlink += 1
    if type(target) is DirNode:
        target.parent = old_parent
        new_parent.nlink -= 1
        old_parent.nlink += 1


# ---------------------------------------------------------------- reading


def lookup(state: State, ctx: Context, op: Lookup) -> EntryReply:
    parent = state.directory(op.parent)
    name = op.name
    if name == b".":
        return EntryReply(parent.attr())
    if name == b"..":
        return EntryReply(parent.parent.attr())
    check_name(name)
    node = parent.entries.get(name)
    if node is None:
        raise OpError(errno.ENOENT)
    return EntryReply(node.attr())


def readdir(state: State, ctx: Context, op: ReadDir) -> ReadDirReply:
    directory = state.directory(op.inode)
    if op.cookie < 0 or op.limit < 1:
        raise OpError(errno.EINVAL)
    page, eof = directory.cookie_index().page_after(op.cookie, min(op.limit, READDIR_PAGE_MAX))
    entries = directory.entries
    return ReadDirReply(
        tuple(DirEntry(name, cookie, entries[name].attr()) for cookie, name in page), eof
    )


def readlink(state: State, ctx: Context, op: ReadLink) -> ReadLinkReply:
    node = state.node(op.inode)
    if type(node) is not SymlinkNode:
        raise OpError(errno.EINVAL)
    return ReadLinkReply(node.target)
