"""Extended attributes (man 7 xattr): limits, flags, namespaces and permissions."""

from __future__ import annotations

import errno
import stat

import pytest

from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    XATTR_CREATE,
    XATTR_LIST_MAX_BYTES,
    XATTR_REPLACE,
    XATTR_VALUE_MAX_BYTES,
    GetXattr,
    ListXattr,
    Mkdir,
    Mknod,
    RemoveXattr,
    SetXattr,
)

from .test_namespace_support import ALICE, BOB, Client

ROOT = InodeId(ROOT_INODE)


@pytest.fixture
def c() -> Client:
    return Client()


def test_set_then_get_returns_the_value(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(SetXattr(f, b"user.colour", b"blue"))
    assert c.qok(GetXattr(f, b"user.colour")).value == b"blue"


def test_an_empty_value_is_a_value(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(SetXattr(f, b"user.flag", b""))
    assert c.qok(GetXattr(f, b"user.flag")).value == b""


def test_get_of_a_missing_attribute_is_enodata(c: Client) -> None:
    assert c.qerr(GetXattr(c.mknod(b"f"), b"user.x")) == errno.ENODATA


def test_xattr_create_on_an_existing_attribute_is_eexist(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(SetXattr(f, b"user.a", b"1", XATTR_CREATE))
    assert c.err(SetXattr(f, b"user.a", b"2", XATTR_CREATE)) == errno.EEXIST
    assert c.qok(GetXattr(f, b"user.a")).value == b"1"


def test_xattr_replace_on_a_missing_attribute_is_enodata(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(SetXattr(f, b"user.a", b"1", XATTR_REPLACE)) == errno.ENODATA
    c.ok(SetXattr(f, b"user.a", b"1"))
    c.ok(SetXattr(f, b"user.a", b"2", XATTR_REPLACE))
    assert c.qok(GetXattr(f, b"user.a")).value == b"2"


def test_xattr_create_and_replace_together_fail_whether_or_not_the_name_exists(
    c: Client,
) -> None:
    """Both flags are accepted by setxattr(2) (fs/xattr.c checks only unknown bits) and
    then each applies, as ext4 and tmpfs do: ENODATA for a missing name (REPLACE),
    EEXIST for an existing one (CREATE); never EINVAL, and the value is never set."""
    f = c.mknod(b"f")
    both = XATTR_CREATE | XATTR_REPLACE
    assert c.err(SetXattr(f, b"user.a", b"1", both)) == errno.ENODATA
    c.ok(SetXattr(f, b"user.a", b"1"))
    assert c.err(SetXattr(f, b"user.a", b"2", both)) == errno.EEXIST
    assert c.qok(GetXattr(f, b"user.a")).value == b"1"


def test_unknown_flags_are_einval(c: Client) -> None:
    assert c.err(SetXattr(c.mknod(b"f"), b"user.a", b"1", 4)) == errno.EINVAL


def test_names_longer_than_255_bytes_or_empty_are_erange(c: Client) -> None:
    f = c.mknod(b"f")
    long_name = b"user." + b"x" * 251
    assert c.err(SetXattr(f, long_name, b"v")) == errno.ERANGE
    assert c.err(SetXattr(f, b"", b"v")) == errno.ERANGE
    c.ok(SetXattr(f, long_name[:255], b"v"))


def test_values_over_64_kib_are_e2big(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(SetXattr(f, b"user.big", b"v" * (XATTR_VALUE_MAX_BYTES + 1))) == errno.E2BIG
    c.ok(SetXattr(f, b"user.big", b"v" * XATTR_VALUE_MAX_BYTES))


def test_an_unknown_namespace_is_eopnotsupp(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(SetXattr(f, b"colour", b"v")) == errno.EOPNOTSUPP
    assert c.err(SetXattr(f, b"system.other", b"v")) == errno.EOPNOTSUPP
    assert c.qerr(GetXattr(f, b"colour")) == errno.EOPNOTSUPP


def test_a_bare_namespace_prefix_is_einval(c: Client) -> None:
    assert c.err(SetXattr(c.mknod(b"f"), b"user.", b"v")) == errno.EINVAL


def test_user_attributes_on_special_files_are_eperm(c: Client) -> None:
    fifo = c.mknod(b"p", mode=stat.S_IFIFO | 0o666)
    link = c.symlink(b"s", b"t")
    for ino in (fifo, link):
        assert c.err(SetXattr(ino, b"user.a", b"v")) == errno.EPERM
        assert c.qerr(GetXattr(ino, b"user.a")) == errno.ENODATA
    c.ok(SetXattr(link, b"security.selinux", b"ctx"))


def test_user_attributes_of_a_sticky_directory_are_for_its_owner(c: Client) -> None:
    c.ok(Mkdir(ROOT, b"tmp", 0o1777))
    tmp = c.lookup(b"tmp").ino
    assert c.err(SetXattr(tmp, b"user.a", b"v"), ALICE) == errno.EPERM
    c.ok(SetXattr(tmp, b"user.a", b"v"))


def test_trusted_attributes_are_root_only_and_hidden_from_others(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(SetXattr(f, b"trusted.a", b"v"), ALICE) == errno.EPERM
    c.ok(SetXattr(f, b"trusted.a", b"v"))
    c.ok(SetXattr(f, b"user.b", b"v"))
    assert c.qerr(GetXattr(f, b"trusted.a"), ALICE) == errno.ENODATA
    assert c.qok(ListXattr(f), ALICE).names == (b"user.b",)
    assert c.qok(ListXattr(f)).names == (b"trusted.a", b"user.b")


def test_list_is_sorted_and_remove_removes(c: Client) -> None:
    f = c.mknod(b"f")
    for name in (b"user.c", b"user.a", b"user.b"):
        c.ok(SetXattr(f, name, b"v"))
    assert c.qok(ListXattr(f)).names == (b"user.a", b"user.b", b"user.c")
    c.ok(RemoveXattr(f, b"user.b"))
    assert c.qok(ListXattr(f)).names == (b"user.a", b"user.c")
    assert c.err(RemoveXattr(f, b"user.b")) == errno.ENODATA


def test_the_list_size_limit_gives_enospc(c: Client) -> None:
    f = c.mknod(b"f")
    name_count = XATTR_LIST_MAX_BYTES // 256
    for i in range(name_count):
        c.ok(SetXattr(f, b"user." + b"%0250d" % i, b""))
    assert c.err(SetXattr(f, b"user." + b"x" * 250, b"")) == errno.ENOSPC
    c.ns.verify()


def test_setting_and_removing_update_ctime(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(SetXattr(f, b"user.a", b"1"))
    assert c.attr(f).ctime_ns == c.now_ns
    c.ok(RemoveXattr(f, b"user.a"))
    assert c.attr(f).ctime_ns == c.now_ns


def test_attributes_go_with_the_inode(c: Client) -> None:
    f = c.mknod(b"f")
    c.ok(SetXattr(f, b"user.a", b"1"))
    c.ok(Mknod(ROOT, b"g", 0o644))
    assert c.qok(ListXattr(c.lookup(b"g").ino)).names == ()
    assert c.qerr(ListXattr(InodeId(999)), BOB) == errno.ENOENT
