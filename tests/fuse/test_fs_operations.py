"""The pyfuse3 operations called directly, without a kernel mount (as s3ql tests do):
lookup counts and forget, the error wrapper, readdir cookies, keep_cache, credentials.

The leader is the stand-in (the real namespace in this process); tests that move file
data start real dataservers.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from fuse_client.chunk_io import DataserverPool
from fuse_client.entry_cache import STATAHEAD_FOUND_MISSES
from fuse_client.file_client import FileClient, FileClientSettings
from fuse_client.fs import STATAHEAD_WAIT_S, GroupsCache, PaxfsOperations
from metaserver.namespace import NamespaceConfig
from tests.fuse.standin_leader import serve_standin
from tests.proc.dataserver_harness import KEY, Cluster
from wire.address import Address
from wire.config import MountSettings
from wire.errors import RpcError
from wire.ids import ROOT_INODE
from wire.namespace_ops import ROOT_CREDENTIALS, Credentials

CHUNK = 256 * 1024


@dataclass
class Ctx:
    """What pyfuse3's RequestContext offers the handlers."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


ROOT_CTX = Ctx(pid=os.getpid())


@asynccontextmanager
async def operations(
    tmp_path: Path | None = None, dataservers: int = 0, list_ahead: bool = True
) -> AsyncIterator[PaxfsOperations]:
    async with trio.open_nursery() as nursery:
        leader = await nursery.start(
            serve_standin,
            KEY,
            Address("127.0.0.1", 0),
            NamespaceConfig(chunk_size_bytes=CHUNK, default_goal=min(3, max(1, dataservers))),
        )
        host, port = leader.address.rsplit(":", 1)
        from fuse_client.meta_client import open_meta_client

        async with (
            open_meta_client([Address(host, int(port))], KEY) as meta,
            DataserverPool.open(KEY) as pool,
        ):
            cluster = None
            if dataservers:
                assert tmp_path is not None
                cluster = Cluster(tmp_path, leader.fake, int(port), pool)
                for position in range(dataservers):
                    cluster.spawn(f"ds{position}")
                for server in cluster.dataservers:
                    await cluster.started(server)
            try:
                client = FileClient(meta, pool, CHUNK, FileClientSettings())
                ops = PaxfsOperations(client, MountSettings(attr_timeout_s=0.5))
                if list_ahead:
                    nursery.start_soon(ops.list_ahead_forever)
                yield ops
            finally:
                if cluster is not None:
                    cluster.stop_all()
        nursery.cancel_scope.cancel()


async def fuse_errno(awaitable: Any) -> int:
    try:
        await awaitable
    except pyfuse3.FUSEError as error:
        return error.errno
    return 0


async def test_lookup_counts_follow_every_reference_and_forget() -> None:
    async with operations() as ops:
        directory = await ops.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)
        ino = directory.st_ino
        assert ops.lookups[ino] == 1
        await ops.lookup(ROOT_INODE, b"d", ROOT_CTX)
        await ops.lookup(ROOT_INODE, b"d", ROOT_CTX)
        assert ops.lookups[ino] == 3
        assert await fuse_errno(ops.lookup(ROOT_INODE, b"missing", ROOT_CTX)) == errno.ENOENT
        info, entry = await ops.create(ino, b"f", 0o644, os.O_WRONLY, ROOT_CTX)
        assert ops.lookups[entry.st_ino] == 1
        link = await ops.link(entry.st_ino, ino, b"g", ROOT_CTX)
        assert ops.lookups[entry.st_ino] == 2 and link.st_nlink == 2
        await ops.release(info.fh)
        await ops.forget([(ino, 2)])
        assert ops.lookups[ino] == 1
        await ops.forget([(ino, 1), (entry.st_ino, 2)])
        assert ino not in ops.lookups and entry.st_ino not in ops.lookups
        await ops.forget([(12345, 7), ("nonsense", None)])  # type: ignore[list-item]
        assert ops.lookups == {}


async def test_readdir_counts_only_accepted_entries_and_resumes_by_cookie(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with operations() as ops:
        for number in range(30):
            await ops.mknod(
                ROOT_INODE, f"n{number:02d}".encode(), stat.S_IFREG | 0o644, 0, ROOT_CTX
            )
        accepted: list[tuple[bytes, int]] = []
        budget = [12]

        def reply(_token: Any, name: bytes, _attr: Any, next_id: int) -> bool:
            if budget[0] == 0:
                return False
            budget[0] -= 1
            accepted.append((name, next_id))
            return True

        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        before = sum(ops.lookups.values())  # one per mknod
        fh = await ops.opendir(ROOT_INODE, ROOT_CTX)
        await ops.readdir(fh, 0, None)
        assert [name for name, _ in accepted[:2]] == [b".", b".."]
        assert sum(ops.lookups.values()) == before + 10  # "." and ".." are not counted
        # Entries change between two calls: the listing neither repeats nor skips.
        await ops.unlink(ROOT_INODE, b"n00", ROOT_CTX)
        await ops.mknod(ROOT_INODE, b"late", stat.S_IFREG | 0o644, 0, ROOT_CTX)
        budget[0] = 1000
        await ops.readdir(fh, accepted[-1][1], None)
        names = [name for name, _ in accepted[2:]]
        assert len(names) == len(set(names))
        assert {f"n{n:02d}".encode() for n in range(1, 30)} <= set(names)
        await ops.releasedir(fh)


async def test_unexpected_errors_become_eio_and_enosys_is_never_returned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with operations() as ops:

        async def broken(*_args: Any) -> Any:
            raise KeyError("a bug")

        async def unsupported(*_args: Any) -> Any:
            raise RpcError(errno.ENOSYS, "unknown method")

        with caplog.at_level(logging.ERROR):
            ops.client.meta.query = broken  # type: ignore[method-assign]
            assert await fuse_errno(ops.getattr(ROOT_INODE, ROOT_CTX)) == errno.EIO
        assert "a bug" in caplog.text
        ops.client.meta.query = unsupported  # type: ignore[method-assign]
        assert await fuse_errno(ops.lookup(ROOT_INODE, b"x", ROOT_CTX)) == errno.EIO
        assert await fuse_errno(ops.read(999, 0, 10)) == errno.EBADF
        await ops.release(999)  # unknown handles are ignored, never raised


async def test_caller_identity_reaches_the_namespace() -> None:
    async with operations() as ops:
        sticky = await ops.mkdir(ROOT_INODE, b"tmp", 0o1777, ROOT_CTX)
        await ops.setattr(
            sticky.st_ino, _attr(mode=stat.S_IFDIR | 0o1777), _fields(mode=True), None, ROOT_CTX
        )
        user_a, user_b = Ctx(1000, 1000), Ctx(1001, 1001)
        info, entry = await ops.create(sticky.st_ino, b"mine", 0o644, os.O_WRONLY, user_a)
        await ops.release(info.fh)
        assert (entry.st_uid, entry.st_gid) == (1000, 1000)
        assert await fuse_errno(ops.unlink(sticky.st_ino, b"mine", user_b)) == errno.EPERM
        # A touch (UTIME_NOW) by a non-owner with write permission is allowed...
        await ops.setattr(
            entry.st_ino, _attr(mode=stat.S_IFREG | 0o666), _fields(mode=True), None, user_a
        )
        fields = _fields(atime=True, mtime=True)
        assert await fuse_errno(ops.setattr(entry.st_ino, _attr(), fields, None, user_b)) == 0
        # ...chmod by a non-owner is not.
        assert (
            await fuse_errno(
                ops.setattr(entry.st_ino, _attr(mode=0o777), _fields(mode=True), None, user_b)
            )
            == errno.EPERM
        )


async def test_keep_cache_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    async with operations(tmp_path, dataservers=1) as ops:
        info, entry = await ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT_CTX)
        await ops.write(info.fh, 0, b"one")
        await ops.release(info.fh)
        first = await ops.open(entry.st_ino, os.O_RDONLY, ROOT_CTX)
        assert await ops.read(first.fh, 0, 100) == b"one"
        second = await ops.open(entry.st_ino, os.O_RDONLY, ROOT_CTX)
        assert second.keep_cache  # unchanged since this mount saw it
        await ops.release(first.fh)
        await ops.release(second.fh)
        # Another client changes the file.
        other = ops.client
        handle = await other.open(entry.st_ino, Credentials(0, 0, ()))
        await trio.sleep(0.01)
        await handle.write(0, b"two!")
        await handle.release()
        third = await ops.open(entry.st_ino, os.O_RDONLY, ROOT_CTX)
        assert not third.keep_cache
        assert await ops.read(third.fh, 0, 100) == b"two!"
        await ops.release(third.fh)


async def test_a_stat_scan_is_served_by_one_listing_and_changes_here_show_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with operations() as ops:
        directory = (await ops.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)).st_ino
        names = [b"f%03d" % number for number in range(60)]
        inodes = {}
        for name in names:
            info, entry = await ops.create(directory, name, 0o644, os.O_WRONLY, ROOT_CTX)
            await ops.release(info.fh)
            inodes[name] = entry.st_ino
        ops.entries.clear()  # as if every entry had expired
        calls = count_queries(ops, monkeypatch)
        # After a few names, the directory is listed in the background and the lookups
        # that follow wait for its pages instead of asking the namespace.
        for name in names:
            entry = await ops.lookup(directory, name, ROOT_CTX)
            assert entry.st_ino == inodes[name]
            assert 0 < entry.entry_timeout <= ops.settings.entry_timeout_s
            assert 0 < entry.attr_timeout <= ops.settings.attr_timeout_s
        assert calls == {"Lookup": STATAHEAD_FOUND_MISSES, "ReadDir": 1}

        last = inodes[names[-1]]
        await ops.setattr(
            last, _attr(mode=stat.S_IFREG | 0o600), _fields(mode=True), None, ROOT_CTX
        )
        assert stat.S_IMODE((await ops.lookup(directory, names[-1], ROOT_CTX)).st_mode) == 0o600
        assert stat.S_IMODE((await ops.getattr(last, ROOT_CTX)).st_mode) == 0o600
        await ops.unlink(directory, names[0], ROOT_CTX)
        assert await fuse_errno(ops.lookup(directory, names[0], ROOT_CTX)) == errno.ENOENT
        await ops.rename(directory, names[1], directory, names[2], 0, ROOT_CTX)
        assert await fuse_errno(ops.lookup(directory, names[1], ROOT_CTX)) == errno.ENOENT
        assert (await ops.lookup(directory, names[2], ROOT_CTX)).st_ino == inodes[names[1]]
        link = await ops.link(inodes[names[3]], directory, b"again", ROOT_CTX)
        assert link.st_nlink == 2
        assert (await ops.lookup(directory, names[3], ROOT_CTX)).st_nlink == 2
        assert (await ops.getattr(directory, ROOT_CTX)).st_size == len(names) - 1


async def test_a_new_file_has_no_xattrs_without_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    async with operations() as ops:
        info, entry = await ops.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, ROOT_CTX)
        await ops.release(info.fh)
        calls = count_queries(ops, monkeypatch)
        capability = b"security.capability"  # what the kernel asks before a first write
        assert await fuse_errno(ops.getxattr(entry.st_ino, capability, ROOT_CTX)) == errno.ENODATA
        assert calls == {}
        await ops.setxattr(entry.st_ino, b"user.k", b"v", ROOT_CTX)
        assert await ops.getxattr(entry.st_ino, b"user.k", ROOT_CTX) == b"v"
        assert await fuse_errno(ops.getxattr(entry.st_ino, capability, ROOT_CTX)) == errno.ENODATA
        assert await fuse_errno(ops.getxattr(entry.st_ino, capability, ROOT_CTX)) == errno.ENODATA
        assert calls == {"GetXattr": 2}, "an absence the namespace reported is remembered"


def count_queries(ops: PaxfsOperations, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the namespace reads ``ops`` makes from now on, by operation."""
    calls: Counter[str] = Counter()
    query = ops.client.meta.query

    async def counting(op: Any, credentials: Credentials = ROOT_CREDENTIALS) -> Any:
        calls[type(op).__name__] += 1
        return await query(op, credentials)

    monkeypatch.setattr(ops.client.meta, "query", counting)
    return calls


async def test_a_lookup_waits_for_a_stuck_listing_only_once() -> None:
    async with operations(list_ahead=False) as ops:  # nobody serves the listings
        directory = (await ops.mkdir(ROOT_INODE, b"d", 0o755, ROOT_CTX)).st_ino
        names = [b"f%d" % number for number in range(3 * STATAHEAD_FOUND_MISSES)]
        for name in names:
            info, _ = await ops.create(directory, name, 0o644, os.O_WRONLY, ROOT_CTX)
            await ops.release(info.fh)
        ops.entries.clear()
        started = trio.current_time()
        for name in names:
            assert (await ops.lookup(directory, name, ROOT_CTX)).st_ino
        assert trio.current_time() - started < STATAHEAD_WAIT_S + 1.0


def test_groups_cache_is_bounded() -> None:
    cache = GroupsCache(capacity=3)
    for pid in (os.getpid(), 1, 999_999_999, os.getppid(), os.getpid()):
        cache.groups(pid)
    assert len(cache) == 3
    assert cache.groups(0) == ()


def _attr(**fields: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    for name, value in fields.items():
        setattr(attr, "st_" + name, value)
    return attr


@dataclass
class Fields:
    """What pyfuse3's SetattrFields offers (its attributes are read-only)."""

    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


def _fields(**updates: bool) -> Any:
    return Fields(**{"update_" + name: value for name, value in updates.items()})
