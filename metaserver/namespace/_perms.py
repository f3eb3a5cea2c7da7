"""Ownership rules the kernel leaves to the file system, decided from the caller's
credentials in the command.  uid 0 holds every capability (CAP_CHOWN, CAP_FOWNER,
CAP_FSETID)."""

from __future__ import annotations

import stat

from wire.namespace_ops import Credentials

from ._nodes import DirNode, Node


def in_group(cred: Credentials, gid: int) -> bool:
    """in_group_p: ``gid`` is the caller's group or one of its supplementary groups."""
    return cred.gid == gid or gid in cred.groups


def owns(cred: Credentials, node: Node) -> bool:
    """inode_owner_or_capable."""
    return cred.uid == 0 or cred.uid == node.uid


def sticky_forbids(cred: Credentials, directory: DirNode, node: Node) -> bool:
    """check_sticky: in a sticky directory only the entry's owner, the directory's owner
    or root may remove or rename an entry."""
    return bool(
        directory.mode & stat.S_ISVTX
        and cred.uid != 0
        and cred.uid != node.uid
        and cred.uid != directory.uid
    )


def may_write(cred: Credentials, node: Node) -> bool:
    """Write permission from the mode bits (generic_permission, MAY_WRITE)."""
    if cred.uid == 0:
        return True
    if cred.uid == node.uid:
        return bool(node.mode & stat.S_IWUSR)
    if in_group(cred, node.gid):
        return bool(node.mode & stat.S_IWGRP)
    return bool(node.mode & stat.S_IWOTH)


def privileges_to_drop(cred: Credentials, node: Node) -> int:
    """The S_ISUID/S_ISGID bits a write or truncate by ``cred`` clears from a regular file
    (setattr_should_drop_suidgid): none for root; S_ISUID always; S_ISGID when the file
    is group-executable or the writer is not in its group."""
    mode = node.mode
    if cred.uid == 0 or not stat.S_ISREG(mode):
        return 0
    drop = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not in_group(cred, node.gid)):
        drop |= stat.S_ISGID
    return drop
