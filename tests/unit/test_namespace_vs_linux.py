"""The namespace against Linux: Hypothesis runs random operation sequences on the state
machine and on a real directory of this machine's file system, and compares every
result (errnos included) and, after every step, the whole tree.

The part that maps: names, types, modes, owners, link counts, sizes, symlink targets,
user xattrs, and which names share an inode.  Times and directory sizes differ by
design and are not compared.  Paths through symlinks are never used (the kernel would
follow them; the namespace receives already-resolved parents).

``MultiUser`` additionally switches the test process's effective uid, gid and groups
(needs root) to check the ownership rules against the kernel: sticky directories,
chown/chgrp, chmod, setgid inheritance and utimes.  Its directories are always
world-writable, because permission bits are the kernel's to enforce, not the
namespace's.
"""

from __future__ import annotations

import ctypes
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
    Credentials,
    GetXattr,
    Link,
    ListXattr,
    Lookup,
    Mkdir,
    Mknod,
    NsError,
    ReadLink,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Symlink,
    Unlink,
)

from .test_namespace_support import SMALL_CHUNK, Client, errname, seed_from_environment

AT_FDCWD = -100
libc = ctypes.CDLL(None, use_errno=True)
NAMES = [b"a", b"b", b"c", b".", b"..", b"n" * 256]
PLAIN_NAMES = [b"a", b"b", b"c"]
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

    def teardown(self) -> None:
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
        real = real_outcome(lambda: os.mkdir(self.real(parent, name), mode))
        same(real, self.run(Mkdir(self.ino(parent), name, mode)), f"mkdir {parent}/{name!r}")

    @rule(
        data=st.data(),
        name=st.sampled_from(NAMES),
        mode=st.sampled_from([0o644, 0o4755, 0o2755, stat.S_IFIFO | 0o600]),
    )
    def mknod(self, data: st.DataObject, name: bytes, mode: int) -> None:
        parent = self.draw_parent(data)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        real = real_outcome(lambda: os.mknod(self.real(parent, name), kind | mode))
        same(real, self.run(Mknod(self.ino(parent), name, kind | mode)), f"mknod {name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES), points_to=st.sampled_from([b"t", b"../x"]))
    def symlink(self, data: st.DataObject, name: bytes, points_to: bytes) -> None:
        parent = self.draw_parent(data)
        real = real_outcome(lambda: os.symlink(points_to, self.real(parent, name)))
        same(real, self.run(Symlink(self.ino(parent), name, points_to)), f"symlink {name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def link(self, data: st.DataObject, name: bytes) -> None:
        source = self.draw_existing(data)
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        if source == ():
            return
        real = real_outcome(
            lambda: os.link(self.real(source), self.real(parent, name), follow_symlinks=False)
        )
        ours = self.run(Link(self.ino(source), self.ino(parent), name))
        same(real, ours, f"link {source} -> {parent}/{name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def unlink(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        real = real_outcome(lambda: os.unlink(self.real(parent, name)))
        same(real, self.run(Unlink(self.ino(parent), name)), f"unlink {parent}/{name!r}")

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def rmdir(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        real = real_outcome(lambda: os.rmdir(self.real(parent, name)))
        same(real, self.run(Rmdir(self.ino(parent), name)), f"rmdir {parent}/{name!r}")

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
        real = real_outcome(lambda: os.truncate(self.real(path), size))
        same(real, self.run(SetAttr(self.ino(path), size=size)), f"truncate {path}")

    @rule(data=st.data(), offset=st.integers(0, 4 * SMALL_CHUNK), length=st.integers(1, 40))
    def write(self, data: st.DataObject, offset: int, length: int) -> None:
        path = self.draw_existing(data, (stat.S_IFREG,))
        if path == ():
            return
        descriptor = os.open(self.real(path), os.O_WRONLY)
        try:
            os.pwrite(descriptor, b"x" * length, offset)
        finally:
            os.close(descriptor)
        self.client.write(self.ino(path), offset, length, self.caller())

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o4755, 0o2755, 0o2745, 0o1777]))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO))
        real = real_outcome(lambda: os.chmod(self.real(path), mode))
        same(real, self.run(SetAttr(self.ino(path), mode=mode)), f"chmod {path}")

    @rule(data=st.data(), uid=st.sampled_from([None, 0, 1000]), gid=st.sampled_from([None, 0, 7]))
    def chown(self, data: st.DataObject, uid: int | None, gid: int | None) -> None:
        path = self.draw_existing(data)
        if uid is None and gid is None:
            return  # chown(-1, -1) still clears S_ISUID in Linux; not a namespace op
        real = real_outcome(
            lambda: os.chown(
                self.real(path),
                -1 if uid is None else uid,
                -1 if gid is None else gid,
                follow_symlinks=False,
            )
        )
        same(real, self.run(SetAttr(self.ino(path), uid=uid, gid=gid)), f"chown {path}")

    @rule(
        data=st.data(),
        name=st.sampled_from([b"user.a", b"user.b", b"user.", b"bogus.a", b"trusted.t"]),
        value=st.sampled_from([b"", b"1", b"22"]),
        flags=st.sampled_from([0, XATTR_CREATE, XATTR_REPLACE]),
    )
    def setxattr(self, data: st.DataObject, name: bytes, value: bytes, flags: int) -> None:
        path = self.draw_existing(data)
        real = real_outcome(
            lambda: os.setxattr(self.real(path), name, value, flags, follow_symlinks=False)
        )
        same(real, self.run(SetXattr(self.ino(path), name, value, flags)), f"setxattr {path}")

    @rule(data=st.data(), name=st.sampled_from([b"user.a", b"user.b", b"bogus.a"]))
    def removexattr(self, data: st.DataObject, name: bytes) -> None:
        path = self.draw_existing(data)
        real = real_outcome(lambda: os.removexattr(self.real(path), name, follow_symlinks=False))
        same(real, self.run(RemoveXattr(self.ino(path), name)), f"removexattr {path}")

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
        with self.as_caller():
            real = real_outcome(lambda: os.mkdir(self.real(parent, name), mode))
        same(real, self.run(Mkdir(self.ino(parent), name, mode)), f"mkdir as {self.user}")

    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES), mode=st.sampled_from([0o666, 0o6777]))
    def mknod(self, data: st.DataObject, name: bytes, mode: int) -> None:  # type: ignore[override]
        parent = self.draw_parent(data)
        with self.as_caller():
            real = real_outcome(lambda: os.mknod(self.real(parent, name), stat.S_IFREG | mode))
        same(real, self.run(Mknod(self.ino(parent), name, mode)), f"mknod as {self.user}")

    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES))
    def unlink(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        with self.as_caller():
            real = real_outcome(lambda: os.unlink(self.real(parent, name)))
        same(real, self.run(Unlink(self.ino(parent), name)), f"unlink as {self.user}")

    @rule(data=st.data(), name=st.sampled_from(PLAIN_NAMES))
    def rmdir(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw_parent(data)
        name = self.draw_name(data, parent, [name])
        with self.as_caller():
            real = real_outcome(lambda: os.rmdir(self.real(parent, name)))
        same(real, self.run(Rmdir(self.ino(parent), name)), f"rmdir as {self.user}")

    @rule(data=st.data(), old=st.sampled_from(PLAIN_NAMES), new=st.sampled_from(PLAIN_NAMES))
    def rename(self, data: st.DataObject, old: bytes, new: bytes) -> None:  # type: ignore[override]
        source, target = self.draw_parent(data), self.draw_parent(data)
        old = self.draw_name(data, source, [old])
        new = self.draw_name(data, target, [new])
        with self.as_caller():
            real = real_outcome(
                lambda: renameat2(self.real(source, old), self.real(target, new), 0)
            )
        ours = self.run(Rename(self.ino(source), old, self.ino(target), new))
        same(real, ours, f"rename as {self.user}")

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
        with self.as_caller():
            real = real_outcome(lambda: os.chmod(self.real(path), mode))
        same(real, self.run(SetAttr(self.ino(path), mode=mode)), f"chmod as {self.user}")

    @rule(
        data=st.data(),
        uid=st.sampled_from([None, 0, 1000, 1001]),
        gid=st.sampled_from([None, 1000, 2000, 1002]),
    )
    def chown(self, data: st.DataObject, uid: int | None, gid: int | None) -> None:
        path = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR))
        if uid is None and gid is None:
            return
        with self.as_caller():
            real = real_outcome(
                lambda: os.chown(
                    self.real(path), -1 if uid is None else uid, -1 if gid is None else gid
                )
            )
        same(real, self.run(SetAttr(self.ino(path), uid=uid, gid=gid)), f"chown as {self.user}")

    @rule(data=st.data(), explicit=st.booleans())
    def utimes(self, data: st.DataObject, explicit: bool) -> None:
        path = self.draw_existing(data, (stat.S_IFREG, stat.S_IFDIR))
        times = (5, 6) if explicit else None
        with self.as_caller():
            real = real_outcome(
                lambda: os.utime(self.real(path), ns=times) if times else os.utime(self.real(path))
            )
        op = (
            SetAttr(self.ino(path), atime_ns=5, mtime_ns=6)
            if explicit
            else SetAttr(self.ino(path), atime_now=True, mtime_now=True)
        )
        same(real, self.run(op), f"utimes as {self.user}")

    # Rules of the base class that need data access or root-only namespaces stay off.
    link = symlink = truncate = write = setxattr = removexattr = getxattr = None  # type: ignore[assignment]


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
