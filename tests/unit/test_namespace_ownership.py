"""The rules the kernel leaves to the file system: sticky bits, chown/chmod ownership,
setgid inheritance, and the clearing of setuid/setgid; plus utimes permissions."""

from __future__ import annotations

import errno
import stat

import pytest

from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    RENAME_EXCHANGE,
    Create,
    Credentials,
    Mkdir,
    Rename,
    Rmdir,
    SetAttr,
    SetGoal,
    Unlink,
)

from .test_namespace_support import ALICE, BOB, CAROL, ROOT, Client

ROOT_DIR = InodeId(ROOT_INODE)


@pytest.fixture
def c() -> Client:
    client = Client()
    client.ok(Mkdir(ROOT_DIR, b"tmp", 0o1777))
    client.ok(Mkdir(ROOT_DIR, b"pub", 0o777))
    return client


def tmp(c: Client) -> InodeId:
    return c.lookup(b"tmp").ino


def pub(c: Client) -> InodeId:
    return c.lookup(b"pub").ino


# ---------------------------------------------------------------- sticky directories


def test_sticky_unlink_by_someone_else_is_eperm(c: Client) -> None:
    c.mknod(b"f", tmp(c), cred=ALICE)
    assert c.err(Unlink(tmp(c), b"f"), BOB) == errno.EPERM


def test_rename_exchange_onto_someone_elses_file_in_a_sticky_directory_is_eperm(
    c: Client,
) -> None:
    """renameat2(RENAME_EXCHANGE) removes both names: may_delete checks the sticky bit
    for the target too, though the caller owns the source."""
    mine = c.mknod(b"mine", tmp(c), cred=BOB)
    theirs = c.mknod(b"theirs", tmp(c), cred=ALICE)
    exchange = Rename(tmp(c), b"mine", tmp(c), b"theirs", RENAME_EXCHANGE)
    assert c.err(exchange, BOB) == errno.EPERM
    assert c.lookup(b"mine", tmp(c)).ino == mine and c.lookup(b"theirs", tmp(c)).ino == theirs
    c.ok(exchange, ROOT)  # the sticky bit binds everyone but the owners and root


def test_sticky_unlink_by_the_file_owner_is_allowed(c: Client) -> None:
    c.mknod(b"f", tmp(c), cred=ALICE)
    c.ok(Unlink(tmp(c), b"f"), ALICE)


def test_sticky_unlink_by_the_directory_owner_is_allowed(c: Client) -> None:
    d = c.mkdir(b"mine", pub(c), mode=0o1777, cred=BOB)
    c.mknod(b"f", d, cred=ALICE)
    c.ok(Unlink(d, b"f"), BOB)


def test_sticky_unlink_by_root_is_allowed(c: Client) -> None:
    c.mknod(b"f", tmp(c), cred=ALICE)
    c.ok(Unlink(tmp(c), b"f"), ROOT)


def test_sticky_rmdir_by_someone_else_is_eperm(c: Client) -> None:
    c.mkdir(b"d", tmp(c), cred=ALICE)
    assert c.err(Rmdir(tmp(c), b"d"), BOB) == errno.EPERM


def test_sticky_check_comes_before_the_type_check(c: Client) -> None:
    c.mkdir(b"d", tmp(c), cred=ALICE)
    assert c.err(Unlink(tmp(c), b"d"), BOB) == errno.EPERM


def test_sticky_rename_away_by_someone_else_is_eperm(c: Client) -> None:
    c.mknod(b"f", tmp(c), cred=ALICE)
    assert c.err(Rename(tmp(c), b"f", tmp(c), b"g"), BOB) == errno.EPERM


def test_sticky_rename_over_someone_elses_file_is_eperm(c: Client) -> None:
    c.mknod(b"mine", tmp(c), cred=BOB)
    c.mknod(b"theirs", tmp(c), cred=ALICE)
    assert c.err(Rename(tmp(c), b"mine", tmp(c), b"theirs"), BOB) == errno.EPERM
    c.ok(Rename(tmp(c), b"theirs", tmp(c), b"mine"), ROOT)


def test_non_sticky_directories_let_anyone_remove(c: Client) -> None:
    c.mknod(b"f", pub(c), cred=ALICE)
    c.ok(Unlink(pub(c), b"f"), BOB)


# ---------------------------------------------------------------- chmod


def test_chmod_by_a_non_owner_is_eperm(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.err(SetAttr(f, mode=0o600), BOB) == errno.EPERM


def test_chmod_by_the_owner_or_root_works(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.ok(SetAttr(f, mode=0o600), ALICE).attr.mode == stat.S_IFREG | 0o600
    assert c.ok(SetAttr(f, mode=0o640), ROOT).attr.mode == stat.S_IFREG | 0o640


def test_chmod_keeps_the_file_type_and_accepts_it_in_the_mode(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.ok(SetAttr(f, mode=stat.S_IFREG | 0o711)).attr.mode == stat.S_IFREG | 0o711
    assert c.err(SetAttr(f, mode=stat.S_IFDIR | 0o711)) == errno.EINVAL


def test_chmod_setgid_by_a_non_member_is_silently_dropped(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    c.ok(SetAttr(f, gid=2000), ROOT)
    attr = c.ok(SetAttr(f, mode=0o2755), ALICE).attr
    assert attr.mode == stat.S_IFREG | 0o755


def test_chmod_setgid_by_a_member_of_the_group_sticks(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.ok(SetAttr(f, mode=0o2755), ALICE).attr.mode == stat.S_IFREG | 0o2755


def test_chmod_of_a_symlink_is_eopnotsupp(c: Client) -> None:
    s = c.symlink(b"s", b"t")
    assert c.err(SetAttr(s, mode=0o700)) == errno.EOPNOTSUPP


def test_anyone_may_clear_setuid_setgid_of_a_file_as_the_kernel_does_after_a_write(
    c: Client,
) -> None:
    f = c.mknod(b"f", pub(c), mode=0o106777, cred=ALICE)
    attr = c.ok(SetAttr(f, mode=0o0777), BOB).attr
    assert attr.mode == stat.S_IFREG | 0o777
    assert c.err(SetAttr(f, mode=0o0775), BOB) == errno.EPERM


# ---------------------------------------------------------------- chown


def test_chown_to_another_user_needs_root(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.err(SetAttr(f, uid=BOB.uid), ALICE) == errno.EPERM
    assert c.ok(SetAttr(f, uid=BOB.uid), ROOT).attr.uid == BOB.uid


def test_chown_to_oneself_by_the_owner_is_allowed(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    c.ok(SetAttr(f, uid=ALICE.uid), ALICE)


def test_chown_by_a_non_owner_is_eperm_even_to_the_current_owner(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.err(SetAttr(f, uid=ALICE.uid), BOB) == errno.EPERM


def test_chgrp_by_the_owner_to_one_of_its_groups_is_allowed(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=CAROL)
    assert c.ok(SetAttr(f, gid=1000), CAROL).attr.gid == 1000


def test_chgrp_to_a_group_the_owner_is_not_in_is_eperm(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.err(SetAttr(f, gid=BOB.gid), ALICE) == errno.EPERM


def test_chgrp_by_a_non_owner_is_eperm(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.err(SetAttr(f, gid=1000), CAROL) == errno.EPERM


def test_chown_clears_setuid_even_by_root(c: Client) -> None:
    f = c.mknod(b"f", mode=0o4755)
    assert c.ok(SetAttr(f, uid=ALICE.uid)).attr.mode == stat.S_IFREG | 0o755


def test_chown_clears_group_executable_setgid(c: Client) -> None:
    f = c.mknod(b"f", mode=0o2755)
    assert c.ok(SetAttr(f, gid=5)).attr.mode == stat.S_IFREG | 0o755


def test_chown_by_root_keeps_setgid_without_group_execute(c: Client) -> None:
    f = c.mknod(b"f", mode=0o2745)
    assert c.ok(SetAttr(f, gid=5)).attr.mode == stat.S_IFREG | 0o2745


def test_chown_keeps_setgid_of_a_directory(c: Client) -> None:
    d = c.mkdir(b"d")
    c.ok(SetAttr(d, mode=0o2775))
    assert c.ok(SetAttr(d, gid=5)).attr.mode == stat.S_IFDIR | 0o2775


def test_chown_id_out_of_range_is_einval(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(SetAttr(f, uid=2**32 - 1)) == errno.EINVAL
    assert c.err(SetAttr(f, gid=-1)) == errno.EINVAL


# ---------------------------------------------------------------- setgid directories


def test_files_in_a_setgid_directory_take_its_group(c: Client) -> None:
    d = c.mkdir(b"shared", pub(c))
    c.ok(SetAttr(d, mode=0o2777, gid=4242))
    f = c.mknod(b"f", d, cred=ALICE)
    attr = c.attr(f)
    assert (attr.uid, attr.gid) == (ALICE.uid, 4242)


def test_files_created_with_o_creat_in_a_setgid_directory_take_its_group(c: Client) -> None:
    d = c.mkdir(b"d", pub(c), mode=0o777, cred=ALICE)
    c.ok(SetAttr(d, mode=0o2777), ALICE)
    attr = c.ok(Create(d, b"f", 0o2755, True), BOB).attr
    assert (attr.uid, attr.gid) == (BOB.uid, ALICE.gid)
    assert not attr.mode & stat.S_ISGID  # group-executable, and Bob is not in the group
    assert c.ok(Create(d, b"g", 0o2755, True), CAROL).attr.mode & stat.S_ISGID


def test_subdirectories_of_a_setgid_directory_inherit_setgid(c: Client) -> None:
    d = c.mkdir(b"shared")
    c.ok(SetAttr(d, mode=0o2777, gid=4242))
    sub = c.mkdir(b"sub", d, mode=0o755, cred=ALICE)
    attr = c.attr(sub)
    assert attr.gid == 4242 and attr.mode == stat.S_IFDIR | 0o2755


def test_a_non_member_creating_a_setgid_executable_in_a_setgid_directory_loses_setgid(
    c: Client,
) -> None:
    d = c.mkdir(b"shared")
    c.ok(SetAttr(d, mode=0o2777, gid=4242))
    f = c.mknod(b"f", d, mode=0o2755, cred=ALICE)
    assert c.attr(f).mode == stat.S_IFREG | 0o755
    g = c.mknod(b"g", d, mode=0o2755, cred=Credentials(1000, 1000, (4242,)))
    assert c.attr(g).mode == stat.S_IFREG | 0o2755


def test_mkdir_ignores_a_requested_setgid_outside_setgid_directories(c: Client) -> None:
    d = c.mkdir(b"d", mode=0o2755)
    assert c.attr(d).mode == stat.S_IFDIR | 0o755


# ---------------------------------------------------------------- setuid/setgid on write


def test_a_write_by_a_non_root_user_clears_setuid(c: Client) -> None:
    f = c.mknod(b"f", pub(c), mode=0o4777, cred=ALICE)
    assert c.write(f, 0, 5, BOB).mode == stat.S_IFREG | 0o777


def test_a_write_clears_group_executable_setgid(c: Client) -> None:
    f = c.mknod(b"f", pub(c), mode=0o2775, cred=ALICE)
    assert c.write(f, 0, 5, ALICE).mode == stat.S_IFREG | 0o775


def test_a_write_by_a_group_member_keeps_setgid_without_group_execute(c: Client) -> None:
    f = c.mknod(b"f", pub(c), mode=0o2764, cred=ALICE)
    assert c.write(f, 0, 5, CAROL).mode == stat.S_IFREG | 0o2764
    assert c.write(f, 0, 5, BOB).mode == stat.S_IFREG | 0o764


def test_a_write_by_root_keeps_setuid_and_setgid(c: Client) -> None:
    f = c.mknod(b"f", mode=0o6755)
    assert c.write(f, 0, 5, ROOT).mode == stat.S_IFREG | 0o6755


def test_a_truncate_by_a_non_root_user_clears_setuid(c: Client) -> None:
    f = c.mknod(b"f", pub(c), mode=0o4766, cred=ALICE)
    assert c.ok(SetAttr(f, size=3), BOB).attr.mode == stat.S_IFREG | 0o766


# ---------------------------------------------------------------- times


def test_setting_times_to_now_needs_ownership_or_write_permission(c: Client) -> None:
    f = c.mknod(b"f", pub(c), mode=0o644, cred=ALICE)
    assert c.err(SetAttr(f, atime_now=True, mtime_now=True), BOB) == errno.EACCES
    c.ok(SetAttr(f, mode=0o646), ALICE)
    attr = c.ok(SetAttr(f, atime_now=True, mtime_now=True), BOB).attr
    assert attr.atime_ns == attr.mtime_ns == attr.ctime_ns == c.now_ns


def test_setting_explicit_times_needs_ownership(c: Client) -> None:
    f = c.mknod(b"f", pub(c), mode=0o666, cred=ALICE)
    assert c.err(SetAttr(f, mtime_ns=5), BOB) == errno.EPERM
    assert c.err(SetAttr(f, atime_now=True), BOB) == errno.EPERM
    attr = c.ok(SetAttr(f, atime_ns=-7, mtime_ns=123_456_789_012), ALICE).attr
    assert (attr.atime_ns, attr.mtime_ns) == (-7, 123_456_789_012)
    assert attr.ctime_ns == c.now_ns


def test_a_time_given_both_explicitly_and_as_now_is_einval(c: Client) -> None:
    f = c.mknod(b"f")
    assert c.err(SetAttr(f, mtime_ns=5, mtime_now=True)) == errno.EINVAL
    assert c.err(SetAttr(f, atime_ns=2**63)) == errno.EINVAL


def test_setattr_is_all_or_nothing(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    before = c.attr(f)
    assert c.err(SetAttr(f, mode=0o600, uid=BOB.uid), ALICE) == errno.EPERM
    assert c.attr(f) == before


def test_atime_now_alone_by_the_owner_changes_atime_and_ctime_not_mtime(c: Client) -> None:
    """utimensat(UTIME_NOW, UTIME_OMIT) by the owner: atime, and ctime as for any
    attribute change (Linux notify_change), but never mtime."""
    f = c.mknod(b"f", pub(c), cred=ALICE)
    c.ok(SetAttr(f, atime_ns=5, mtime_ns=6), ALICE)
    attr = c.ok(SetAttr(f, atime_now=True), ALICE).attr
    assert (attr.atime_ns, attr.mtime_ns, attr.ctime_ns) == (c.now_ns, 6, c.now_ns)


# ---------------------------------------------------------------- goal


def test_setgoal_by_a_non_owner_is_eperm(c: Client) -> None:
    f = c.mknod(b"f", pub(c), cred=ALICE)
    assert c.err(SetGoal(f, goal=2), BOB) == errno.EPERM
    assert c.ok(SetGoal(f, goal=2), ALICE).attr.goal == 2
