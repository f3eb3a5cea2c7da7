"""Healing with real processes: lost dataservers, corrupt replicas, stale versions.

Three metaservers, four dataservers, goal 3, a dataserver is dead after 2.5 s of silence
(see :mod:`tests.proc.test_cluster_harness`).  Randomised data prints its seed; replay
with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from fuse_client.chunk_io import ChunkPlacement, ChunkReader, DataserverPool
from tests.proc.test_cluster_harness import (
    BLOCK_DATA_OFFSET,
    CHUNK_BYTES,
    DEAD_AFTER_S,
    Cluster,
    DataClient,
    expected_chunks,
    flip_bit,
    running_cluster,
    seeded_rng,
    wait_for,
)
from wire.ids import InodeId

HEAL_BOUND_S = 10.0
"""Time allowed past ``DEAD_AFTER_S`` for every chunk to be back at its goal."""


async def assert_fully_replicated(
    cluster: Cluster, client: DataClient, inode: InodeId, data: bytes, goal: int = 3
) -> None:
    """Every chunk has ``goal`` distinct live replicas holding exactly its bytes, and the
    dataservers store no other copy of it."""
    expected = expected_chunks(data)
    located = await client.locate(inode)
    assert [chunk.index for chunk in located.chunks] == sorted(expected)
    for chunk in located.chunks:
        assert len(set(chunk.replicas)) == goal, chunk
        assert cluster.holders(chunk.chunk) == set(chunk.replicas)
        for address in chunk.replicas:
            assert await client.replica_bytes(address, chunk) == expected[chunk.index]
    assert await client.read(inode) == data


async def wait_fully_replicated(
    cluster: Cluster, client: DataClient, inode: InodeId, timeout_s: float, goal: int = 3
) -> None:
    async def healed() -> bool:
        located = await client.locate(inode)
        return all(
            len(set(chunk.replicas)) == goal and cluster.holders(chunk.chunk) == set(chunk.replicas)
            for chunk in located.chunks
        )

    await wait_for(healed, f"every chunk back at {goal} replicas", timeout_s)


async def wait_healed_away_from(
    client: DataClient, inode: InodeId, address: str, what: str
) -> None:
    """Until every chunk of ``inode`` has 3 distinct replicas, none on ``address``
    (the lost dataserver): it must be dead, then healed, within the bound."""

    async def healed_elsewhere() -> bool:
        located = await client.locate(inode)
        return all(
            len(set(chunk.replicas)) == 3 and address not in chunk.replicas
            for chunk in located.chunks
        )

    await wait_for(healed_elsewhere, what, DEAD_AFTER_S + HEAL_BOUND_S)


async def test_a_lost_dataserver_is_healed_to_the_goal_with_the_same_bytes(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    data = rng.randbytes(6 * CHUNK_BYTES + 999)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"precious", data)
        located = await client.locate(inode)
        counts: dict[str, int] = {}
        for chunk in located.chunks:
            for address in chunk.replicas:
                counts[address] = counts.get(address, 0) + 1
        victim = cluster.by_address(max(counts, key=lambda a: counts[a]))
        assert counts[victim.address] >= 2
        victim.process.kill(signal.SIGKILL)
        killed_at = time.monotonic()

        await wait_healed_away_from(
            client, inode, victim.address, "re-replication after a lost dataserver"
        )
        healed_s = time.monotonic() - killed_at
        print(f"healed {counts[victim.address]} chunks in {healed_s:.2f} s after the kill")
        await wait_fully_replicated(cluster, client, inode, 5.0)
        await assert_fully_replicated(cluster, client, inode, data)


async def test_a_corrupt_replica_found_by_a_reader_is_replaced_then_deleted(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    data = rng.randbytes(CHUNK_BYTES)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"f", data)
        (chunk,) = (await client.locate(inode)).chunks
        bad = cluster.by_address(chunk.replicas[0])
        flip_bit(bad.replica_path(chunk.chunk, chunk.version), BLOCK_DATA_OFFSET + 4321)
        # A fresh reader tries the replicas in the order given: the bad one first.
        others = tuple(address for address in chunk.replicas if address != bad.address)
        placement = ChunkPlacement(
            chunk.chunk, chunk.version, None, (bad.address, *others), chunk.token
        )
        async with DataserverPool.open(cluster.key, name="fresh-reader") as pool:
            reader = ChunkReader(
                pool, placement, on_corrupt=client.report_bad_replica, readahead_bytes=0
            )
            assert await reader.read(0, CHUNK_BYTES) == data
            assert reader.bytes_from.get(bad.address, 0) == 0
        assert client.bad_replicas_reported == [(chunk.chunk, bad.address)]

        async def replaced() -> bool:
            located = (await client.locate(inode)).chunks[0]
            return (
                bad.address not in located.replicas
                and len(set(located.replicas)) == 3
                and chunk.chunk not in bad.stored()
            )

        await wait_for(replaced, "the corrupt replica to be replaced and deleted")
        await assert_fully_replicated(cluster, client, inode, data)


async def test_a_stale_replica_on_a_restarted_dataserver_is_deleted(tmp_path: Path) -> None:
    rng = seeded_rng()
    old = rng.randbytes(CHUNK_BYTES)
    new = rng.randbytes(CHUNK_BYTES // 2)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"f", old)
        (first,) = (await client.locate(inode)).chunks
        away = cluster.by_address(first.replicas[1])
        assert away.process.stop() == 0
        # Overwrite while it is away: its replica keeps the old version.
        await client.write(inode, 0, new)
        (second,) = (await client.locate(inode)).chunks
        assert second.chunk == first.chunk and second.version > first.version
        assert away.address not in second.replicas
        assert away.stored() == {first.chunk: first.version}
        away.process.start()

        async def stale_copy_gone() -> bool:
            return first.chunk not in away.stored() and away.process.running

        await wait_for(stale_copy_gone, "the stale replica to be deleted")
        expected = new + old[len(new) :]
        await wait_fully_replicated(cluster, client, inode, 10.0)
        await assert_fully_replicated(cluster, client, inode, expected)


async def test_healing_goes_on_when_the_leader_dies_with_the_dataserver(tmp_path: Path) -> None:
    rng = seeded_rng()
    data = rng.randbytes(4 * CHUNK_BYTES + 5)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"f", data)
        located = await client.locate(inode)
        victim = cluster.by_address(located.chunks[0].replicas[0])
        leader = await cluster.leader()
        victim.process.kill(signal.SIGKILL)
        cluster.group.kill(leader)
        await cluster.group.wait_for_leader(among=[i for i in cluster.group.nodes if i != leader])

        await wait_healed_away_from(client, inode, victim.address, "healing under the new leader")
        await wait_fully_replicated(cluster, client, inode, 5.0)
        await assert_fully_replicated(cluster, client, inode, data)
