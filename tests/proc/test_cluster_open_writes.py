"""Chunk versions left open for write, against real processes (issue #8).

A writer that keeps a chunk version open without committing it is never the source of a
re-replication copy, even when a replica's dataserver dies; once no token for that
version is accepted any more (a short token lifetime here), the leader recovers it from
one replica under a new version and brings it back to its goal with exactly the bytes
that were committed.  A live writer that writes on across that time ends with every
replica identical.
"""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from fuse_client.chunk_io import ChunkPlacement, PlacedFile
from tests.proc.test_cluster_harness import (
    CHUNK_BYTES,
    Cluster,
    DataClient,
    MetaAllocator,
    running_cluster,
    seeded_rng,
    wait_for,
)
from wire.ids import ChunkId, ChunkVersion, InodeId
from wire.namespace_ops import ChunkWrite, CommitWrite

TOKEN_LIFETIME_S = 5.0
CLOCK_SKEW_S = 0.5
OPEN_MAX_S = TOKEN_LIFETIME_S + 2 * CLOCK_SKEW_S
SETTINGS: dict[str, object] = {
    "chunk_token_lifetime_s": TOKEN_LIFETIME_S,
    "clock_skew_s": CLOCK_SKEW_S,
}


async def open_writer(client: DataClient, inode: InodeId) -> PlacedFile:
    """A file writer holding the file's current chunks (the next write opens a version)."""
    located = await client.locate(inode)
    current = {
        chunk.index: ChunkPlacement(chunk.chunk, chunk.version, None, chunk.replicas, chunk.token)
        for chunk in located.chunks
    }
    return PlacedFile(
        client.pool,
        located.chunk_size,
        MetaAllocator(client.meta, inode),
        current,
        length_bytes=located.size,
    )


async def replicas_of(
    cluster: Cluster, client: DataClient, inode: InodeId
) -> tuple[ChunkId, ChunkVersion, dict[str, bytes]]:
    """Chunk 0's current version and what each running dataserver holds of it."""
    (chunk,) = (await client.locate(inode)).chunks
    held = cluster.holders(chunk.chunk, chunk.version)
    return chunk.chunk, chunk.version, {a: await client.replica_bytes(a, chunk) for a in held}


async def test_an_abandoned_open_version_is_not_copied_then_recovered_to_its_goal(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    committed = rng.randbytes(40_000)
    async with (
        running_cluster(tmp_path, metaserver_settings=SETTINGS) as cluster,
        cluster.client() as client,
    ):
        inode = await client.write_file(b"f", committed)
        writer = await open_writer(client, inode)
        await writer.write(len(committed), rng.randbytes(30_000))
        await writer.flush()  # acknowledged by every replica, never committed
        opened = writer.placements[0]
        chain = list(opened.replicas)
        assert len(chain) == 3
        cluster.by_address(chain[0]).process.kill(signal.SIGKILL)
        (outsider,) = {node.address for node in cluster.dataservers} - set(chain)
        # The dead server is found dead (2.5 s) and scans run; the open version stays
        # under-replicated and is copied nowhere, until it may be recovered.
        with trio.move_on_after(OPEN_MAX_S - 1.5):
            while True:
                assert opened.chunk_id not in cluster.by_address(outsider).stored()
                await trio.sleep(0.1)
        # The writer is gone: once its token is dead the version is recovered.

        async def recovered_to_goal() -> bool:
            (chunk,) = (await client.locate(inode)).chunks
            return (
                chunk.version > opened.version
                and len(cluster.holders(chunk.chunk, chunk.version)) == 3
            )

        await wait_for(recovered_to_goal, "the open version to be recovered and re-replicated")
        assert await client.read(inode) == committed
        _, version, replicas = await replicas_of(cluster, client, inode)
        assert version == opened.version + 1
        assert outsider in replicas and len(set(replicas.values())) == 1
        assert next(iter(replicas.values()))[: len(committed)] == committed


async def test_a_live_writer_across_a_recovery_ends_with_identical_replicas(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    data = bytearray(rng.randbytes(20_000))
    async with (
        running_cluster(tmp_path, metaserver_settings=SETTINGS) as cluster,
        cluster.client() as client,
    ):
        inode = await client.write_file(b"f", bytes(data))
        writer = await open_writer(client, inode)

        async def write_for(seconds: float) -> None:
            with trio.move_on_after(seconds):
                while True:
                    piece = rng.randbytes(rng.randrange(500, 3000))
                    await writer.write(len(data), piece)
                    data.extend(piece)
                    await writer.flush()
                    await trio.sleep(0.1)

        await write_for(2.0)
        first = writer.placements[0].version
        # Idle past the token's life: the leader recovers the version meanwhile.

        async def recovered() -> bool:
            (chunk,) = (await client.locate(inode)).chunks
            return chunk.version > first

        await wait_for(recovered, "the idle writer's version to be recovered", OPEN_MAX_S + 10)
        # Writing on: the dead token sends the writer to a new version derived from the
        # recovered one, which holds every acknowledged byte.
        await write_for(OPEN_MAX_S + 1.0)
        placements = await writer.sync()
        assert len(data) < CHUNK_BYTES
        await client.meta.mutate(
            CommitWrite(
                inode,
                (ChunkWrite(0, placements[0].chunk_id, placements[0].version, len(data)),),
            )
        )
        assert await client.read(inode) == bytes(data)

        async def identical_at_goal() -> bool:
            _, _, replicas = await replicas_of(cluster, client, inode)
            return len(replicas) == 3 and set(replicas.values()) == {bytes(data)}

        await wait_for(identical_at_goal, "every replica to hold exactly the file's bytes")
