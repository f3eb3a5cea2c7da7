"""The client's chunk I/O against dataservers running in this process (fast, no processes).

Covers what the process tests cannot arrange cheaply: a member restarting on the same
address between two replies, the bound on pieces in flight, and overlapping writes.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio

from dataserver.chunk_store import ChunkStore
from dataserver.data_dir import open_data_dir
from dataserver.server import Dataserver
from fuse_client.chunk_io import (
    ChunkReader,
    ChunkWriter,
    DataserverPool,
    PipelineFailed,
    PlacedFile,
    readahead_spill,
)
from tests.proc.dataserver_harness import KEY, FakeMetaserver
from wire.address import Address
from wire.config import Config
from wire.dataserver_ops import ReadRequest
from wire.transport import bound_port, serve

CHUNK = 256 * 1024


class InProcessCluster:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery, metaserver_port: int) -> None:
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.metaserver_port = metaserver_port
        self.scopes: dict[str, trio.CancelScope] = {}
        self.servers: dict[str, Dataserver] = {}

    async def start(self, name: str, port: int = 0) -> Dataserver:
        config = Config()
        config.cluster.key = KEY.hex()
        config.cluster.metaservers = {"1": f"127.0.0.1:{self.metaserver_port}"}
        config.cluster.chunk_size_bytes = CHUNK
        config.dataserver.heartbeat_interval_s = 0.05
        config.dataserver.scrub_rate_mib_s = 0
        data_dir = open_data_dir(str(self.tmp_path / name))
        store = ChunkStore(data_dir.chunks_path, chunk_size_bytes=CHUNK)
        server = Dataserver(config=config, key=KEY, data_dir=data_dir, store=store, address="")
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[str]) -> None:
            with scope:
                try:
                    await server.run(
                        Address("127.0.0.1", port),
                        config.metaserver_addresses(),
                        task_status=task_status,
                    )
                finally:
                    store.close(sync=False)

        address = await self.nursery.start(run)
        self.scopes[address] = scope
        self.servers[address] = server
        return server

    async def restart(self, address: str, name: str) -> Dataserver:
        """Stop the server at ``address`` losing unsynced writes; start it again there."""
        self.scopes.pop(address).cancel()
        await trio.sleep(0.05)
        return await self.start(name, int(address.rsplit(":", 1)[1]))


@asynccontextmanager
async def in_process_cluster(
    tmp_path: Path, count: int
) -> AsyncIterator[tuple[InProcessCluster, FakeMetaserver, DataserverPool, list[str]]]:
    meta = FakeMetaserver()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(serve, meta.handlers(), KEY, Address("127.0.0.1", 0))
        )
        cluster = InProcessCluster(tmp_path, nursery, bound_port(listeners))
        addresses = [(await cluster.start(f"ds{i}")).address for i in range(count)]
        meta.placement_order = addresses
        async with DataserverPool.open(KEY) as pool:
            yield cluster, meta, pool, addresses
        nursery.cancel_scope.cancel()


async def test_a_member_that_restarted_between_replies_is_named_even_though_it_answers(
    tmp_path: Path,
) -> None:
    async with in_process_cluster(tmp_path, 3) as (cluster, meta, pool, addresses):
        placement = await meta.allocate(0)
        writer = ChunkWriter(pool, placement)
        await writer.write(0, b"a" * 1000)
        await writer.flush()
        await cluster.restart(addresses[1], "ds1")
        with pytest.raises(PipelineFailed) as caught:
            await writer.sync()
        assert caught.value.failed == (addresses[1],)
        assert caught.value.code == errno.ECONNRESET
        survivors = await meta.renew(0, placement, caught.value.failed)
        await writer.retarget(survivors)
        assert await writer.sync() == 1000
        reader = ChunkReader(pool, survivors)
        assert await reader.read(0, 5000) == b"a" * 1000


async def test_no_more_pieces_are_in_flight_than_the_window_allows(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 1) as (_cluster, meta, pool, addresses):
        meta.replication = 1
        placement = await meta.allocate(0)
        window = 3
        writer = ChunkWriter(pool, placement, piece_bytes=4096, pieces_in_flight_max=window)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, pool.stats(addresses[0]).in_flight)
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await writer.write(0, bytes(range(256)) * 1024)
            await writer.flush()
            nursery.cancel_scope.cancel()
        assert peak == window
        assert await ChunkReader(pool, placement).read(0, CHUNK) == bytes(range(256)) * 1024


async def test_overlapping_writes_in_flight_land_in_the_order_they_were_made(
    tmp_path: Path,
) -> None:
    async with in_process_cluster(tmp_path, 3) as (_cluster, meta, pool, _addresses):
        placement = await meta.allocate(0)
        writer = ChunkWriter(pool, placement, piece_bytes=8192)
        for round_ in range(20):
            await writer.write(0, bytes([round_]) * 20_000)
        await writer.sync()
        for address in placement.replicas:
            single = ChunkReader(
                pool, placement.__class__(**{**placement.__dict__, "replicas": (address,)})
            )
            assert await single.read(0, CHUNK) == bytes([19]) * 20_000


async def test_sequential_reads_are_served_from_read_ahead(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, 2) as (_cluster, meta, pool, _addresses):
        meta.replication = 2
        data = (bytes(range(251)) * 1100)[:CHUNK]
        file = PlacedFile(pool, CHUNK, meta, readahead_bytes=CHUNK)
        await file.write(0, data)
        placements = await file.sync()
        reader = ChunkReader(pool, placements[0], readahead_bytes=CHUNK)
        got = b"".join([await reader.read(offset, 4096) for offset in range(0, CHUNK, 4096)])
        assert got == data[:CHUNK]
        fetched = sum(reader.bytes_from.values())
        assert fetched == CHUNK, "read-ahead fetched the chunk once, not once per small read"


async def test_a_new_version_drops_uncommitted_bytes_but_a_retarget_keeps_acknowledged_ones(
    tmp_path: Path,
) -> None:
    """v1 holds 1000 bytes, of which 600 were committed.  v2, opened with that committed
    length, starts from exactly 600 bytes on every replica; when v2's pipeline then fails
    after a write was acknowledged, the survivors' v3 keeps that write although the
    metaserver still names 600 as the committed length."""
    async with in_process_cluster(tmp_path, 3) as (cluster, meta, pool, addresses):
        first = await meta.allocate(0)
        writer = ChunkWriter(pool, first)
        await writer.write(0, b"o" * 1000)
        await writer.sync()
        opened = replace(await meta.open_for_write(0, first), base_length_bytes=600)
        writer = ChunkWriter(pool, opened)
        await writer.write(800, b"new")
        await writer.flush()
        expected = b"o" * 600 + bytes(200) + b"new"
        for address in opened.replicas:
            assert await ChunkReader(pool, replace(opened, replicas=(address,))).read(0, 2000) == (
                expected
            )
        await cluster.restart(addresses[2], "ds2")
        with pytest.raises(PipelineFailed) as caught:
            await writer.sync()
        renewed = await meta.renew(0, opened, caught.value.failed)
        await writer.retarget(replace(renewed, base_length_bytes=600))
        assert await writer.sync() == len(expected)
        for address in renewed.replicas:
            assert await ChunkReader(pool, replace(renewed, replicas=(address,))).read(0, 2000) == (
                expected
            )


async def test_sequential_read_ahead_runs_into_the_next_chunk_and_stops_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with in_process_cluster(tmp_path, 2) as (_cluster, meta, pool, _addresses):
        meta.replication = 2
        size = 2 * CHUNK + CHUNK // 2
        data = bytes(range(256)) * (size // 256)
        writer = PlacedFile(pool, CHUNK, meta)
        await writer.write(0, data)
        placements = await writer.sync()
        chunk_of = {placement.chunk_id: index for index, placement in placements.items()}
        requested: list[tuple[int, int, int]] = []
        call = pool.call

        async def recording_call(address, method, request, **kwargs):  # type: ignore[no-untyped-def]
            if isinstance(request, ReadRequest):
                requested.append((chunk_of[request.chunk_id], request.offset, request.length_bytes))
            return await call(address, method, request, **kwargs)

        monkeypatch.setattr(pool, "call", recording_call)
        file = PlacedFile(pool, CHUNK, meta, placements, length_bytes=size, readahead_bytes=CHUNK)
        step = 64 * 1024
        got = [await file.read(offset, step) for offset in range(0, CHUNK // 2, step)]
        await trio.sleep(0.2)
        assert any(index == 1 for index, _, _ in requested), (
            "half way through chunk 0, a window of a chunk reaches into chunk 1"
        )
        got += [await file.read(offset, step) for offset in range(CHUNK // 2, size + step, step)]
        assert b"".join(got) == data
        ends = {0: CHUNK, 1: CHUNK, 2: CHUNK // 2}
        assert all(offset + length <= ends[index] for index, offset, length in requested), requested
        assert sorted(requested) == sorted(set(requested)), "no piece fetched twice"


def test_readahead_spills_into_the_next_chunk_only_within_a_window_of_it() -> None:
    window = 100
    assert readahead_spill(CHUNK - window, CHUNK, window) is None
    assert readahead_spill(CHUNK - window + 1, CHUNK, window) == (1, 1)
    assert readahead_spill(CHUNK, CHUNK, window) is None
    assert readahead_spill(2 * CHUNK - 10, CHUNK, window) == (2, 90)
