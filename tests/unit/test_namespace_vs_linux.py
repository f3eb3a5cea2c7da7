"""The namespace against Linux: Hypothesis runs random operation sequences on the state
machine and on a real directory of this machine's file system, and compares every
result (errnos included) and, after every step, the whole tree.

The part that maps: names, types, modes, owners, link counts, sizes, symlink targets,
user xattrs, which names share an inode, whether each op changed the mtime and the ctime
of the inodes it names and of their parents (compared as booleans: the clocks differ;
atimes are left out, Linux updates them as relatime/noatime says), O_CREAT/O_EXCL
opens, and files kept open across their unlink (nlink 0, still readable).  Directory
sizes differ by design.  Paths through symlinks are never used (the kernel would
follow them; the namespace receives already-resolved parents).

``MultiUser`` additionally switches the test process's effective uid, gid and groups
(needs root) to check the ownership rules against the kernel: sticky directories,
chown/chgrp, chmod, setgid inheritance (mknod, mkdir, O_CREAT), utimes, hard links,
the setuid/setgid clearing of a write or truncate by a non-root writer, and rename
with RENAME_NOREPLACE/RENAME_EXCHANGE.  Its directories are always world-writable,
because permission bits are the kernel's to enforce, not the namespace's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from metaserver.namespace import Namespace, NamespaceConfig
from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Create,
    Credentials,
    GetAttr,
    GetXattr,
    Link,
    ListXattr,
    Lookup,
    Mkdir,
    Mknod,
    NsError,
    Open,
    ReadLink,
    Release,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    StatFs,
    Symlink,
    Unlink,
)

from .test_namespace_support import SMALL_CHUNK, Client, errname, seed_from_environment

AT_FDCWD = -100
libc = ctypes.CDLL(None, use_errno=True)
NAMES = [b"a", b"b", b"c", b".", b"..", b"n" * 256]
PLAIN_NAMES = [b"a", b"b", b"c"]
OPEN_HANDLES_MAX = 3
"""Files the comparison keeps open at once (real descriptors and namespace opens)."""
Path = tuple[bytes, ...]


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def real_outcome(action: Callable[[], Any]) -> int:
    """0 if ``action`` succeeded, else its errno."""
    try:
        action()
    except OSError as error:
        return error.errno or -1
    return 0


def ns_outcome(reply: Any) -> int:
    return reply.errno if isinstance(reply, NsError) else 0


def same(real: int, ours: int, what: str) -> None:
    assert real == ours, f"{what}: Linux says {errname(real)}, namespace {errname(ours)}"


class LinuxComparison(RuleBasedStateMachine):
    """Operations as the current (root) user; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.previous_umask = os.umask(0)
        self.top = tempfile.mkdtemp(prefix="paxfs-ns-vs-linux-").encode()
        os.chmod(self.top, 0o755)
        self.client = Client(
            Namespace(NamespaceConfig(chunk_size_bytes=SMALL_CHUNK, root_mode=0o755)),
            self.caller(),
        )
        self.client.ok(SetAttr(InodeId(ROOT_INODE), uid=os.geteuid(), gid=os.getegid()))
        # Files held open: (real descriptor, namespace inode).
        self.handles: list[tuple[int, InodeId]] = []

    def teardown(self) -> None:
        for descriptor, _ in self.handles:
            os.close(descriptor)
        shutil.rmtree(self.top, ignore_errors=True)
        os.umask(self.previous_umask)

    def caller(self) -> Credentials:
        return Credentials(os.geteuid(), os.getegid(), tuple(os.getgroups()))

    # ---------------------------------------------------------------- paths

    def real(self, path: Path, name: bytes | None = None) -> bytes:
        parts = (*path, name) if name is not None else path
        return os.path.join(self.top, *parts) if parts else self.top

    def ino(self, path: Path) -> InodeId:
        ino = InodeId(ROOT_INODE)
        for part in path:
            ino = self.client.lookup(part, ino).ino
        return ino

    def try_ino(self, path: Path) -> InodeId | None:
        """The inode at ``path`` in the namespace, or None where the path fails."""
        ino = InodeId(ROOT_INODE)
        for part in path:
            reply = self.client.query(Lookup(ino, part), self.caller())
            if isinstance(reply, NsError):
                return None
            ino = reply.attr.ino
        return ino

    def our_times(self, ino: InodeId) -> tuple[int, int] | None:
        reply = self.client.query(GetAttr(ino), self.caller())
        return None if isinstance(reply, NsError) else (reply.attr.mtime_ns, reply.attr.ctime_ns)

    @contextmanager
    def watching(self, *paths: Path) -> Iterator[None]:
        """Check that the body changes the mtime and the ctime of the inodes at ``paths``
        (followed by identity, not by name, through renames and unlinks) in Linux exactly
        when it changes them in the namespace.

        The stat before the op makes the kernel's next timestamp of that inode fine-grained
        (multigrain timestamps), so that a change within one clock tick still shows.
        """
        watched: list[tuple[Path, int, InodeId, tuple[int, int], tuple[int, int]]] = []
        try:
            for path in dict.fromkeys(paths):
                if any(part in (b".", b"..") for part in path):
                    continue
                ino = self.try_ino(path)
                ours = None if ino is None else self.our_times(ino)
                if ino is None or ours is None:
                    continue
                try:
                    descriptor = os.open(self.real(path), os.O_PATH | os.O_NOFOLLOW)
                except OSError:
                    continue
                info = os.fstat(descriptor)
                watched.append((path, descriptor, ino, (info.st_mtime_ns, info.st_ctime_ns), ours))
            yield
            for path, descriptor, ino, real_before, ours_before in watched:
                ours_after = self.our_times(ino)
                if ours_after is None:
                    continue  # freed in the namespace: nothing left to compare
                info = os.fstat(descriptor)
                real_after = (info.st_mtime_ns, info.st_ctime_ns)
                real_changed = [
                    before != after for before, after in zip(real_before, real_after, strict=True)
                ]
                our_changed = [
                    before != after for before, after in zip(ours_before, ours_after, strict=True)
                ]
                assert real_changed == our_changed, (
                    f"{path}: (mtime, ctime) changed in Linux {real_changed}, "
                    f"in the namespace {our_changed}"
                )
        finally:
            for _, descriptor, _, _, _ in watched:
                os.close(descriptor)

    def walk(self) -> list[Path]:
        """Every path in the namespace, parents first (no symlink is descended)."""
        paths: list[Path] = [()]
        for path in paths:
            if stat.S_ISDIR(self.client.attr(self.ino(path)).mode):
                paths.extend((*path, name) for name in sorted(self.client.names(self.ino(path))))
        return paths

    def parents(self) -> list[Path]:
        """Paths that may serve as a parent: anything but a symlink (ENOTDIR checks)."""
        return [p for p in self.walk() if not stat.S_ISLNK(self.client.attr(self.ino(p)).mode)]

    def draw_parent(self, data: st.DataObject) -> Path:
        """Mostly a directory with entries (where ops can succeed), else any parent."""
        parents = self.parents()
        full = [p for p in parents if self.client.attr(self.ino(p)).size > 0]
        choices = st.sampled_from(parents)
        if full:
            choices = st.one_of(st.sampled_from(full), choices)
        return data.draw(choices, label="parent")

    def draw_name(self, data: st.DataObject, parent: Path, names: list[bytes]) -> bytes:
        """A name in ``parent``: often one that exists there, so that ops succeed."""
        ino = self.ino(parent)
        present = sorted(self.client.names(ino)) if stat.S_ISDIR(self.client.attr(ino).mode) else []
        return data.draw(st.sampled_from(present + names), label="name")

    def draw_existing(self, data: st.DataObject, kinds: tuple[int, ...] | None = None) -> Path:
        paths = [
            p
            for p in self.walk()[1:]
            if kinds is None or stat.S_IFMT(self.client.attr(self.ino(p)).mode) in kinds
        ]
        return data.draw(st.sampled_from(paths or [()]), label="existing")

    def run(self, op: Any) -> int:
        return ns_outcome(self.client.run(op, self.caller()))

    # ---------------------------------------------------------------- rules

    @rule(data=st.data(), name=st.sampled_from(NAMES), mode=st.sampled_from([0o755, 0o700, 0o1777]))
    def mkdir(self, data: st.DataObject, name: bytes, mode: int) -> None:
        parent = self.draw_parent(data)
        with self.watching(parent, (*parent, name)):
            real = real_outcome(lambda: os.mkdir(self.real(parent, name), mode))
            ours = self.run(Mkdir(self.ino(parent), name, mode))
        same(real, ours, f"mkdir {parent}/{name!r}")

    @rule(
        data=st.data(),
        name=st.sampled_from(NAMES),
        mode=st.sampled_from([0o644, 0o4755, 0o2755, stat.S_IFIFO | 0o600]),
    )
    def mknod(self, data: st.DataObject, name: bytes, mode: int) -> None:
        parent = self.draw_parent(data)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        with self.watching(parent, (*parent, name)):
            real = real_outcome(lambda: os.mknod(self.real(parent, name), kind | mode))
            ours = self.run(Mknod(self.ino(parent), name, kind | mode))
        same(real, ours, f"mknod {name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES), points_to=st.sampled_from([b"t", b"../x"]))
    def symlink(self, data: st.DataObject, name: bytes, points_to: bytes) -> None:
        parent = self.draw_parent(data)
        with self.watching(parent, (*parent, name)):
            real = real_outcome(lambda: os.symlink(points_to, self.real(parent, name)))
            ours = self.run(Symlink(self.ino(parent), name, points_to))
        same(real, ours, f"symlink {name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def link(self, data: st.DataObject, name: bytes) -> None:
        source = self.draw_existing(data)
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        if source == ():
            return
        with self.watching(source, parent, (*parent, name)):
            real = real_outcome(
                lambda: os.link(self.real(source), self.real(parent, name), follow_symlinks=False)
            )
            ours = self.run(Link(self.ino(source), self.ino(parent), name))
        same(real, ours, f"link {source} -> {parent}/{name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def unlink(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        with self.watching(parent, (*parent, name)):
            real = real_outcome(lambda: os.unlink(self.real(parent, name)))
            ours = self.run(Unlink(self.ino(parent), name))
        same(real, ours, f"unlink {parent}/{name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def rmdir(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        with self.watching(parent, (*parent, name)):
            real = real_outcome(lambda: os.rmdir(self.real(parent, name)))
            ours = self.run(Rmdir(self.ino(parent), name))
        same(real, ours, f"rmdir {parent}/{name!r}")

    @rule(
        data=st.data(),
        old=st.sampled_from(NAMES),
        new=st.sampled_from(NAMES),
        flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    )
    def rename(self, data: st.DataObject, old: bytes, new: bytes, flags: int) -> None:
        source, target = self.draw_parent(data), self.draw_parent(data)
        old = self.draw_name(data, source, [old])
        new = self.draw_name(data, target, [new])
        with self.watching(source, target, (*source, old), (*target, new)):
            real = real_outcome(
                lambda: renameat2(self.real(source, old), self.real(target, new), flags)
            )
            ours = self.run(Rename(self.ino(source), old, self.ino(target), new, flags))
        same(real, ours, f"rename {source}/{old!r} -> {target}/{new!r} flags {flags}")

    @rule(data=st.data(), size=st.integers(0, 5 * SMALL_CHUNK))
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = self.draw_existing(data, (stat.S_IFREG,))
        if path == ():
            return
        with self.watching(path, path[:-1]):
            real = real_outcome(lambda: os.truncate(self.real(path), size))
            ours = self.run(SetAttr(self.ino(path), size=size))
        same(real, ours, f"truncate {path}")

    @rule(data=st.data(), offset=st.integers(0, 4 * SMALL_CHUNK), length=st.integers(1, 40))
    def write(self, data: st.DataObject, offset: int, length: int) -> None:
        path = self.draw_existing(data, (stat.S_IFREG,))
        if path == ():
            return
        with self.watching(path, path[:-1]):
            descriptor = os.open(self.real(path), os.O_WRONLY)
            try:
                os.pwrite(descriptor, b"x" * length, offset)
            finally:
                os.close(descriptor)
            self.client.write(self.ino(path), offset, length, self.caller())

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o4755, 0o2755, 0o2745, 0o1777]))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO))
        with self.watching(path, path[:-1]):
            real = real_outcome(lambda: os.chmod(self.real(path), mode))
            ours = self.run(SetAttr(self.ino(path), mode=mode))
        same(real, ours, f"chmod {path}")

    @rule(data=st.data(), uid=st.sampled_from([None, 0, 1000]), gid=st.sampled_from([None, 0, 7]))
    def chown(self, data: st.DataObject, uid: int | None, gid: int | None) -> None:
        path = self.draw_existing(data)
        if uid is None and gid is None:
            return  # chown(-1, -1) still clears S_ISUID in Linux; not a namespace op
        with self.watching(path, path[:-1]):
            real = real_outcome(
                lambda: os.chown(
                    self.real(path),
                    -1 if uid is None else uid,
                    -1 if gid is None else gid,
                    follow_symlinks=False,
                )
            )
            ours = self.run(SetAttr(self.ino(path), uid=uid, gid=gid))
        same(real, ours, f"chown {path}")

    @rule(
        data=st.data(),
        name=st.sampled_from([b"user.a", b"user.b", b"user.", b"bogus.a", b"trusted.t"]),
        value=st.sampled_from([b"", b"1", b"22"]),
        flags=st.sampled_from([0, XATTR_CREATE, XATTR_REPLACE]),
    )
    def setxattr(self, data: st.DataObject, name: bytes, value: bytes, flags: int) -> None:
        path = self.draw_existing(data)
        kept = self.client.query(GetXattr(self.ino(path), name), self.caller())
        # ext4 leaves the ctime alone when the value is the one it holds (tmpfs and the
        # namespace do not): compare times only for a real change.
        watched = () if getattr(kept, "value", None) == value else (path, path[:-1])
        with self.watching(*watched):
            real = real_outcome(
                lambda: os.setxattr(self.real(path), name, value, flags, follow_symlinks=False)
            )
            ours = self.run(SetXattr(self.ino(path), name, value, flags))
        same(real, ours, f"setxattr {path}")

    @rule(data=st.data(), name=st.sampled_from([b"user.a", b"user.b", b"bogus.a"]))
    def removexattr(self, data: st.DataObject, name: bytes) -> None:
        path = self.draw_existing(data)
        with self.watching(path, path[:-1]):
            real = real_outcome(
                lambda: os.removexattr(self.real(path), name, follow_symlinks=False)
            )
            ours = self.run(RemoveXattr(self.ino(path), name))
        same(real, ours, f"removexattr {path}")

    def keep_or_release(self, descriptor: int, ino: InodeId) -> None:
        """Hold a new open (both sides) while there is room, else close it at once."""
        if len(self.handles) < OPEN_HANDLES_MAX and stat.S_ISREG(os.fstat(descriptor).st_mode):
            self.handles.append((descriptor, ino))
            return
        os.close(descriptor)
        self.client.ok(Release(ino), self.caller())

    def open_created(self, parent: Path, name: bytes, mode: int, exclusive: bool) -> None:
        """open(O_CREAT [| O_EXCL]) in Linux beside Create in the namespace."""
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CREAT | (os.O_EXCL if exclusive else 0)
        opened: list[int] = []
        with self.watching(parent, (*parent, name)):
            real = real_outcome(
                lambda: opened.append(os.open(self.real(parent, name), flags, mode))
            )
            reply = self.client.run(Create(self.ino(parent), name, mode, exclusive), self.caller())
        same(
            real, ns_outcome(reply), f"create {parent}/{name!r} excl={exclusive} as {self.caller()}"
        )
        if opened:
            self.keep_or_release(opened[0], reply.attr.ino)

    @rule(
        data=st.data(),
        name=st.sampled_from(NAMES),
        mode=st.sampled_from([0o644, 0o2755]),
        exclusive=st.booleans(),
    )
    def create(self, data: st.DataObject, name: bytes, mode: int, exclusive: bool) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        ino = self.try_ino((*parent, name))
        if not exclusive and ino is not None and stat.S_ISLNK(self.client.attr(ino).mode):
            return  # Linux follows the symlink; FUSE would send CREATE for its target
        self.open_created(parent, name, mode, exclusive)

    @rule(data=st.data())
    def open_file(self, data: st.DataObject) -> None:
        path = self.draw_existing(data, (stat.S_IFREG,))
        if path == () or len(self.handles) >= OPEN_HANDLES_MAX:
            return
        descriptor = os.open(self.real(path), os.O_RDONLY | os.O_NOFOLLOW)
        self.client.ok(Open(self.ino(path)), self.caller())
        self.handles.append((descriptor, self.ino(path)))

    @rule(data=st.data())
    def close_file(self, data: st.DataObject) -> None:
        if not self.handles:
            return
        descriptor, ino = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1)))
        os.close(descriptor)
        self.client.ok(Release(ino), self.caller())

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def lookup(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        real = real_outcome(lambda: os.lstat(self.real(parent, name)))
        ours = ns_outcome(self.client.query(Lookup(self.ino(parent), name), self.caller()))
        same(real, ours, f"lookup {parent}/{name!r}")

    @rule(data=st.data(), name=st.sampled_from([b"user.a", b"user.zz", b"bogus.a"]))
    def getxattr(self, data: st.DataObject, name: bytes) -> None:
        path = self.draw_existing(data)
        real = real_outcome(lambda: os.getxattr(self.real(path), name, follow_symlinks=False))
        ours = ns_outcome(self.client.query(GetXattr(self.ino(path), name), self.caller()))
        same(real, ours, f"getxattr {path} {name!r}")

    # ---------------------------------------------------------------- the whole tree

    def describe_real(self) -> dict[Path, tuple[Any, ...]]:
        found: dict[Path, tuple[Any, ...]] = {}
        pending: list[Path] = [()]
        while pending:
            path = pending.pop()
            info = os.lstat(self.real(path))
            target = os.readlink(self.real(path)) if stat.S_ISLNK(info.st_mode) else None
            size = None if stat.S_ISDIR(info.st_mode) else info.st_size
            xattrs = tuple(
                sorted(
                    (name.encode(), os.getxattr(self.real(path), name, follow_symlinks=False))
                    for name in os.listxattr(self.real(path), follow_symlinks=False)
                    if name.startswith("user.")
                )
            )
            found[path] = (
                info.st_mode,
                info.st_nlink,
                info.st_uid,
                info.st_gid,
                size,
                target,
                xattrs,
                info.st_ino,
            )
            if stat.S_ISDIR(info.st_mode):
                pending.extend((*path, name) for name in os.listdir(self.real(path)))
        return found

    def describe_ours(self) -> dict[Path, tuple[Any, ...]]:
        found: dict[Path, tuple[Any, ...]] = {}
        for path in self.walk():
            ino = self.ino(path)
            attr = self.client.attr(ino)
            target = None
            if stat.S_ISLNK(attr.mode):
                target = self.client.qok(ReadLink(ino)).target
            size = None if stat.S_ISDIR(attr.mode) else attr.size
            names = self.client.qok(ListXattr(ino)).names
            xattrs = tuple(
                (name, self.client.qok(GetXattr(ino, name)).value)
                for name in names
                if name.startswith(b"user.")
            )
            found[path] = (attr.mode, attr.nlink, attr.uid, attr.gid, size, target, xattrs, ino)
        return found

    @invariant()
    def trees_agree(self) -> None:
        real, ours = self.describe_real(), self.describe_ours()
        assert sorted(real) == sorted(ours), "different names"
        for path in real:
            assert real[path][:-1] == ours[path][:-1], f"{path}: {real[path]} vs {ours[path]}"
        # Names share an inode in Linux exactly when they do in the namespace.
        real_groups = {frozenset(p for p in real if real[p][-1] == real[q][-1]) for q in real}
        our_groups = {frozenset(p for p in ours if ours[p][-1] == ours[q][-1]) for q in ours}
        assert real_groups == our_groups
        self.client.ns.verify()

    @invariant()
    def open_files_agree(self) -> None:
        """A file open in both stays readable after its last name is gone (nlink 0)."""
        unlinked: set[InodeId] = set()
        for descriptor, ino in self.handles:
            info = os.fstat(descriptor)
            attr = self.client.attr(ino)
            real = (info.st_nlink, info.st_mode, info.st_uid, info.st_gid, info.st_size)
            ours = (attr.nlink, attr.mode, attr.uid, attr.gid, attr.size)
            assert real == ours, f"open inode {ino}: Linux {real}, namespace {ours}"
            assert len(os.pread(descriptor, attr.size + 1, 0)) == attr.size
            if attr.nlink == 0:
                unlinked.add(ino)
        assert self.client.qok(StatFs()).open_unlinked == len(unlinked)


# ---------------------------------------------------------------- other users


USERS = [
    Credentials(0, 0, (0,)),
    Credentials(1000, 1000, (1000, 2000)),
    Credentials(1001, 1001, (1001, 2000)),
    Credentials(1002, 1002, (1002,)),
]


@contextmanager
def acting_as(credentials: Credentials) -> Iterator[None]:
    """Switch the effective ids of this process (root keeps its real uid to come back)."""
    groups, gid = os.getgroups(), os.getegid()
    os.setgroups(list(credentials.groups))
    os.setegid(credentials.gid)
    os.seteuid(credentials.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(gid)
        os.setgroups(groups)


class MultiUser(LinuxComparison):
    """The same comparison with a changing caller; ownership rules must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.user = USERS[0]
        os.chmod(self.top, 0o777)
        self.client.ok(SetAttr(InodeId(ROOT_INODE), mode=0o777))
        # Start from a sticky, setgid directory of one user holding files of two others,
        # where the sticky and setgid rules have something to decide.
        self.as_user(USERS[1], lambda: os.mkdir(self.real((), b"s"), 0o777))
        shared = self.as_user(USERS[1], Mkdir(InodeId(ROOT_INODE), b"s", 0o777)).attr.ino
        self.as_user(USERS[1], lambda: os.chmod(self.real((), b"s"), 0o3777))
        self.as_user(USERS[1], SetAttr(shared, mode=0o3777))
        for user, name in ((USERS[2], b"a"), (USERS[3], b"b")):
            path = self.real((b"s",), name)
            self.as_user(user, lambda path=path: os.mknod(path, 0o100666))
            self.as_user(user, Mknod(shared, name, 0o100666))

    def as_user(self, user: Credentials, action: Any) -> Any:
        """Run ``action`` (a callable on Linux, or a namespace op) as ``user``."""
        if callable(action):
            with acting_as(user):
                return action()
        return self.client.ok(action, user)

    def caller(self) -> Credentials:
        return getattr(self, "user", None) or USERS[0]

    def run(self, op: Any) -> int:
        return ns_outcome(self.client.run(op, self.caller()))

    @contextmanager
    def as_caller(self) -> Iterator[None]:
        with acting_as(self.caller()):
            yield

    @rule(user=st.sampled_from(USERS))
    def switch_user(self, user: Credentials) -> None:
        self.user = user

    # Permission bits are the kernel's: every directory stays writable for everyone and
    # no rule reads or writes file data as a non-owner.
    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES), sticky=st.booleans())
    def mkdir(self, data: st.DataObject, name: bytes, sticky: bool) -> None:  # type: ignore[override]
        parent = self.draw_parent(data)
        mode = 0o1777 if sticky else 0o777
        with self.watching(parent, (*parent, name)):
            with self.as_caller():
                real = real_outcome(lambda: os.mkdir(self.real(parent, name), mode))
            ours = self.run(Mkdir(self.ino(parent), name, mode))
        same(real, ours, f"mkdir as {self.user}")

    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES), mode=st.sampled_from([0o666, 0o6777]))
    def mknod(self, data: st.DataObject, name: bytes, mode: int) -> None:  # type: ignore[override]
        parent = self.draw_parent(data)
        with self.watching(parent, (*parent, name)):
            with self.as_caller():
                real = real_outcome(lambda: os.mknod(self.real(parent, name), stat.S_IFREG | mode))
            ours = self.run(Mknod(self.ino(parent), name, mode))
        same(real, ours, f"mknod as {self.user}")

    @rule(
        data=st.data(),
        name=st.sampled_from(PLAIN_NAMES),
        mode=st.sampled_from([0o666, 0o6777]),
        exclusive=st.booleans(),
    )
    def create(self, data: st.DataObject, name: bytes, mode: int, exclusive: bool) -> None:  # type: ignore[override]
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        ino = self.try_ino((*parent, name))
        if not exclusive and ino is not None:
            attr = self.client.attr(ino)
            # Opening an existing file is the kernel's business (permission bits, and
            # fs.protected_regular in sticky directories); only O_EXCL's EEXIST is ours.
            if stat.S_ISLNK(attr.mode) or not stat.S_ISDIR(attr.mode) and attr.uid != self.user.uid:
                return
        with self.as_caller():
            self.open_created(parent, name, mode, exclusive)

    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES))
    def link(self, data: st.DataObject, name: bytes) -> None:  # type: ignore[override]
        source = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR))
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        if source == ():
            return
        if self.user.uid not in (0, self.client.attr(self.ino(source)).uid):
            return  # fs.protected_hardlinks: the kernel's check (may_linkat), not ours
        with self.watching(source, parent, (*parent, name)):
            with self.as_caller():
                real = real_outcome(lambda: os.link(self.real(source), self.real(parent, name)))
            ours = self.run(Link(self.ino(source), self.ino(parent), name))
        same(real, ours, f"link {source} -> {parent}/{name!r} as {self.user}")

    @rule(data=st.data(), offset=st.integers(0, 3 * SMALL_CHUNK), length=st.integers(1, 20))
    def write(self, data: st.DataObject, offset: int, length: int) -> None:  # type: ignore[override]
        """A write by any user clears S_ISUID (and S_ISGID as the kernel says)."""
        path = self.draw_existing(data, (stat.S_IFREG,))
        if path == ():
            return
        with self.watching(path, path[:-1]):
            with self.as_caller():
                try:
                    descriptor = os.open(self.real(path), os.O_WRONLY)
                except PermissionError:
                    return  # permission bits are the kernel's
                try:
                    os.pwrite(descriptor, b"x" * length, offset)
                finally:
                    os.close(descriptor)
            self.client.write(self.ino(path), offset, length, self.caller())

    @rule(data=st.data(), size=st.integers(0, 3 * SMALL_CHUNK))
    def truncate(self, data: st.DataObject, size: int) -> None:  # type: ignore[override]
        path = self.draw_existing(data, (stat.S_IFREG,))
        if path == ():
            return
        with self.watching(path, path[:-1]):
            with self.as_caller():
                real = real_outcome(lambda: os.truncate(self.real(path), size))
            if real == errno.EACCES:
                return  # permission bits are the kernel's
            ours = self.run(SetAttr(self.ino(path), size=size))
        same(real, ours, f"truncate {path} as {self.user}")

    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES))
    def unlink(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        with self.watching(parent, (*parent, name)):
            with self.as_caller():
                real = real_outcome(lambda: os.unlink(self.real(parent, name)))
            ours = self.run(Unlink(self.ino(parent), name))
        same(real, ours, f"unlink as {self.user}")

    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES))
    def rmdir(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        with self.watching(parent, (*parent, name)):
            with self.as_caller():
                real = real_outcome(lambda: os.rmdir(self.real(parent, name)))
            ours = self.run(Rmdir(self.ino(parent), name))
        same(real, ours, f"rmdir as {self.user}")

    @rule(
        data=st.data(),
        old=st.sampled_from(PLAIN_NAMES),
        new=st.sampled_from(PLAIN_NAMES),
        flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    )
    def rename(self, data: st.DataObject, old: bytes, new: bytes, flags: int) -> None:  # type: ignore[override]
        source, target = self.draw_parent(data), self.draw_parent(data)
        old = self.draw_name(data, source, [old])
        new = self.draw_name(data, target, [new])
        with self.watching(source, target, (*source, old), (*target, new)):
            with self.as_caller():
                real = real_outcome(
                    lambda: renameat2(self.real(source, old), self.real(target, new), flags)
                )
            ours = self.run(Rename(self.ino(source), old, self.ino(target), new, flags))
        same(real, ours, f"rename flags {flags} as {self.user}")

    @rule(
        data=st.data(),
        # Hypothesis favours the first values: put first those the sticky bit refuses.
        flags=st.sampled_from([RENAME_EXCHANGE, RENAME_NOREPLACE, 0]),
    )
    def rename_between_entries(self, data: st.DataObject, flags: int) -> None:
        """Two existing entries of one directory, renamed by a non-root user (mostly the
        source's owner, so that the target's owner decides): where the sticky bit
        decides, for every flag."""
        parent = self.draw_parent(data)
        ino = self.ino(parent)
        if not stat.S_ISDIR(self.client.attr(ino).mode):
            return
        present = sorted(self.client.names(ino))
        if len(present) < 2:
            return
        old, new = data.draw(st.permutations(present), label="names")[:2]
        owner = self.client.lookup(old, ino).uid
        owners = [user for user in USERS[1:] if user.uid == owner]
        user = data.draw(st.sampled_from(owners + USERS[1:]), label="user")
        self.user = user
        with self.watching(parent, (*parent, old), (*parent, new)):
            with self.as_caller():
                real = real_outcome(
                    lambda: renameat2(self.real(parent, old), self.real(parent, new), flags)
                )
            ours = self.run(Rename(ino, old, ino, new, flags))
        same(real, ours, f"rename {parent}: {old!r} -> {new!r} flags {flags} as {user}")

    @rule(
        data=st.data(), mode=st.sampled_from([0o777, 0o1777, 0o2777, 0o3777, 0o6777, 0o2767, 0o644])
    )
    def chmod(self, data: st.DataObject, mode: int) -> None:  # type: ignore[override]
        path = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR))
        attr = self.client.attr(self.ino(path))
        if stat.S_ISDIR(attr.mode):
            mode |= 0o777
        elif self.user.uid not in (0, attr.uid) and mode == attr.mode & 0o7777 & mode:
            # Only clearing S_ISUID/S_ISGID: the namespace lets anyone do that, because
            # FUSE sends the kernel's post-write privilege drop as such a SETATTR.
            return
        with self.watching(path, path[:-1]):
            with self.as_caller():
                real = real_outcome(lambda: os.chmod(self.real(path), mode))
            ours = self.run(SetAttr(self.ino(path), mode=mode))
        same(real, ours, f"chmod as {self.user}")

    @rule(
        data=st.data(),
        uid=st.sampled_from([None, 0, 1000, 1001]),
        gid=st.sampled_from([None, 1000, 2000, 1002]),
    )
    def chown(self, data: st.DataObject, uid: int | None, gid: int | None) -> None:
        path = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR))
        if uid is None and gid is None:
            return
        with self.watching(path, path[:-1]):
            with self.as_caller():
                real = real_outcome(
                    lambda: os.chown(
                        self.real(path), -1 if uid is None else uid, -1 if gid is None else gid
                    )
                )
            ours = self.run(SetAttr(self.ino(path), uid=uid, gid=gid))
        same(real, ours, f"chown as {self.user}")

    @rule(data=st.data(), explicit=st.booleans())
    def utimes(self, data: st.DataObject, explicit: bool) -> None:
        path = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR))
        times = (5, 6) if explicit else None
        op = (
            SetAttr(self.ino(path), atime_ns=5, mtime_ns=6)
            if explicit
            else SetAttr(self.ino(path), atime_now=True, mtime_now=True)
        )
        with self.watching(path, path[:-1]):
            with self.as_caller():
                real = real_outcome(
                    lambda: (
                        os.utime(self.real(path), ns=times) if times else os.utime(self.real(path))
                    )
                )
            ours = self.run(op)
        same(real, ours, f"utimes as {self.user}")

    # Rules of the base class that need root-only xattr namespaces stay off.
    symlink = setxattr = removexattr = getxattr = None  # type: ignore[assignment]


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def test_the_namespace_agrees_with_linux() -> None:
    seed = seed_from_environment("namespace vs linux")
    run_state_machine_as_test(hypothesis.seed(seed)(LinuxComparison), settings=SETTINGS)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_the_ownership_rules_agree_with_linux() -> None:
    seed = seed_from_environment("ownership vs linux")
    run_state_machine_as_test(hypothesis.seed(seed)(MultiUser), settings=SETTINGS)
