"""The cluster manager with real processes: placement, locate, failover, garbage.

Three metaservers, four dataservers, goal 3 (see :mod:`tests.proc.test_cluster_harness`).
Randomised data prints its seed; replay with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.proc.test_cluster_harness import (
    CHUNK_BYTES,
    expected_chunks,
    running_cluster,
    seeded_rng,
    wait_for,
)
from wire.data_ops import LOCATE, SPACE, Locate, SpaceRequest
from wire.errors import NOT_LEADER, RpcError
from wire.ids import ROOT_INODE
from wire.namespace_ops import ROOT_CREDENTIALS, Lookup, OpenChunk, QueryCall, Unlink
from wire.transport import open_connection


async def test_a_file_with_goal_3_lands_on_3_distinct_servers_with_the_right_bytes(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    data = rng.randbytes(3 * CHUNK_BYTES + 12345)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"f", data)
        located = await client.locate(inode)
        assert located.size == len(data)
        expected = expected_chunks(data)
        assert [chunk.index for chunk in located.chunks] == sorted(expected)
        for chunk in located.chunks:
            assert len(chunk.replicas) == 3
            assert len(set(chunk.replicas)) == 3
            assert cluster.holders(chunk.chunk, chunk.version) == set(chunk.replicas)
            for address in chunk.replicas:
                assert await client.replica_bytes(address, chunk) == expected[chunk.index]
        assert await client.read(inode) == data
        space = await client.space()
        assert space.live_dataservers == 4
        assert space.capacity_bytes >= space.available_bytes > 0


async def test_followers_redirect_and_bad_envelopes_are_refused(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, dataservers=3) as cluster, cluster.client() as client:
        leader = await cluster.leader()
        follower = next(i for i in cluster.group.nodes if i != leader)
        async with open_connection(
            cluster.group.nodes[follower].address, cluster.key, name="test"
        ) as connection:
            with pytest.raises(RpcError) as caught:
                await connection.call(SPACE, SpaceRequest(), timeout_s=5)
        assert caught.value.code == NOT_LEADER
        assert caught.value.message == str(cluster.group.nodes[leader].address)
        inode = await client.create(b"f")
        with pytest.raises(RpcError) as refused:
            await client.meta.call(
                LOCATE,
                Locate(QueryCall(ROOT_CREDENTIALS, OpenChunk(inode, 0))),  # type: ignore[arg-type]
            )
        assert refused.value.code == errno.EPROTO


async def test_a_new_leader_rebuilds_the_replica_map_from_reports(tmp_path: Path) -> None:
    rng = seeded_rng()
    data = rng.randbytes(2 * CHUNK_BYTES + 100)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"f", data)
        before = {c.index: set(c.replicas) for c in (await client.locate(inode)).chunks}
        old_leader = await cluster.leader()
        cluster.group.kill(old_leader)
        new_leader = await cluster.group.wait_for_leader(
            among=[i for i in cluster.group.nodes if i != old_leader]
        )
        assert new_leader != old_leader

        async def map_rebuilt() -> bool:
            located = await client.locate(inode)
            return {c.index: set(c.replicas) for c in located.chunks} == before

        await wait_for(map_rebuilt, "the new leader to know every replica again")
        assert await client.read(inode) == data
        more = rng.randbytes(CHUNK_BYTES + 7)
        other = await client.write_file(b"g", more)
        assert await client.read(other) == more
        for chunk in (await client.locate(other)).chunks:
            assert len(set(chunk.replicas)) == 3


async def test_unlink_deletes_every_replica_on_every_dataserver(tmp_path: Path) -> None:
    rng = seeded_rng()
    data = rng.randbytes(3 * CHUNK_BYTES)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"doomed", data)
        kept_data = rng.randbytes(CHUNK_BYTES // 2)
        kept = await client.write_file(b"kept", kept_data)
        chunks = [c.chunk for c in (await client.locate(inode)).chunks]
        assert all(cluster.holders(chunk) for chunk in chunks)
        await client.meta.mutate(Unlink(ROOT_INODE, b"doomed"))
        with pytest.raises(RpcError):
            await client.meta.query(Lookup(ROOT_INODE, b"doomed"))

        async def all_gone() -> bool:
            statfs = await client.statfs()
            return statfs.deletion_queue == 0 and not any(cluster.holders(c) for c in chunks)

        await wait_for(all_gone, "every replica to be deleted and the queue drained")
        assert await client.read(kept) == kept_data
        for chunk in (await client.locate(kept)).chunks:
            assert cluster.holders(chunk.chunk, chunk.version) == set(chunk.replicas)
