"""The file-level client against real dataserver processes and a leader.

The leader is the real namespace behind the stand-in of :mod:`tests.fuse.standin_leader`
(in this process, so a test can see and kill the chain a write goes through); the
dataservers are real processes.  Real clusters are tested through the mount
(``tests/fuse``).
Randomised tests print their seed; replay with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fuse_client.chunk_io import DataserverPool
from fuse_client.file_client import (
    FileClient,
    FileClientSettings,
    FileIoError,
    OpenFile,
    open_file_client,
)
from metaserver.namespace import NamespaceConfig
from tests.fuse.standin_leader import StandinLeader, serve_standin
from tests.proc.dataserver_harness import KEY, Cluster
from wire.address import Address
from wire.config import Config
from wire.errors import RpcError
from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    CLOSE_SESSION,
    CloseSession,
    Credentials,
    Lookup,
    SetAttr,
    StatFs,
    Unlink,
)

CHUNK = 256 * 1024
ROOT = Credentials(0, 0, ())


def seed_of(request: pytest.FixtureRequest) -> int:
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"{request.node.name}: seed {seed} (replay with PAXFS_SEED={seed})")
    return seed


@dataclass
class Setup:
    leader: StandinLeader
    cluster: Cluster
    config: Config

    @asynccontextmanager
    async def client(self, **settings: int) -> AsyncIterator[FileClient]:
        async with open_file_client(
            self.config, name="test", settings=FileClientSettings(**settings)
        ) as client:
            yield client


@asynccontextmanager
async def running(tmp_path: Path, dataservers: int = 3) -> AsyncIterator[Setup]:
    async with trio.open_nursery() as nursery:
        leader = await nursery.start(
            serve_standin,
            KEY,
            Address("127.0.0.1", 0),
            NamespaceConfig(chunk_size_bytes=CHUNK, default_goal=3),
        )
        port = int(leader.address.rsplit(":", 1)[1])
        config = Config()
        config.cluster.key = KEY.hex()
        config.cluster.metaservers = {"1": f"127.0.0.1:{port}"}
        config.cluster.chunk_size_bytes = CHUNK
        async with DataserverPool.open(KEY, name="harness") as pool:
            cluster = Cluster(tmp_path, leader.fake, port, pool)
            try:
                for position in range(dataservers):
                    cluster.spawn(f"ds{position}")
                for server in cluster.dataservers:
                    await cluster.started(server)
                yield Setup(leader, cluster, config)
            finally:
                cluster.stop_all()
        nursery.cancel_scope.cancel()


async def create(client: FileClient, name: bytes) -> OpenFile:
    handle, _attr = await client.create(ROOT_INODE, name, 0o644, ROOT, exclusive=True)
    return handle


async def lookup(client: FileClient, name: bytes) -> InodeId:
    reply = await client.meta.query(Lookup(ROOT_INODE, name), ROOT)
    return reply.attr.ino


async def test_random_writes_and_reads_across_chunks_match_a_local_copy(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed_of(request))
    size_max = 4 * CHUNK + 12345
    model = bytearray()
    async with running(tmp_path) as setup, setup.client(write_buffer_bytes=CHUNK) as client:
        handle = await create(client, b"big")
        for step in range(60):
            offset = rng.randrange(size_max)
            if rng.random() < 0.6:
                data = rng.randbytes(rng.choice([1, 100, 4096, 70_000, CHUNK + 3]))
                await handle.write(offset, data)
                if len(model) < offset + len(data):
                    model.extend(bytes(offset + len(data) - len(model)))
                model[offset : offset + len(data)] = data
            else:
                length = rng.randrange(1, 2 * CHUNK)
                assert await handle.read(offset, length) == bytes(model[offset : offset + length])
            if step % 17 == 0:
                await handle.flush()
            assert client.buffered_bytes <= CHUNK + 4 * 1024 * 1024
        await handle.release()
        async with setup.client() as other:
            again = await other.open(await lookup(other, b"big"), ROOT)
            assert again.size == len(model)
            assert await again.read(0, len(model) + 100) == bytes(model)
            await again.release()


async def test_sparse_file_reads_zeros_in_holes(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as client:
        handle = await create(client, b"sparse")
        await handle.write(3 * CHUNK + 10, b"tail")
        await handle.release()
        again = await client.open(await lookup(client, b"sparse"), ROOT)
        assert again.size == 3 * CHUNK + 14
        data = await again.read(0, 4 * CHUNK)
        assert data == bytes(3 * CHUNK + 10) + b"tail"
        await again.release()


async def test_close_to_open_between_two_clients(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as one, setup.client() as two:
        writer = await create(one, b"shared")
        await writer.write(0, b"first version")
        assert await writer.read(0, 100) == b"first version"  # own unflushed writes
        reader = await two.open(await lookup(two, b"shared"), ROOT)
        assert await reader.read(0, 100) == b""  # not flushed yet
        await reader.release()
        await writer.flush()
        reader = await two.open(await lookup(two, b"shared"), ROOT)
        assert await reader.read(0, 100) == b"first version"
        await reader.release()
        await writer.write(0, b"FIRST")
        await writer.release()
        reader = await two.open(await lookup(two, b"shared"), ROOT)
        assert await reader.read(0, 100) == b"FIRST version"
        await reader.release()


async def test_truncate_then_extend_reads_zeros_not_old_bytes(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as client:
        handle = await create(client, b"cut")
        await handle.write(0, b"x" * (CHUNK + 1000))
        await handle.flush()
        await handle.truncate(100)
        assert await handle.read(0, 1000) == b"x" * 100
        await handle.write(CHUNK // 2, b"y")  # leaves a gap over the cut bytes
        await handle.truncate(CHUNK + 10)
        await handle.release()
        again = await client.open(await lookup(client, b"cut"), ROOT)
        data = await again.read(0, 2 * CHUNK)
        expected = b"x" * 100 + bytes(CHUNK // 2 - 100) + b"y"
        assert data == expected + bytes(CHUNK + 10 - len(expected))
        await again.release()


async def test_unlinked_open_file_stays_readable_and_writable(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as client:
        handle = await create(client, b"doomed")
        await handle.write(0, b"still here")
        await handle.flush()
        await client.meta.mutate(Unlink(ROOT_INODE, b"doomed"), ROOT)
        with pytest.raises(RpcError) as missing:
            await lookup(client, b"doomed")
        assert missing.value.code == errno.ENOENT
        await handle.write(10, b", and more")
        await handle.flush()
        assert await handle.read(0, 100) == b"still here, and more"
        inode = handle.inode
        await handle.release()
        await client.drain_releases()
        with pytest.raises(RpcError) as gone:
            await client.open(inode, ROOT)
        assert gone.value.code == errno.ENOENT


async def test_append_writes_at_the_end(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as client:
        first = await create(client, b"log")
        inode = first.inode
        second = await client.open(inode, ROOT, append=True)
        third = await client.open(inode, ROOT, append=True)
        for line in range(20):
            target = second if line % 2 else third
            await target.write(0, f"line {line}\n".encode())
        for handle in (first, second, third):
            await handle.release()
        again = await client.open(inode, ROOT)
        lines = bytes(await again.read(0, 10_000)).decode().splitlines()
        assert lines == [f"line {n}" for n in range(20)]
        await again.release()


async def test_released_handle_refuses_io(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as client:
        handle = await create(client, b"once")
        await handle.release()
        with pytest.raises(FileIoError) as refused:
            await handle.write(0, b"late")
        assert refused.value.code == errno.EBADF


async def test_setattr_size_on_open_file_publishes_buffered_writes_first(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as client:
        handle = await create(client, b"grow")
        await handle.write(0, b"abc")
        attr = await client.setattr(SetAttr(handle.inode, size=10), ROOT)
        assert attr.size == 10
        assert await handle.read(0, 100) == b"abc" + bytes(7)
        await handle.release()


async def test_dataserver_killed_during_a_large_write_the_write_completes(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed_of(request))
    payload = rng.randbytes(6 * CHUNK + 777)
    async with running(tmp_path, dataservers=4) as setup, setup.client() as client:
        handle = await create(client, b"survivor")
        piece = 64 * 1024
        for offset in range(0, len(payload), piece):
            await handle.write(offset, payload[offset : offset + piece])
            if offset == 2 * CHUNK:
                await handle.flush()
                active = setup.leader.chains
                victim_address = next(iter(active.values()))[0]
                setup.cluster.by_address(victim_address).kill()
        await handle.release()
        again = await client.open(await lookup(client, b"survivor"), ROOT)
        assert await again.read(0, len(payload) + 10) == payload
        await again.release()


async def test_an_open_sees_a_rewrite_another_client_closed_while_we_held_the_file(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as setup, setup.client() as one, setup.client() as two:
        writer = await create(one, b"held")
        await writer.write(0, b"a" * 1000)
        await writer.release()
        inode = await lookup(two, b"held")
        holder = await two.open(inode, ROOT)
        assert await holder.read(0, 10) == b"a" * 10  # locations cached now
        rewriter = await one.open(inode, ROOT)
        await rewriter.write(0, b"b" * 1000)  # same size, a new chunk version
        await rewriter.release()
        fresh = await two.open(inode, ROOT)
        assert await fresh.read(0, 1000) == b"b" * 1000
        await fresh.release()
        await holder.release()


async def test_opens_survive_a_lost_session(tmp_path: Path) -> None:
    async with running(tmp_path) as setup, setup.client() as client, setup.client() as other:
        handle = await create(client, b"kept-open")
        await handle.write(0, b"still readable")
        await handle.flush()
        # The session ends under the client (as after a long partition): the
        # namespace releases its opens; the client reopens a session on its next call.
        old_session = client.meta.client_id
        assert old_session is not None
        await other.meta.call(CLOSE_SESSION, CloseSession(old_session))
        await client.meta.mutate(SetAttr(handle.inode, mode=0o600), ROOT)
        assert client.meta.client_id != old_session
        await client.reregister_opens()
        await other.meta.mutate(Unlink(ROOT_INODE, b"kept-open"), ROOT)
        assert (await other.getattr(handle.inode, ROOT)).nlink == 0  # alive: still open
        assert await handle.read(0, 100) == b"still readable"
        await handle.release()
        await client.drain_releases()
        with pytest.raises(RpcError) as gone:
            await other.open(handle.inode, ROOT)
        assert gone.value.code == errno.ENOENT


async def test_releases_are_sent_in_batches_and_all_arrive(tmp_path: Path) -> None:
    async with running(tmp_path, dataservers=1) as setup, setup.client() as client:
        handles = [await create(client, f"r{n}".encode()) for n in range(40)]
        for handle in handles:
            await handle.release()  # queued, not awaited one by one
        for n in range(40):
            await client.meta.mutate(Unlink(ROOT_INODE, f"r{n}".encode()), ROOT)
        await client.drain_releases()
        statfs = await client.meta.query(StatFs(), ROOT)
        assert statfs.open_unlinked == 0  # every open was released
