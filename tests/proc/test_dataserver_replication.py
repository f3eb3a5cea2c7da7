"""Chunk replication with real dataserver processes on loopback (issue 6, item 7).

Every replica is read back from its own dataserver and compared with the source bytes.
Randomised data comes from a seeded generator; the seed is printed and can be replayed
with ``PAXFS_SEED``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
from pathlib import Path

import pytest
import trio

from fuse_client.chunk_io import (
    ChunkPlacement,
    ChunkReader,
    ChunkWriter,
    DataserverPool,
    PipelineFailed,
    PlacedFile,
    ReplicasUnavailable,
)
from tests.proc.dataserver_harness import (
    CHUNK_SIZE_BYTES,
    KEY,
    Cluster,
    running_cluster,
    wait_until,
)
from wire.dataserver_ops import CHECKSUM_MISMATCH
from wire.errors import STALE_VERSION, TOKEN_REFUSED, RpcError
from wire.ids import ChunkVersion
from wire.tokens import TOKEN_LIFETIME_S, AccessMode, sign_token

BLOCK = 64 * 1024
CHUNK = CHUNK_SIZE_BYTES


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"PAXFS_SEED={seed}")
    return random.Random(seed)


def source_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


async def assert_every_replica_holds(
    cluster: Cluster, placements: dict[int, ChunkPlacement], expected: bytes
) -> None:
    """Each replica of each chunk, read from its own dataserver, equals the source slice."""
    for index, placement in placements.items():
        want = expected[index * CHUNK : (index + 1) * CHUNK]
        for address in placement.replicas:
            got = await cluster.replica_bytes(address, placement)
            # A replica may be shorter than the chunk slice only by trailing zeros (a
            # file extended by truncate); it is never longer and never different.
            assert got == want[: len(got)], f"chunk {index} replica at {address} differs"
            assert want[len(got) :] == bytes(len(want) - len(got))


async def assert_reports_match(cluster: Cluster, placements: dict[int, ChunkPlacement]) -> None:
    """The stand-in leader learned every replica (version and length) from the reports."""

    def reported() -> bool:
        for placement in placements.values():
            for address in placement.replicas:
                server = cluster.by_address(address)
                report = cluster.meta.replicas.get(server.dataserver_id, {}).get(  # type: ignore[arg-type]
                    placement.chunk_id
                )
                if report is None or report.version != placement.version:
                    return False
        return True

    await wait_until(reported, "chunk reports to name every replica")


async def test_files_of_every_edge_size_are_replicated_byte_for_byte(
    tmp_path: Path, rng: random.Random
) -> None:
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12345]
    async with running_cluster(tmp_path) as cluster:
        for size in sizes:
            data = source_bytes(rng, size)
            file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
            await file.write(0, data)
            placements = await file.sync()
            assert len(placements) == -(-size // CHUNK)
            assert all(len(p.replicas) == 3 for p in placements.values())
            assert await file.read(0, size + 100) == data
            await assert_every_replica_holds(cluster, placements, data)
            for index, placement in placements.items():
                expected_length = min(CHUNK, size - index * CHUNK)
                for address in placement.replicas:
                    info = await cluster.replica_info(address, placement)
                    assert info.length_bytes == expected_length
            await assert_reports_match(cluster, placements)


async def test_a_sparse_file_reads_zeros_in_its_holes_on_every_replica(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        expected = bytearray(3 * CHUNK + 5000)
        writes = [(10, 100), (BLOCK * 2 + 7, BLOCK), (3 * CHUNK + 1000, 4000)]
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        for offset, size in writes:
            data = source_bytes(rng, size)
            expected[offset : offset + size] = data
            await file.write(offset, data)
        placements = await file.sync()
        assert sorted(placements) == [0, 3], "chunks 1 and 2 are holes: never allocated"
        assert await file.read(0, len(expected)) == bytes(expected)
        await assert_every_replica_holds(cluster, placements, bytes(expected))


async def test_an_overwrite_in_the_middle_gets_a_new_version_and_the_old_one_is_fenced(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        expected = bytearray(source_bytes(rng, 3 * CHUNK))
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, expected)
        before = await file.sync()

        reopened = PlacedFile(cluster.pool, CHUNK, cluster.meta, before, length_bytes=3 * CHUNK)
        patch = source_bytes(rng, CHUNK // 2)
        offset = CHUNK - CHUNK // 4  # spans the boundary of chunks 0 and 1
        expected[offset : offset + len(patch)] = patch
        await reopened.write(offset, patch)
        after = await reopened.sync()

        assert after[2] == before[2], "an untouched chunk keeps its version"
        for index in (0, 1):
            assert after[index].version > before[index].version
            assert after[index].base_version == before[index].version
        assert await reopened.read(0, 3 * CHUNK) == bytes(expected)
        await assert_every_replica_holds(cluster, after, bytes(expected))

        old = before[0]
        reader = ChunkReader(cluster.pool, old)
        with pytest.raises(ReplicasUnavailable) as caught:
            await reader.read(0, 10)
        assert caught.value.code == STALE_VERSION
        writer = ChunkWriter(cluster.pool, old)
        with pytest.raises(PipelineFailed) as failed:
            await writer.write(0, b"old writer")
            await writer.flush()
        assert failed.value.code == STALE_VERSION
        await assert_every_replica_holds(cluster, after, bytes(expected))


async def test_truncate_then_extend_leaves_zeros_between_on_every_replica(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = source_bytes(rng, 2 * CHUNK + CHUNK // 2)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        await file.sync()

        cut = CHUNK + 1000
        await file.truncate(cut)
        await file.sync()
        tail = source_bytes(rng, 3000)
        tail_offset = 2 * CHUNK + 500
        await file.write(tail_offset, tail)
        placements = await file.sync()

        expected = bytearray(data[:cut])
        expected += bytes(tail_offset - cut) + tail
        assert file.length_bytes == len(expected)
        assert await file.read(0, len(expected)) == bytes(expected)
        await assert_every_replica_holds(cluster, placements, bytes(expected))
        info = await cluster.replica_info(placements[1].replicas[2], placements[1])
        assert info.length_bytes == cut - CHUNK


async def test_compressed_chunks_store_fewer_bytes_and_read_back_whole(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = (b"paxfs compresses this line well. " * 20_000)[: 2 * CHUNK]
        meta = cluster.meta

        class CompressingAllocator:
            async def allocate(self, index: int, exclude: tuple[str, ...] = ()) -> ChunkPlacement:
                return dataclasses.replace(await meta.allocate(index, exclude), compressed=True)

            open_for_write = meta.open_for_write
            renew = meta.renew

        file = PlacedFile(cluster.pool, CHUNK, CompressingAllocator())
        await file.write(0, data)
        placements = await file.sync()
        assert await file.read(0, len(data)) == data
        await assert_every_replica_holds(cluster, placements, data)
        for placement in placements.values():
            for address in placement.replicas:
                info = await cluster.replica_info(address, placement)
                assert info.compressed
                assert info.disk_bytes < CHUNK // 2


@pytest.mark.parametrize(
    ("position", "acknowledged"),
    [(0, True), (1, True), (2, True), (1, False)],
    ids=["head", "middle", "tail", "middle-before-any-ack"],
)
async def test_a_member_killed_in_the_middle_of_a_write_is_cut_out_and_the_data_is_whole(
    tmp_path: Path, rng: random.Random, position: int, acknowledged: bool
) -> None:
    async with running_cluster(tmp_path, count=4) as cluster:
        data = source_bytes(rng, 3 * CHUNK)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data[: CHUNK // 2])
        if acknowledged:
            await file.flush()  # on every replica, not yet durable anywhere
        first = file.placements[0]
        victim_address = first.replicas[position]
        victim = cluster.by_address(victim_address)
        victim.kill()
        victim.process.wait()
        await file.write(CHUNK // 2, data[CHUNK // 2 :])
        placements = await file.sync()

        assert file.failures, "the write must have noticed the killed member"
        for failure in file.failures:
            assert failure.failed == (victim_address,)
        for placement in placements.values():
            assert victim_address not in placement.replicas
        if acknowledged:
            # The survivors go on under a new version derived from the old one.
            survivors = tuple(a for a in first.replicas if a != victim_address)
            assert placements[0].chunk_id == first.chunk_id
            assert placements[0].replicas == survivors
            assert placements[0].base_version == first.version < placements[0].version
        else:
            # No replica ever held acknowledged data: a fresh chunk is placed instead.
            assert placements[0].chunk_id != first.chunk_id
            assert len(placements[0].replicas) == 3
        assert await file.read(0, len(data)) == data
        await assert_every_replica_holds(cluster, placements, data)


async def test_a_flipped_bit_in_one_replica_is_never_returned_and_is_reported(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = source_bytes(rng, CHUNK)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        placement = (await file.sync())[0]
        bad_address = placement.replicas[1]
        bad = cluster.by_address(bad_address)
        replica_path = (
            bad.data_dir / "chunks" / f"chunk_{placement.chunk_id:016x}_{placement.version:016x}"
        )
        data_offset = 64 * 1024  # block 0, slot 0 (see wire.replica_format)
        with open(replica_path, "r+b") as handle:
            handle.seek(data_offset + 1234)
            byte = handle.read(1)[0]
            handle.seek(data_offset + 1234)
            handle.write(bytes([byte ^ 0x10]))

        with pytest.raises(RpcError) as caught:
            await cluster.replica_bytes(bad_address, placement)
        assert caught.value.code == CHECKSUM_MISMATCH

        reported: list[tuple[str, str]] = []

        async def on_corrupt(chunk_id: int, version: int, address: str, reason: str) -> None:
            reported.append((address, reason))

        bad_first = dataclasses.replace(
            placement,
            replicas=(bad_address,) + tuple(a for a in placement.replicas if a != bad_address),
        )
        async with DataserverPool.open(KEY, name="fresh-reader") as fresh:
            reader = ChunkReader(fresh, bad_first, on_corrupt=on_corrupt, readahead_bytes=0)
            assert await reader.read(0, CHUNK) == data
            assert reader.bytes_from.get(bad_address, 0) == 0
        assert [address for address, _ in reported] == [bad_address]
        assert "checksum" in reported[0][1]

        def leader_told() -> bool:
            return any(
                r.dataserver_address == bad_address and r.chunk_id == placement.chunk_id
                for r in cluster.meta.corrupt_reports
            )

        await wait_until(leader_told, "the dataserver to report the corrupt replica")
        await wait_until(
            lambda: cluster.meta.replicas[bad.dataserver_id][placement.chunk_id].corrupt,  # type: ignore[index]
            "the chunk report to mark the replica corrupt",
        )
        for address in placement.replicas:
            if address != bad_address:
                assert await cluster.replica_bytes(address, placement) == data


async def test_forged_altered_and_expired_tokens_are_refused_with_a_log_line(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, count=3) as cluster:
        placement = await cluster.meta.allocate(0)
        forged = sign_token(
            b"not the cluster key at all!!!!!!",
            placement.chunk_id,
            placement.version,
            AccessMode.WRITE,
            __import__("time").time(),
        )
        altered = dataclasses.replace(placement.token, version=ChunkVersion(placement.version + 1))
        expired = sign_token(
            KEY,
            placement.chunk_id,
            placement.version,
            AccessMode.WRITE,
            __import__("time").time() - 10 * TOKEN_LIFETIME_S,
        )
        for token, why in ((forged, "forged"), (altered, "altered"), (expired, "expired")):
            writer = ChunkWriter(cluster.pool, dataclasses.replace(placement, token=token))
            with pytest.raises(PipelineFailed) as caught:
                await writer.write(0, b"sneaky")
                await writer.flush()
            assert caught.value.code == TOKEN_REFUSED, why
            assert caught.value.failed == (), "a bad token is nobody's fault in the chain"
        read_only = dataclasses.replace(
            placement,
            token=sign_token(
                KEY,
                placement.chunk_id,
                placement.version,
                AccessMode.READ,
                __import__("time").time(),
            ),
        )
        writer = ChunkWriter(cluster.pool, read_only)
        with pytest.raises(PipelineFailed) as caught:
            await writer.sync()
        assert caught.value.code == TOKEN_REFUSED
        reader = ChunkReader(cluster.pool, dataclasses.replace(placement, token=forged))
        with pytest.raises(ReplicasUnavailable) as unreadable:
            await reader.read(0, 10)
        assert unreadable.value.code == TOKEN_REFUSED
        head = cluster.by_address(placement.replicas[0])
        await wait_until(lambda: "forged or altered" in head.log_text(), "the refusal log line")
        assert "expired" in head.log_text()
        for address in placement.replicas:
            with pytest.raises(RpcError) as missing:
                await cluster.replica_info(address, placement)
            assert missing.value.code == errno.ENOENT, "nothing was written with a bad token"


async def test_a_full_disk_fails_with_enospc_naming_it_and_loses_nothing_written(
    tmp_path: Path, rng: random.Random
) -> None:
    small = 0
    async with running_cluster(tmp_path, count=3, capacities={small: 700 * 1024}) as cluster:
        full_address = cluster.dataservers[small].address
        first = source_bytes(rng, 2 * CHUNK)
        file_one = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file_one.write(0, first)
        first_placements = await file_one.sync()
        assert all(full_address in p.replicas for p in first_placements.values())

        second = source_bytes(rng, 3 * CHUNK)
        file_two = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file_two.write(0, second)
        second_placements = await file_two.sync()
        assert any(f.code == errno.ENOSPC for f in file_two.failures)
        assert all(f.failed == (full_address,) for f in file_two.failures)
        assert await file_two.read(0, len(second)) == second
        await assert_every_replica_holds(cluster, second_placements, second)

        assert await file_one.read(0, len(first)) == first
        await assert_every_replica_holds(cluster, first_placements, first)

        alone = await cluster.meta.allocate(0)
        alone = dataclasses.replace(alone, replicas=(full_address,))
        writer = ChunkWriter(cluster.pool, alone)
        with pytest.raises(PipelineFailed) as caught:
            await writer.write(0, source_bytes(rng, CHUNK))
            await writer.sync()
        assert caught.value.code == errno.ENOSPC
        assert caught.value.failed == (full_address,)


async def test_all_three_replicas_serve_reads_under_load(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = source_bytes(rng, CHUNK)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        placement = (await file.sync())[0]
        reader = ChunkReader(cluster.pool, placement, readahead_bytes=0)
        results: dict[int, bytes] = {}

        async def read(start: int) -> None:
            results[start] = await reader.read(start, BLOCK // 4)

        async with trio.open_nursery() as nursery:
            for start in range(0, CHUNK, BLOCK // 4):
                nursery.start_soon(read, start)
        assert b"".join(results[start] for start in sorted(results)) == data
        assert set(reader.bytes_from) == set(placement.replicas)
