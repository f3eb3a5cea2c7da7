"""Every operation through a real mount with plain ``os`` calls, errnos included.

One cluster serves the module; each test works in its own directory.  Checks as a
non-root user run in a forked child that drops to uid/gid 1000 (or 1001).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fuse.conftest import LocalCluster

USER_A = 1000
USER_B = 1001

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    result = _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def errno_of(action: Callable[[], Any]) -> int:
    """The errno ``action`` fails with (0 when it succeeds)."""
    try:
        action()
    except OSError as error:
        return error.errno or -1
    return 0


def as_user(uid: int, action: Callable[[], Any], gid: int | None = None) -> int:
    """Run ``action`` in a child with uid/gid dropped; its errno (0 on success)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 255
        try:
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            code = errno_of(action)
        finally:
            os.write(write_end, bytes([min(code, 255)]))
            os._exit(0)
    os.close(write_end)
    result = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(pid, 0)
    return result[0] if result else 255


def test_mkdir_rmdir_and_their_errors(workdir: Path) -> None:
    target = workdir / "d"
    target.mkdir(mode=0o750)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert errno_of(lambda: target.mkdir()) == errno.EEXIST
    (target / "child").mkdir()
    assert errno_of(lambda: os.rmdir(target)) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rmdir(workdir / "missing")) == errno.ENOENT
    (workdir / "file").write_bytes(b"")
    assert errno_of(lambda: os.rmdir(workdir / "file")) == errno.ENOTDIR
    assert errno_of(lambda: (workdir / "file" / "x").mkdir()) == errno.ENOTDIR
    assert errno_of(lambda: (workdir / ("n" * 256)).mkdir()) == errno.ENAMETOOLONG
    os.rmdir(target / "child")
    os.rmdir(target)
    assert not target.exists()
    assert os.stat(workdir).st_nlink == 2


def test_a_directory_shows_each_change_made_in_it_at_once(workdir: Path) -> None:
    """The mount caches the attributes a change answers with; they must be the
    directory's state after that change, never before it."""
    here, there = workdir / "here", workdir / "there"
    here.mkdir()
    there.mkdir()
    seen = [os.stat(here)]

    def changed_by(action: Callable[[], Any]) -> os.stat_result:
        action()
        info = os.stat(here)
        assert info.st_mtime_ns > seen[-1].st_mtime_ns, action
        seen.append(info)
        return info

    changed_by(lambda: os.close(os.open(here / "f", os.O_CREAT | os.O_WRONLY, 0o644)))
    assert changed_by(lambda: (here / "sub").mkdir()).st_nlink == 3
    changed_by(lambda: os.symlink("f", here / "s"))
    changed_by(lambda: os.link(here / "f", here / "g"))
    changed_by(lambda: os.mknod(here / "p", 0o644 | stat.S_IFIFO))
    assert changed_by(lambda: os.unlink(here / "g")).st_size == seen[0].st_size + 4
    there_before = os.stat(there)
    changed_by(lambda: os.rename(here / "f", there / "f"))
    assert os.stat(there).st_mtime_ns > there_before.st_mtime_ns
    assert changed_by(lambda: os.rmdir(here / "sub")).st_nlink == 2
    assert sorted(os.listdir(here)) == ["p", "s"] and os.listdir(there) == ["f"]


def test_create_open_flags(workdir: Path) -> None:
    path = workdir / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"hello world")
    os.close(fd)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert errno_of(lambda: os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.stat().st_size == 0
    assert path.read_bytes() == b""
    assert errno_of(lambda: os.open(workdir / "none", os.O_RDONLY)) == errno.ENOENT
    assert errno_of(lambda: os.open(workdir, os.O_WRONLY)) == errno.EISDIR


def test_append_from_two_descriptors(workdir: Path) -> None:
    path = workdir / "log"
    first = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    second = os.open(path, os.O_WRONLY | os.O_APPEND)
    for line in range(50):
        os.write(first if line % 2 else second, f"line {line}\n".encode())
    os.close(first)
    os.close(second)
    assert path.read_text().splitlines() == [f"line {n}" for n in range(50)]


def test_read_write_at_offsets_and_sizes(workdir: Path) -> None:
    path = workdir / "data"
    with open(path, "wb") as handle:
        handle.write(b"a" * 1000)
        handle.seek(5000)
        handle.write(b"b" * 10)
    assert path.stat().st_size == 5010
    data = path.read_bytes()
    assert data == b"a" * 1000 + bytes(4000) + b"b" * 10
    with open(path, "r+b") as handle:
        handle.seek(998)
        handle.write(b"XYZ")
        handle.seek(0)
        assert handle.read(1002) == b"a" * 998 + b"XYZ" + b"\0"


def test_truncate_and_ftruncate(workdir: Path) -> None:
    path = workdir / "t"
    path.write_bytes(b"0123456789")
    os.truncate(path, 4)
    assert path.read_bytes() == b"0123"
    with open(path, "r+b") as handle:
        os.ftruncate(handle.fileno(), 8)
        assert os.fstat(handle.fileno()).st_size == 8
    assert path.read_bytes() == b"0123" + bytes(4)
    assert errno_of(lambda: os.truncate(workdir, 0)) == errno.EISDIR
    assert errno_of(lambda: os.truncate(path, -1)) == errno.EINVAL


def test_chmod_chown_and_times(workdir: Path) -> None:
    path = workdir / "m"
    path.write_bytes(b"x")
    os.chmod(path, 0o4755)
    assert stat.S_IMODE(path.stat().st_mode) == 0o4755
    os.chown(path, USER_A, USER_A)
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (USER_A, USER_A)
    assert not info.st_mode & stat.S_ISUID  # chown clears set-user-id
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    info = path.stat()
    assert (info.st_atime_ns, info.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    before = time.time()
    os.utime(path)  # UTIME_NOW for both
    assert path.stat().st_mtime >= before - 2
    # UTIME_OMIT for atime: only mtime changes.
    os.utime(path, ns=(5_000_000_000, 6_000_000_000))
    os.utime(path, ns=(5_000_000_000, 7_000_000_000))
    info = path.stat()
    assert (info.st_atime_ns, info.st_mtime_ns) == (5_000_000_000, 7_000_000_000)


def test_utime_now_by_a_writer_who_is_not_the_owner(workdir: Path) -> None:
    path = workdir / "shared"
    path.write_bytes(b"x")
    os.chmod(path, 0o666)
    os.utime(path, ns=(0, 0))
    assert as_user(USER_A, lambda: os.utime(path)) == 0
    assert path.stat().st_mtime > 1_000_000
    assert as_user(USER_A, lambda: os.utime(path, ns=(1, 1))) == errno.EPERM


def test_rename_and_its_flags(workdir: Path) -> None:
    a, b, c = workdir / "a", workdir / "b", workdir / "c"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    assert errno_of(lambda: renameat2(a, b, RENAME_NOREPLACE)) == errno.EEXIST
    renameat2(a, b, RENAME_EXCHANGE)
    assert (a.read_bytes(), b.read_bytes()) == (b"B", b"A")
    assert errno_of(lambda: renameat2(a, c, RENAME_EXCHANGE)) == errno.ENOENT
    os.rename(a, b)
    assert not a.exists() and b.read_bytes() == b"B"
    (workdir / "dir").mkdir()
    (workdir / "dir" / "sub").mkdir()
    assert errno_of(lambda: os.rename(workdir / "dir", workdir / "dir" / "sub" / "x")) in (
        errno.EINVAL,
    )
    assert errno_of(lambda: os.rename(b, workdir / "dir")) == errno.EISDIR
    assert errno_of(lambda: os.rename(workdir / "dir", b)) == errno.ENOTDIR
    os.rename(workdir / "dir" / "sub", workdir / "moved")
    assert (workdir / "moved").is_dir()


def test_links_and_symlinks(workdir: Path) -> None:
    target = workdir / "target"
    target.write_bytes(b"data")
    os.link(target, workdir / "hard")
    assert target.stat().st_nlink == 2
    assert (workdir / "hard").read_bytes() == b"data"
    assert errno_of(lambda: os.link(workdir, workdir / "dirlink")) == errno.EPERM
    assert errno_of(lambda: os.link(target, workdir / "hard")) == errno.EEXIST
    os.symlink("target", workdir / "soft")
    assert os.readlink(workdir / "soft") == "target"
    assert (workdir / "soft").read_bytes() == b"data"
    assert errno_of(lambda: os.readlink(target)) == errno.EINVAL
    os.unlink(workdir / "hard")
    assert target.stat().st_nlink == 1


def test_unlinked_open_file_stays_readable_and_writable(workdir: Path) -> None:
    path = workdir / "doomed"
    path.write_bytes(b"before ")
    with open(path, "r+b") as handle:
        os.unlink(path)
        assert not path.exists()
        handle.seek(0, os.SEEK_END)
        handle.write(b"after")
        handle.flush()
        os.fsync(handle.fileno())
        handle.seek(0)
        assert handle.read() == b"before after"
        assert os.fstat(handle.fileno()).st_nlink == 0
    assert errno_of(lambda: os.unlink(path)) == errno.ENOENT


def test_readdir_lists_everything_once_with_dot_entries(workdir: Path) -> None:
    names = {f"entry-{n:04d}" for n in range(700)}
    for name in names:
        (workdir / name).write_bytes(b"")
    assert set(os.listdir(workdir)) == names
    with os.scandir(workdir) as entries:
        seen = [entry.name for entry in entries]
    assert len(seen) == len(set(seen)) == 700
    fd = os.open(workdir, os.O_RDONLY)
    try:
        raw = os.listdir(fd)
    finally:
        os.close(fd)
    assert len(raw) == 700


def test_mknod_fifo_and_stat_types(workdir: Path) -> None:
    os.mkfifo(workdir / "fifo", 0o600)
    assert stat.S_ISFIFO((workdir / "fifo").stat().st_mode)
    assert errno_of(lambda: os.mknod(workdir / "fifo", stat.S_IFIFO | 0o600)) == errno.EEXIST


def test_xattrs(workdir: Path) -> None:
    path = workdir / "x"
    path.write_bytes(b"")
    os.setxattr(path, "user.colour", b"blue")
    assert os.getxattr(path, "user.colour") == b"blue"
    assert os.listxattr(path) == ["user.colour"]
    assert errno_of(lambda: os.setxattr(path, "user.colour", b"x", os.XATTR_CREATE)) == (
        errno.EEXIST
    )
    assert errno_of(lambda: os.setxattr(path, "user.size", b"x", os.XATTR_REPLACE)) == (
        errno.ENODATA
    )
    assert errno_of(lambda: os.getxattr(path, "user.none")) == errno.ENODATA
    os.removexattr(path, "user.colour")
    assert os.listxattr(path) == []
    assert errno_of(lambda: os.removexattr(path, "user.colour")) == errno.ENODATA


def test_fsync_fsyncdir_and_statfs(workdir: Path, cluster: LocalCluster) -> None:
    path = workdir / "durable"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x" * 10000)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    dir_fd = os.open(workdir, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    info = os.statvfs(workdir)
    assert info.f_namemax == 255
    assert info.f_blocks > 0 and 0 < info.f_bavail <= info.f_blocks
    assert info.f_files > info.f_ffree > 0


def test_permissions_as_other_users(workdir: Path) -> None:
    private = workdir / "private"
    private.write_bytes(b"secret")
    os.chmod(private, 0o600)
    assert as_user(USER_A, lambda: private.read_bytes()) == errno.EACCES
    assert as_user(USER_A, lambda: os.chmod(private, 0o777)) == errno.EPERM
    assert as_user(USER_A, lambda: os.chown(private, USER_A, USER_A)) == errno.EPERM
    os.chmod(workdir, 0o755)
    assert as_user(USER_A, lambda: (workdir / "new").write_bytes(b"")) == errno.EACCES
    public = workdir / "public"
    public.mkdir(mode=0o777)
    os.chmod(public, 0o777)
    assert as_user(USER_A, lambda: (public / "mine").write_bytes(b"a")) == 0
    assert (public / "mine").stat().st_uid == USER_A
    assert (public / "mine").stat().st_gid == USER_A
    assert as_user(USER_A, lambda: os.access(public / "mine", os.W_OK) or 1 / 0) == 0


def test_sticky_directory(workdir: Path) -> None:
    shared = workdir / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    assert as_user(USER_A, lambda: (shared / "a-file").write_bytes(b"a")) == 0
    assert as_user(USER_B, lambda: os.unlink(shared / "a-file")) == errno.EPERM
    assert as_user(USER_B, lambda: os.rename(shared / "a-file", shared / "b")) == errno.EPERM
    assert as_user(USER_A, lambda: os.unlink(shared / "a-file")) == 0


def test_setgid_directory_inheritance(workdir: Path) -> None:
    group_dir = workdir / "group"
    group_dir.mkdir()
    os.chown(group_dir, 0, 4242)
    os.chmod(group_dir, 0o2777)
    assert as_user(USER_A, lambda: (group_dir / "f").write_bytes(b"")) == 0
    assert (group_dir / "f").stat().st_gid == 4242
    assert as_user(USER_A, lambda: (group_dir / "sub").mkdir()) == 0
    assert (group_dir / "sub").stat().st_mode & stat.S_ISGID


@pytest.mark.parametrize("size", [0, 1, 65536, 256 * 1024 + 1])
def test_write_then_read_sizes(workdir: Path, size: int) -> None:
    data = os.urandom(size)
    (workdir / "f").write_bytes(data)
    assert (workdir / "f").read_bytes() == data
    assert (workdir / "f").stat().st_size == size
