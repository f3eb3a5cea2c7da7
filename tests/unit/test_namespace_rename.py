"""rename(2) and renameat2(2): one test per rule of the man page."""

from __future__ import annotations

import errno

import pytest

from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    GetAttr,
    Link,
    Mkdir,
    Release,
    Rename,
    StatFs,
)

from .test_namespace_support import Client

ROOT = InodeId(ROOT_INODE)


@pytest.fixture
def c() -> Client:
    return Client()


def test_rename_moves_a_file_between_directories(c: Client) -> None:
    a, b = c.mkdir(b"a"), c.mkdir(b"b")
    f = c.mknod(b"f", a)
    c.ok(Rename(a, b"f", b, b"g"))
    assert c.names(a) == set() and c.lookup(b"g", b).ino == f


def test_rename_over_a_file_replaces_it_and_frees_the_old_one(c: Client) -> None:
    f = c.mknod(b"f")
    g = c.mknod(b"g")
    c.ok(Rename(ROOT, b"f", ROOT, b"g"))
    assert c.lookup(b"g").ino == f
    assert c.qerr(GetAttr(g)) == errno.ENOENT
    assert c.names() == {b"g"}


def test_rename_over_an_open_file_keeps_it_alive_until_release(c: Client) -> None:
    c.mknod(b"f")
    g = c.create(b"g")
    c.ok(Rename(ROOT, b"f", ROOT, b"g"))
    assert c.attr(g).nlink == 0
    c.ok(Release(g))
    assert c.qerr(GetAttr(g)) == errno.ENOENT


def test_rename_over_an_empty_directory_replaces_it(c: Client) -> None:
    a = c.mkdir(b"a")
    b = c.mkdir(b"b")
    c.ok(Rename(ROOT, b"a", ROOT, b"b"))
    assert c.lookup(b"b").ino == a
    assert c.qerr(GetAttr(b)) == errno.ENOENT
    assert c.attr(ROOT).nlink == 3


def test_rename_over_a_non_empty_directory_is_enotempty(c: Client) -> None:
    c.mkdir(b"a")
    b = c.mkdir(b"b")
    c.mknod(b"x", b)
    assert c.err(Rename(ROOT, b"a", ROOT, b"b")) == errno.ENOTEMPTY


def test_rename_of_a_directory_over_a_file_is_enotdir(c: Client) -> None:
    c.mkdir(b"d")
    c.mknod(b"f")
    assert c.err(Rename(ROOT, b"d", ROOT, b"f")) == errno.ENOTDIR


def test_rename_of_a_file_over_a_directory_is_eisdir(c: Client) -> None:
    c.mkdir(b"d")
    c.mknod(b"f")
    assert c.err(Rename(ROOT, b"f", ROOT, b"d")) == errno.EISDIR


def test_rename_of_a_directory_into_itself_is_einval(c: Client) -> None:
    a = c.mkdir(b"a")
    b = c.mkdir(b"b", a)
    deep = c.mkdir(b"c", b)
    assert c.err(Rename(ROOT, b"a", a, b"x")) == errno.EINVAL
    assert c.err(Rename(ROOT, b"a", deep, b"x")) == errno.EINVAL
    c.ns.verify()


def test_rename_onto_an_ancestor_of_the_source_is_enotempty(c: Client) -> None:
    a = c.mkdir(b"a")
    b = c.mkdir(b"b", a)
    c.mknod(b"f", b)
    # rename("a/b/f", "a"): the target is an ancestor of the source.
    assert c.err(Rename(b, b"f", ROOT, b"a")) == errno.ENOTEMPTY
    # rename("a/b", "a") too, even though "a" holds only "b".
    assert c.err(Rename(a, b"b", ROOT, b"a")) == errno.ENOTEMPTY


def test_rename_onto_itself_does_nothing(c: Client) -> None:
    f = c.mknod(b"f")
    before = c.attr(f)
    c.ok(Rename(ROOT, b"f", ROOT, b"f"))
    assert c.attr(f) == before and c.names() == {b"f"}


def test_rename_between_hard_links_of_one_file_does_nothing(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(Link(f, ROOT, b"g"))
    c.ok(Rename(ROOT, b"f", ROOT, b"g"))
    assert c.names() == {b"f", b"g"} and c.attr(f).nlink == 2


def test_rename_of_a_missing_source_is_enoent(c: Client) -> None:
    assert c.err(Rename(ROOT, b"nope", ROOT, b"x")) == errno.ENOENT


def test_rename_of_dot_or_dotdot_is_ebusy(c: Client) -> None:
    d = c.mkdir(b"d")
    assert c.err(Rename(d, b".", ROOT, b"x")) == errno.EBUSY
    assert c.err(Rename(d, b"..", ROOT, b"x")) == errno.EBUSY
    c.mknod(b"f")
    assert c.err(Rename(ROOT, b"f", d, b"..")) == errno.EBUSY
    assert c.err(Rename(ROOT, b"f", d, b"..", RENAME_NOREPLACE)) == errno.EEXIST


def test_rename_noreplace_refuses_an_existing_target(c: Client) -> None:
    c.mknod(b"f")
    c.mknod(b"g")
    assert c.err(Rename(ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE)) == errno.EEXIST
    c.ok(Rename(ROOT, b"f", ROOT, b"h", RENAME_NOREPLACE))


def test_rename_noreplace_onto_itself_is_eexist(c: Client) -> None:
    c.mknod(b"f")
    assert c.err(Rename(ROOT, b"f", ROOT, b"f", RENAME_NOREPLACE)) == errno.EEXIST


def test_rename_exchange_swaps_two_names(c: Client) -> None:
    a = c.mkdir(b"a")
    f = c.mknod(b"f")
    d = c.mkdir(b"d", a)
    c.ok(Rename(ROOT, b"f", a, b"d", RENAME_EXCHANGE))
    assert c.lookup(b"f").ino == d and c.lookup(b"d", a).ino == f
    assert c.lookup(b"..", d).ino == ROOT
    assert c.attr(ROOT).nlink == 4 and c.attr(a).nlink == 2
    c.ns.verify()


def test_rename_exchange_needs_both_names(c: Client) -> None:
    c.mknod(b"f")
    assert c.err(Rename(ROOT, b"f", ROOT, b"g", RENAME_EXCHANGE)) == errno.ENOENT


def test_rename_exchange_with_an_ancestor_is_einval(c: Client) -> None:
    a = c.mkdir(b"a")
    c.mkdir(b"b", a)
    assert c.err(Rename(a, b"b", ROOT, b"a", RENAME_EXCHANGE)) == errno.EINVAL


def test_rename_with_unknown_or_conflicting_flags_is_einval(c: Client) -> None:
    c.mknod(b"f")
    c.mknod(b"g")
    for flags in (8, RENAME_NOREPLACE | RENAME_EXCHANGE, RENAME_WHITEOUT, -1):
        assert c.err(Rename(ROOT, b"f", ROOT, b"g", flags)) == errno.EINVAL


def test_rename_of_a_directory_moves_its_dotdot_and_link_counts(c: Client) -> None:
    a, b = c.mkdir(b"a"), c.mkdir(b"b")
    d = c.mkdir(b"d", a)
    c.ok(Rename(a, b"d", b, b"d"))
    assert c.lookup(b"..", d).ino == b
    assert (c.attr(a).nlink, c.attr(b).nlink) == (2, 3)


def test_rename_updates_ctime_of_the_inode_and_both_parents(c: Client) -> None:
    a, b = c.mkdir(b"a"), c.mkdir(b"b")
    f = c.mknod(b"f", a)
    c.ok(Rename(a, b"f", b, b"f"))
    now = c.now_ns
    assert c.attr(f).ctime_ns == now
    assert c.attr(a).mtime_ns == c.attr(b).mtime_ns == now


def test_rename_exchange_updates_ctime_of_both_inodes_and_both_parents(c: Client) -> None:
    a, b = c.mkdir(b"a"), c.mkdir(b"b")
    f, g = c.mknod(b"f", a), c.mknod(b"g", b)
    c.ok(Rename(a, b"f", b, b"g", RENAME_EXCHANGE))
    now = c.now_ns
    assert c.attr(f).ctime_ns == c.attr(g).ctime_ns == now
    assert c.attr(f).mtime_ns < now and c.attr(g).mtime_ns < now
    assert c.attr(a).mtime_ns == c.attr(b).mtime_ns == now


def test_rename_into_a_missing_or_non_directory_parent_fails(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(Rename(ROOT, b"f", InodeId(999), b"x")) == errno.ENOENT
    assert c.err(Rename(ROOT, b"f", f, b"x")) == errno.ENOTDIR


def test_a_long_rename_chain_keeps_the_tree_consistent(c: Client) -> None:
    parent = ROOT
    for i in range(30):
        parent = c.mkdir(b"%d" % i, parent)
    c.ok(Mkdir(ROOT, b"top", 0o755))
    top = c.lookup(b"top").ino
    c.ok(Rename(ROOT, b"0", top, b"moved"))
    assert c.err(Rename(top, b"moved", parent, b"loop")) == errno.EINVAL
    c.ns.verify()
    assert c.qok(StatFs()).directories == 32
