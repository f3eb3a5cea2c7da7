"""POSIX rules of names, creation, links and removal: one test per rule."""

from __future__ import annotations

import errno
import stat

import pytest

from metaserver.namespace import Namespace, NamespaceConfig
from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    LINK_MAX,
    NAME_MAX_BYTES,
    SYMLINK_TARGET_MAX_BYTES,
    Create,
    GetAttr,
    Link,
    Lookup,
    Mkdir,
    Mknod,
    ReadLink,
    Release,
    Rmdir,
    StatFs,
    Symlink,
    Unlink,
)

from .test_namespace_support import ALICE, Client

ROOT = InodeId(ROOT_INODE)


@pytest.fixture
def c() -> Client:
    return Client()


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name,code",
    [
        (b"", errno.EINVAL),
        (b"a/b", errno.EINVAL),
        (b"a\0b", errno.EINVAL),
        (b"x" * (NAME_MAX_BYTES + 1), errno.ENAMETOOLONG),
        (b".", errno.EEXIST),
        (b"..", errno.EEXIST),
    ],
)
def test_bad_names_are_refused_with_their_errno(c: Client, name: bytes, code: int) -> None:
    assert c.err(Mkdir(ROOT, name, 0o755)) == code
    assert c.err(Mknod(ROOT, name, 0o100644)) == code
    assert c.err(Symlink(ROOT, name, b"target")) == code
    assert c.names() == set()


def test_lookup_of_a_name_over_255_bytes_is_enametoolong(c: Client) -> None:
    c.mknod(b"n" * NAME_MAX_BYTES)
    assert c.lookup(b"n" * NAME_MAX_BYTES).ino
    assert c.qerr(Lookup(ROOT, b"n" * (NAME_MAX_BYTES + 1))) == errno.ENAMETOOLONG


def test_a_name_of_255_bytes_of_any_byte_but_slash_and_nul_is_fine(c: Client) -> None:
    name = bytes(range(1, 256)).replace(b"/", b"x")[:NAME_MAX_BYTES].ljust(NAME_MAX_BYTES, b"y")
    ino = c.mknod(name)
    assert c.lookup(name).ino == ino
    assert c.names() == {name}


def test_lookup_of_dot_and_dotdot_finds_the_directory_and_its_parent(c: Client) -> None:
    d = c.mkdir(b"d")
    assert c.lookup(b".", d).ino == d
    assert c.lookup(b"..", d).ino == ROOT
    assert c.lookup(b"..", ROOT).ino == ROOT


def test_lookup_of_a_missing_name_is_enoent(c: Client) -> None:
    assert c.qerr(Lookup(ROOT, b"nope")) == errno.ENOENT


def test_lookup_in_a_file_is_enotdir(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.qerr(Lookup(f, b"x")) == errno.ENOTDIR


def test_creating_in_a_missing_parent_is_enoent(c: Client) -> None:
    assert c.err(Mkdir(InodeId(999), b"x", 0o755)) == errno.ENOENT


def test_creating_in_a_file_is_enotdir(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(Mknod(f, b"x", 0o100644)) == errno.ENOTDIR


# ---------------------------------------------------------------- creation


def test_mkdir_of_an_existing_name_is_eexist_whatever_its_type(c: Client) -> None:
    c.mknod(b"f")
    c.mkdir(b"d")
    assert c.err(Mkdir(ROOT, b"f", 0o755)) == errno.EEXIST
    assert c.err(Mkdir(ROOT, b"d", 0o755)) == errno.EEXIST


def test_mkdir_makes_nlink_two_and_adds_one_to_the_parent(c: Client) -> None:
    d = c.mkdir(b"d")
    assert c.attr(d).nlink == 2
    assert c.attr(ROOT).nlink == 3
    c.mkdir(b"e", d)
    assert c.attr(d).nlink == 3


def test_mkdir_keeps_only_permission_and_sticky_bits(c: Client) -> None:
    d = c.mkdir(b"d", mode=0o7777)
    assert c.attr(d).mode == stat.S_IFDIR | 0o1777


def test_new_inodes_belong_to_the_caller(c: Client) -> None:
    c.ok(Mkdir(ROOT, b"pub", 0o777))
    pub = c.lookup(b"pub").ino
    f = c.mknod(b"f", pub, cred=ALICE)
    attr = c.attr(f)
    assert (attr.uid, attr.gid) == (ALICE.uid, ALICE.gid)


def test_mknod_without_type_bits_makes_a_regular_file(c: Client) -> None:
    f = c.mknod(b"f", mode=0o640)
    assert c.attr(f).mode == stat.S_IFREG | 0o640


def test_mknod_makes_fifos_sockets_and_devices_with_rdev(c: Client) -> None:
    for name, kind in [(b"p", stat.S_IFIFO), (b"s", stat.S_IFSOCK)]:
        attr = c.ok(Mknod(ROOT, name, kind | 0o600, 1234)).attr
        assert stat.S_IFMT(attr.mode) == kind and attr.rdev == 0
    for name, kind in [(b"c", stat.S_IFCHR), (b"b", stat.S_IFBLK)]:
        attr = c.ok(Mknod(ROOT, name, kind | 0o600, 0x0801)).attr
        assert stat.S_IFMT(attr.mode) == kind and attr.rdev == 0x0801


def test_mknod_of_a_directory_type_is_eperm(c: Client) -> None:
    assert c.err(Mknod(ROOT, b"d", stat.S_IFDIR | 0o755)) == errno.EPERM


def test_mknod_of_an_unknown_type_is_einval(c: Client) -> None:
    assert c.err(Mknod(ROOT, b"l", stat.S_IFLNK | 0o777)) == errno.EINVAL
    assert c.err(Mknod(ROOT, b"x", 0o030000 | 0o644)) == errno.EINVAL


def test_mknod_of_a_device_needs_root(c: Client) -> None:
    c.ok(Mkdir(ROOT, b"pub", 0o777))
    pub = c.lookup(b"pub").ino
    assert c.err(Mknod(pub, b"dev", stat.S_IFCHR | 0o600, 1), ALICE) == errno.EPERM
    assert c.err(Mknod(pub, b"blk", stat.S_IFBLK | 0o600, 1), ALICE) == errno.EPERM
    c.mknod(b"fifo", pub, stat.S_IFIFO | 0o600, ALICE)


def test_create_with_o_excl_on_an_existing_name_is_eexist(c: Client) -> None:
    c.mknod(b"f")
    assert c.err(Create(ROOT, b"f", 0o644, True)) == errno.EEXIST


def test_create_without_o_excl_opens_the_existing_file_unchanged(c: Client) -> None:
    f = c.mknod(b"f", mode=0o600)
    reply = c.ok(Create(ROOT, b"f", 0o777, False))
    assert reply.attr.ino == f and reply.attr.mode == stat.S_IFREG | 0o600
    c.ok(Unlink(ROOT, b"f"))
    assert c.attr(f).nlink == 0  # still open: alive


def test_create_of_an_existing_directory_is_eisdir(c: Client) -> None:
    c.mkdir(b"d")
    assert c.err(Create(ROOT, b"d", 0o644, False)) == errno.EISDIR
    assert c.err(Create(ROOT, b".", 0o644, False)) == errno.EISDIR


def test_symlink_stores_its_target_and_size(c: Client) -> None:
    s = c.symlink(b"s", b"../some/where")
    assert c.qok(ReadLink(s)).target == b"../some/where"
    attr = c.attr(s)
    assert attr.size == len(b"../some/where") and attr.mode == stat.S_IFLNK | 0o777


@pytest.mark.parametrize(
    "target,code",
    [
        (b"", errno.ENOENT),
        (b"x" * (SYMLINK_TARGET_MAX_BYTES + 1), errno.ENAMETOOLONG),
        (b"a\0b", errno.EINVAL),
    ],
)
def test_bad_symlink_targets_are_refused(c: Client, target: bytes, code: int) -> None:
    assert c.err(Symlink(ROOT, b"s", target)) == code


def test_readlink_of_a_non_symlink_is_einval(c: Client) -> None:
    assert c.qerr(ReadLink(c.mknod(b"f"))) == errno.EINVAL


def test_inode_numbers_are_never_reused(c: Client) -> None:
    first = c.mknod(b"f")
    c.ok(Unlink(ROOT, b"f"))
    assert c.mknod(b"f") > first


def test_creation_sets_all_times_and_touches_the_parent(c: Client) -> None:
    before = c.attr(ROOT)
    f = c.mknod(b"f")
    attr = c.attr(f)
    assert attr.atime_ns == attr.mtime_ns == attr.ctime_ns == c.now_ns
    parent = c.attr(ROOT)
    assert parent.mtime_ns == parent.ctime_ns == c.now_ns > before.mtime_ns


def test_the_inode_limit_gives_enospc() -> None:
    c = Client(Namespace(NamespaceConfig(chunk_size_bytes=16, inodes_max=3)))
    c.mknod(b"a")
    c.mkdir(b"b")
    assert c.err(Mknod(ROOT, b"c", 0o644)) == errno.ENOSPC
    c.ok(Unlink(ROOT, b"a"))
    c.mknod(b"c")


# ---------------------------------------------------------------- hard links


def test_link_adds_a_name_and_counts_it_in_nlink(c: Client) -> None:
    f = c.mknod(b"f")
    d = c.mkdir(b"d")
    reply = c.ok(Link(f, d, b"g"))
    assert reply.attr.ino == f and reply.attr.nlink == 2
    assert c.lookup(b"g", d).ino == f


def test_link_to_a_directory_is_eperm(c: Client) -> None:
    d = c.mkdir(b"d")
    assert c.err(Link(d, ROOT, b"e")) == errno.EPERM


def test_link_over_an_existing_name_is_eexist(c: Client) -> None:
    f = c.mknod(b"f")
    c.mknod(b"g")
    assert c.err(Link(f, ROOT, b"g")) == errno.EEXIST
    assert c.err(Link(f, ROOT, b".")) == errno.EEXIST


def test_link_of_an_unlinked_open_file_is_enoent(c: Client) -> None:
    f = c.create(b"f")
    c.ok(Unlink(ROOT, b"f"))
    assert c.err(Link(f, ROOT, b"back")) == errno.ENOENT


def test_link_past_link_max_is_emlink(c: Client) -> None:
    f = c.mknod(b"f")
    d = c.mkdir(b"d")
    for i in range(LINK_MAX - 1):
        c.ok(Link(f, d, b"%d" % i))
    assert c.attr(f).nlink == LINK_MAX
    assert c.err(Link(f, d, b"one-too-many")) == errno.EMLINK


def test_unlink_of_one_hard_link_keeps_the_inode(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(Link(f, ROOT, b"g"))
    c.ok(Unlink(ROOT, b"f"))
    assert c.attr(f).nlink == 1
    assert c.lookup(b"g").ino == f


# ---------------------------------------------------------------- removal


def test_unlink_of_a_missing_name_is_enoent(c: Client) -> None:
    assert c.err(Unlink(ROOT, b"nope")) == errno.ENOENT


def test_unlink_of_a_directory_is_eisdir(c: Client) -> None:
    c.mkdir(b"d")
    assert c.err(Unlink(ROOT, b"d")) == errno.EISDIR
    assert c.err(Unlink(ROOT, b".")) == errno.EISDIR
    assert c.err(Unlink(ROOT, b"..")) == errno.EISDIR


def test_unlink_of_the_last_link_frees_the_inode(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(Unlink(ROOT, b"f"))
    assert c.qerr(GetAttr(f)) == errno.ENOENT
    assert c.qok(StatFs()).files == 0


def test_an_unlinked_file_that_is_open_lives_until_its_last_release(c: Client) -> None:
    f = c.create(b"f")
    c.write(f, 0, 40)
    c.ok(Unlink(ROOT, b"f"))
    attr = c.attr(f)
    assert attr.nlink == 0 and attr.size == 40
    assert c.qok(StatFs()).open_unlinked == 1
    c.ok(Release(f))
    assert c.qerr(GetAttr(f)) == errno.ENOENT
    assert c.qok(StatFs()).open_unlinked == 0


def test_rmdir_of_a_non_empty_directory_is_enotempty(c: Client) -> None:
    d = c.mkdir(b"d")
    c.mknod(b"f", d)
    assert c.err(Rmdir(ROOT, b"d")) == errno.ENOTEMPTY


def test_rmdir_of_a_file_is_enotdir(c: Client) -> None:
    c.mknod(b"f")
    assert c.err(Rmdir(ROOT, b"f")) == errno.ENOTDIR


def test_rmdir_of_dot_is_einval_and_of_dotdot_enotempty(c: Client) -> None:
    d = c.mkdir(b"d")
    assert c.err(Rmdir(d, b".")) == errno.EINVAL
    assert c.err(Rmdir(d, b"..")) == errno.ENOTEMPTY


def test_rmdir_frees_the_directory_and_drops_the_parent_nlink(c: Client) -> None:
    d = c.mkdir(b"d")
    c.ok(Rmdir(ROOT, b"d"))
    assert c.qerr(GetAttr(d)) == errno.ENOENT
    assert c.attr(ROOT).nlink == 2


def test_creating_in_a_removed_directory_is_enoent(c: Client) -> None:
    d = c.mkdir(b"d")
    c.ok(Rmdir(ROOT, b"d"))
    assert c.err(Mknod(d, b"f", 0o644)) == errno.ENOENT


def test_unlink_sets_ctime_of_a_surviving_inode(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(Link(f, ROOT, b"g"))
    c.ok(Unlink(ROOT, b"g"))
    assert c.attr(f).ctime_ns == c.now_ns


def test_every_failure_leaves_the_tree_unchanged(c: Client) -> None:
    d = c.mkdir(b"d")
    f = c.mknod(b"f", d)
    before = [c.attr(ino) for ino in (ROOT, d, f)]
    for op in [
        Mkdir(d, b"f", 0o755),
        Rmdir(ROOT, b"d"),
        Unlink(ROOT, b"d"),
        Link(d, ROOT, b"x"),
        Link(f, d, b"f"),
        Mknod(InodeId(77), b"x", 0o644),
        Symlink(d, b"f", b"t"),
    ]:
        c.err(op)
    c.ns.verify()
    assert [c.attr(ino) for ino in (ROOT, d, f)] == before
    assert c.names(d) == {b"f"} and c.names() == {b"d"}
