"""Local (short-circuit) reads with real dataserver processes on loopback (HDFS-347).

A client on a dataserver's host is handed a read-only descriptor of a replica's file
(:mod:`wire.local_reads`) and reads and verifies it itself
(:mod:`fuse_client.local_replicas`). Every dataserver here runs on the test's host, so
every replica is local. The tests hold the feature to what a user or an operator would
notice: the same bytes as through the dataserver, corruption reported the same way,
the same refusals, no leaked descriptors, a dataserver that survives garbage on its
local socket, and a silent fall back to the network when local reads are off.

That bytes came from the files and not through a dataserver is seen on the dataserver's
side: ``/proc/PID/io`` counts the bytes a process read (``rchar``, which includes what
``sendfile`` sends), and a dataserver serving a READ reads at least what it sends.

Randomised data and garbage come from a seeded generator; the seed is printed and can
be replayed with ``PAXFS_SEED``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import socket
import time
from pathlib import Path

import pytest
import trio

import fuse_client.local_replicas
from fuse_client.chunk_io import (
    ChunkPlacement,
    ChunkReader,
    ChunkWriter,
    DataserverPool,
    PlacedFile,
    ReplicasUnavailable,
)
from fuse_client.local_replicas import LocalReplica
from tests.proc.dataserver_harness import (
    CHUNK_SIZE_BYTES,
    KEY,
    Cluster,
    DataserverProcess,
    FakeMetaserver,
    running_cluster,
    wait_until,
)
from wire import schema
from wire.dataserver_ops import CHECKSUM_MISMATCH
from wire.errors import STALE_VERSION, TOKEN_REFUSED, RpcError
from wire.framing import PREFIX, frame_prefix, pack_header
from wire.ids import ChunkId, ChunkVersion
from wire.local_reads import (
    LocalReadLink,
    OpenReplicaReply,
    OpenReplicaRequest,
    local_socket_name,
)
from wire.tokens import TOKEN_LIFETIME_S, AccessMode, sign_token
from wire.transport import handshake_as_dialer

BLOCK = 64 * 1024
CHUNK = CHUNK_SIZE_BYTES
DATA_OFFSET_BYTES = 64 * 1024
"""Where block 0, slot 0 starts in a replica file of a 4-block chunk (wire.replica_format)."""
QUIET_DATASERVER_READ_BYTES_MAX = 16 * 1024
"""What all dataservers together may read while a client reads only replica files: the
local socket's requests, heartbeat replies, and a replica's index when it is opened."""
GARBAGE_ROUNDS = 6


@pytest.fixture
def rng() -> random.Random:
    # The seeded source every module of tests/proc defines; replay with PAXFS_SEED.
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"PAXFS_SEED={seed}")
    return random.Random(seed)


class CompressingAllocator:
    """The stand-in metaserver's chunks, for a file whose compression flag is set."""

    def __init__(self, meta: FakeMetaserver) -> None:
        self._meta = meta
        self.open_for_write = meta.open_for_write
        self.renew = meta.renew

    async def allocate(self, index: int, exclude: tuple[str, ...] = ()) -> ChunkPlacement:
        return dataclasses.replace(await self._meta.allocate(index, exclude), compressed=True)


def for_reading(meta: FakeMetaserver, placement: ChunkPlacement) -> ChunkPlacement:
    """The placement a reader gets from the namespace: same replicas, a READ token."""
    token = meta.token(placement.chunk_id, placement.version, AccessMode.READ)
    return dataclasses.replace(placement, token=token)


def all_for_reading(
    meta: FakeMetaserver, placements: dict[int, ChunkPlacement]
) -> dict[int, ChunkPlacement]:
    return {index: for_reading(meta, placement) for index, placement in placements.items()}


def bytes_read_by(servers: list[DataserverProcess]) -> int:
    """Bytes the live ``servers`` have read so far, from files and sockets alike."""
    total = 0
    for server in servers:
        if server.process.poll() is not None:
            continue
        for line in Path(f"/proc/{server.process.pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                total += int(line.split()[1])
    return total


def open_fds() -> dict[int, str]:
    """This process's descriptors and what each refers to."""
    targets = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            targets[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue  # the directory listing's own descriptor, closed by now
    return targets


def sockets_of(server: DataserverProcess) -> int:
    """How many sockets ``server`` has open (its connections end when it is done with them)."""
    fd_dir = Path(f"/proc/{server.process.pid}/fd")
    count = 0
    for entry in os.listdir(fd_dir):
        try:
            count += os.readlink(fd_dir / entry).startswith("socket:")
        except OSError:
            continue  # closed while we looked
    return count


def replica_fds() -> list[str]:
    return [target for target in open_fds().values() if "/chunks/chunk_" in target]


def replica_path(server: DataserverProcess, placement: ChunkPlacement) -> Path:
    name = f"chunk_{placement.chunk_id:016x}_{placement.version:016x}"
    return server.data_dir / "chunks" / name


def flip_a_bit(server: DataserverProcess, placement: ChunkPlacement, offset: int) -> None:
    """Flip one bit of block data in the replica file, behind the dataserver's back."""
    with open(replica_path(server, placement), "r+b") as handle:
        handle.seek(DATA_OFFSET_BYTES + offset)
        byte = handle.read(1)[0]
        handle.seek(DATA_OFFSET_BYTES + offset)
        handle.write(bytes([byte ^ 0x10]))


async def write_file(
    cluster: Cluster, data: bytes, *, compressed: bool = False
) -> dict[int, ChunkPlacement]:
    allocator = CompressingAllocator(cluster.meta) if compressed else cluster.meta
    file = PlacedFile(cluster.pool, CHUNK, allocator)
    await file.write(0, data)
    return await file.sync()


async def read_file(
    pool: DataserverPool,
    meta: FakeMetaserver,
    placements: dict[int, ChunkPlacement],
    size: int,
    *,
    call_bytes: int | None = None,
) -> bytes:
    """The whole file, read with READ tokens and no read-ahead (so every byte counted
    was asked for), in one call or in calls of ``call_bytes``, each result copied and
    dropped before the next (so the next read may get a recycled buffer)."""
    file = PlacedFile(
        pool, CHUNK, meta, all_for_reading(meta, placements), length_bytes=size, readahead_bytes=0
    )
    step = call_bytes or max(size, 1)
    return b"".join([bytes(await file.read(offset, step)) for offset in range(0, size, step)])


async def open_replica(address: str, placement: ChunkPlacement) -> tuple[OpenReplicaReply, int]:
    """Ask the dataserver of ``address`` for a descriptor of the replica, over a new link."""
    link = await LocalReadLink.connect(address, KEY, name="test-local")
    try:
        return await link.open_replica(
            OpenReplicaRequest(placement.chunk_id, placement.version, placement.token)
        )
    finally:
        link.close()


def read_through(reply: OpenReplicaReply, fd: int, length: int) -> bytes:
    replica = LocalReplica(fd, reply.file_name, time.time() + 60)
    try:
        return bytes(replica.read(0, length))
    finally:
        replica.retire()


# ---------------------------------------------------------------- the bytes


async def test_replicated_files_read_back_byte_identical_from_the_replica_files(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        # Plain: a full chunk; a chunk with a hole of a whole block (never written) and
        # partly written blocks around it; a last chunk ending inside its second block.
        plain = bytearray(rng.randbytes(2 * CHUNK + BLOCK + 777))
        plain[CHUNK + BLOCK + 100 : CHUNK + 3 * BLOCK + 5] = bytes(2 * BLOCK - 95)
        allocator_file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await allocator_file.write(0, plain[: CHUNK + BLOCK + 100])
        await allocator_file.write(CHUNK + 3 * BLOCK + 5, plain[CHUNK + 3 * BLOCK + 5 :])
        plain_placements = await allocator_file.sync()
        assert sorted(plain_placements) == [0, 1, 2]
        # Compressed: compressible text with one incompressible block, a short last block.
        text = bytearray(
            (b"local reads skip the dataserver's copy. " * 20_000)[: CHUNK + 2 * BLOCK]
        )
        text[BLOCK : 2 * BLOCK] = rng.randbytes(BLOCK)
        text += b"tail" * 250
        compressed = bytes(text)
        compressed_placements = await write_file(cluster, compressed, compressed=True)
        for placement in compressed_placements.values():
            info = await cluster.replica_info(placement.replicas[0], placement)
            assert info.compressed and info.disk_bytes < info.length_bytes, "not compressed"

        files = [(bytes(plain), plain_placements), (compressed, compressed_placements)]
        async with DataserverPool.open(KEY, name="local-reader") as pool:
            assert pool.local is not None
            for data, placements in files:
                for call_bytes in (None, CHUNK, 100_000):
                    served_before = bytes_read_by(cluster.dataservers)
                    local_before = pool.local.bytes_read
                    got = await read_file(
                        pool, cluster.meta, placements, len(data), call_bytes=call_bytes
                    )
                    assert got == data, f"read in calls of {call_bytes or len(data)} bytes"
                    assert pool.local.bytes_read - local_before == len(data)
                    served = bytes_read_by(cluster.dataservers) - served_before
                    assert served < QUIET_DATASERVER_READ_BYTES_MAX, f"dataservers read {served} B"

        # The same reads through the dataservers: they read at least what they send.
        async with DataserverPool.open(KEY, name="network-reader", local_reads=False) as pool:
            served_before = bytes_read_by(cluster.dataservers)
            assert await read_file(pool, cluster.meta, plain_placements, len(plain)) == plain
            served = bytes_read_by(cluster.dataservers) - served_before
            # At least the stored bytes: all of it but the hole and the unwritten tails.
            assert served > len(plain) // 2, "the comparison above would prove nothing"


# ---------------------------------------------------------------- corruption


async def test_a_flipped_bit_in_the_local_replica_is_never_returned_and_is_reported(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = rng.randbytes(CHUNK)
        placement = for_reading(cluster.meta, (await write_file(cluster, data))[0])
        bad_address = placement.replicas[0]  # the one a local read tries first
        bad = cluster.by_address(bad_address)
        flip_a_bit(bad, placement, 1234)

        reported: list[tuple[str, str]] = []

        async def on_corrupt(chunk_id: int, version: int, address: str, reason: str) -> None:
            reported.append((address, reason))

        async with DataserverPool.open(KEY, name="local-reader") as pool:
            reader = ChunkReader(pool, placement, on_corrupt=on_corrupt, readahead_bytes=0)
            assert await reader.read(0, CHUNK) == data
            assert reader.bytes_from.get(bad_address, 0) == 0
        # As through the network path: the client passes the dataserver's verdict on ...
        assert [address for address, _ in reported] == [bad_address]

        # ... and the dataserver reports its own replica, and no other is reported.
        def leader_told() -> bool:
            return any(
                r.dataserver_address == bad_address and r.chunk_id == placement.chunk_id
                for r in cluster.meta.corrupt_reports
            )

        await wait_until(leader_told, "the dataserver to report the corrupt replica", 5.0)
        assert {r.dataserver_address for r in cluster.meta.corrupt_reports} == {bad_address}


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "compressed"])
async def test_a_flipped_bit_read_locally_is_never_returned_nor_blamed_on_a_good_replica(
    tmp_path: Path, rng: random.Random, compressed: bool
) -> None:
    async with running_cluster(tmp_path) as cluster:
        if compressed:
            data = (b"%d bottles of beer on the wall. " * 9000)[:CHUNK]
            flipped_at = 20  # inside block 0's few stored bytes
        else:
            data = rng.randbytes(CHUNK)
            flipped_at = 4321
        placements = await write_file(cluster, data, compressed=compressed)
        placement = for_reading(cluster.meta, placements[0])
        bad_address = placement.replicas[0]  # the one a local read tries first
        flip_a_bit(cluster.by_address(bad_address), placement, flipped_at)
        reported: list[str] = []

        async def on_corrupt(chunk_id: int, version: int, address: str, reason: str) -> None:
            reported.append(address)

        async with DataserverPool.open(KEY, name="local-reader") as pool:
            reader = ChunkReader(pool, placement, on_corrupt=on_corrupt, readahead_bytes=0)
            assert await reader.read(0, CHUNK) == data
            assert await reader.read(0, BLOCK) == data[:BLOCK]
            assert reader.bytes_from.get(bad_address, 0) == 0
        assert set(reported) <= {bad_address}
        assert {r.dataserver_address for r in cluster.meta.corrupt_reports} <= {bad_address}
        # The flip hit stored bytes: the dataserver's own verification finds it.
        with pytest.raises(RpcError) as caught:
            await cluster.replica_bytes(bad_address, placement)
        assert caught.value.code == CHECKSUM_MISMATCH


# ---------------------------------------------------------------- the local socket


async def test_forged_altered_and_expired_tokens_are_refused_on_the_local_socket(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        placement = (await write_file(cluster, b"secret" * 1000))[0]
        now = time.time()
        forged = sign_token(
            b"not the cluster key at all!!!!!!",
            placement.chunk_id,
            placement.version,
            AccessMode.READ,
            now,
        )
        readable = cluster.meta.token(placement.chunk_id, placement.version, AccessMode.READ)
        altered = dataclasses.replace(readable, version=ChunkVersion(placement.version + 1))
        other_chunk = dataclasses.replace(readable, chunk_id=ChunkId(placement.chunk_id + 1))
        expired = sign_token(
            KEY, placement.chunk_id, placement.version, AccessMode.READ, now - 10 * TOKEN_LIFETIME_S
        )
        server = cluster.by_address(placement.replicas[0])
        fds_before = open_fds()
        link = await LocalReadLink.connect(server.address, KEY, name="test-local")
        try:
            for token, why in (
                (forged, "forged"),
                (altered, "altered"),
                (other_chunk, "altered chunk id"),
                (expired, "expired"),
            ):
                request = OpenReplicaRequest(placement.chunk_id, placement.version, token)
                with pytest.raises(RpcError) as caught:
                    await link.open_replica(request)
                # A refusal that came with a descriptor would be EPROTO (see _reply).
                assert caught.value.code == TOKEN_REFUSED, why
                assert not link.closed, f"{why}: a refusal is an answer, not a broken link"
            assert not replica_fds(), "a descriptor arrived with a refusal"
            # The same link still serves a good token.
            reply, fd = await link.open_replica(
                OpenReplicaRequest(placement.chunk_id, placement.version, readable)
            )
            assert read_through(reply, fd, 6000) == b"secret" * 1000
        finally:
            link.close()
        assert open_fds().keys() == fds_before.keys()
        await wait_until(
            lambda: server.log_text().count("refused read of chunk") >= 4,
            "the refusals' log lines",
            5.0,
        )
        log = server.log_text()
        assert "forged or altered" in log and "expired" in log


async def test_a_wrong_cluster_key_on_the_local_socket_is_refused_and_harms_nothing(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = b"keyed" * 5000
        placement = for_reading(cluster.meta, (await write_file(cluster, data))[0])
        server = cluster.by_address(placement.replicas[0])
        with pytest.raises(RpcError) as caught:
            await LocalReadLink.connect(server.address, b"another cluster's key!!!!", name="x")
        assert caught.value.code == errno.EACCES
        await wait_until(
            lambda: "refused connection from local socket" in server.log_text(),
            "the refusal's log line",
            5.0,
        )
        assert server.process.poll() is None
        reply, fd = await open_replica(server.address, placement)
        assert read_through(reply, fd, len(data)) == data
        assert await cluster.replica_bytes(server.address, placement) == data


async def _authenticated_raw_stream(address: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(local_socket_name(address))
    stream = trio.SocketStream(sock)
    await handshake_as_dialer(stream, KEY, "garbage", address)
    return stream


async def _assert_closed_by_peer(stream: trio.SocketStream, what: str) -> None:
    """The dataserver ends this connection (after whatever it still had to say)."""
    try:
        with trio.fail_after(5):
            while await stream.receive_some(4096):
                pass
    except trio.BrokenResourceError:
        pass  # closed with our garbage unread: a reset
    except trio.TooSlowError:
        raise AssertionError(f"{what}: the dataserver kept the connection open") from None
    finally:
        await stream.aclose()


async def test_garbage_on_the_local_socket_closes_that_connection_only(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = rng.randbytes(BLOCK + 17)
        placement = for_reading(cluster.meta, (await write_file(cluster, data))[0])
        server = cluster.by_address(placement.replicas[0])
        bystander = await LocalReadLink.connect(server.address, KEY, name="bystander")
        request = OpenReplicaRequest(placement.chunk_id, placement.version, placement.token)

        for round_number in range(GARBAGE_ROUNDS):
            # Before the handshake: random bytes (a random length prefix is over the
            # limit, short of a chance of one in a million, so no wait for more).
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(local_socket_name(server.address))
            stream = trio.SocketStream(sock)
            await stream.send_all(rng.randbytes(rng.randrange(16, 8192)))
            await _assert_closed_by_peer(stream, f"random bytes, round {round_number}")
            # After the handshake: random bytes where a request should be.
            stream = await _authenticated_raw_stream(server.address)
            await stream.send_all(rng.randbytes(rng.randrange(16, 8192)))
            await _assert_closed_by_peer(stream, f"random frame, round {round_number}")

        header = pack_header(schema.encode(request))
        malformed = {
            "an oversized prefix": PREFIX.pack(1 << 30, 0),
            "an empty header": PREFIX.pack(0, 0),
            "a payload": frame_prefix(header, 1) + b"x",
            "a reply for a request": frame_prefix(
                pack_header(schema.encode(OpenReplicaReply("chunk_0"))), 0
            ),
            "a list of strings": frame_prefix(pack_header(["open", "sesame"]), 0),
            "bad msgpack": frame_prefix(b"\xc1\xc1\xc1", 0),
        }
        for what, frame in malformed.items():
            stream = await _authenticated_raw_stream(server.address)
            await stream.send_all(frame)
            await _assert_closed_by_peer(stream, what)

        assert server.process.poll() is None
        assert "Traceback" not in server.log_text(), "garbage reached a bug path"
        reply, fd = await bystander.open_replica(request)  # a link opened before the garbage
        bystander.close()
        assert read_through(reply, fd, len(data)) == data
        reply, fd = await open_replica(server.address, placement)
        assert read_through(reply, fd, len(data)) == data
        assert await cluster.replica_bytes(server.address, placement) == data


async def test_a_client_hanging_up_before_its_reply_costs_no_error_in_the_log(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = b"hung up" * 10_000
        placement = for_reading(cluster.meta, (await write_file(cluster, data))[0])
        server = cluster.by_address(placement.replicas[0])
        request = OpenReplicaRequest(placement.chunk_id, placement.version, placement.token)
        sockets_before = sockets_of(server)
        for _ in range(5):
            # A reader killed, or one whose reply timed out, right after asking.
            stream = await _authenticated_raw_stream(server.address)
            await stream.send_all(frame_prefix(pack_header(schema.encode(request)), 0))
            await stream.aclose()
        await wait_until(
            lambda: sockets_of(server) <= sockets_before, "the dataserver to end those five", 5.0
        )
        assert server.process.poll() is None
        reply, fd = await open_replica(server.address, placement)
        assert read_through(reply, fd, len(data)) == data
        log = server.log_text()
        assert "ERROR" not in log and "Traceback" not in log, "a peer's hang-up logged as a bug"


# ---------------------------------------------------------------- versions and writers


async def test_a_reader_of_an_old_version_is_fenced_locally_as_through_the_network(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        old_data = rng.randbytes(CHUNK)
        before = await write_file(cluster, old_data)
        old = for_reading(cluster.meta, before[0])
        async with (
            DataserverPool.open(KEY, name="network", local_reads=False) as network,
            DataserverPool.open(KEY, name="local-unsynced") as local_unsynced,
            DataserverPool.open(KEY, name="local-synced") as local_synced,
        ):
            pools = {"network": network, "unsynced": local_unsynced, "synced": local_synced}
            readers = {
                name: ChunkReader(pool, old, readahead_bytes=0) for name, pool in pools.items()
            }
            for name, reader in readers.items():
                assert await reader.read(0, CHUNK) == old_data, name
            # Both local pools now hold a descriptor of each version-1 file they read.
            assert local_unsynced.local is not None and local_synced.local is not None
            assert local_unsynced.local.bytes_read == local_synced.local.bytes_read == CHUNK

            new_data = rng.randbytes(CHUNK)

            async def outcome(name: str) -> int | str:
                try:
                    data = await readers[name].read(0, CHUNK)
                except ReplicasUnavailable as error:
                    return error.code
                return {old_data: "the old bytes", new_data: "the new bytes"}.get(
                    bytes(data), "other bytes"
                )

            # A writer derives version 2 (a rename of every replica's file) and writes.
            writer = PlacedFile(cluster.pool, CHUNK, cluster.meta, before, length_bytes=CHUNK)
            await writer.write(0, new_data)
            await writer.flush()
            assert await outcome("network") == STALE_VERSION
            assert await outcome("unsynced") == STALE_VERSION, "before the new version's sync"

            after = await writer.sync()
            assert after[0].version > old.version
            assert await outcome("network") == STALE_VERSION
            assert await outcome("synced") == STALE_VERSION, "after the new version's sync"
            fresh = ChunkReader(local_synced, old, readahead_bytes=0)
            with pytest.raises(ReplicasUnavailable) as caught:
                await fresh.read(0, CHUNK)
            assert caught.value.code == STALE_VERSION
            assert local_unsynced.local.bytes_read == local_synced.local.bytes_read == CHUNK


async def test_a_replica_with_unsynced_writes_is_read_through_its_dataserver_until_synced(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = rng.randbytes(2 * BLOCK + 99)
        placement = await cluster.meta.allocate(0)
        readable = for_reading(cluster.meta, placement)
        writer = ChunkWriter(cluster.pool, placement)
        await writer.write(0, data)
        await writer.flush()  # on every replica, synced on none

        for address in placement.replicas:
            with pytest.raises(RpcError) as caught:
                await open_replica(address, readable)
            assert caught.value.code == errno.EBUSY, address
        assert not replica_fds()
        # A reader meanwhile gets the flushed bytes, through the dataservers.
        async with DataserverPool.open(KEY, name="early-reader") as pool:
            reader = ChunkReader(pool, readable, readahead_bytes=0)
            assert await reader.read(0, CHUNK) == data
            assert pool.local is not None and pool.local.bytes_read == 0

        await writer.sync()
        for address in placement.replicas:
            reply, fd = await open_replica(address, readable)
            assert reply.file_name == replica_path(cluster.by_address(address), placement).name
            assert read_through(reply, fd, CHUNK) == data
        async with DataserverPool.open(KEY, name="late-reader") as pool:
            reader = ChunkReader(pool, readable, readahead_bytes=0)
            assert await reader.read(0, CHUNK) == data
            assert pool.local is not None and pool.local.bytes_read == len(data)


# ---------------------------------------------------------------- turned off


async def test_with_local_reads_off_in_the_client_every_read_goes_through_the_network(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = rng.randbytes(2 * CHUNK + 5)
        placements = await write_file(cluster, data)
        fds_before = open_fds()
        async with DataserverPool.open(KEY, name="no-local", local_reads=False) as pool:
            assert pool.local is None
            served_before = bytes_read_by(cluster.dataservers)
            assert await read_file(pool, cluster.meta, placements, len(data)) == data
            assert bytes_read_by(cluster.dataservers) - served_before >= len(data)
            opened = [t for fd, t in open_fds().items() if fds_before.get(fd) != t]
            assert all(t.startswith("socket:") for t in opened), opened
            assert not replica_fds()


async def test_a_dataserver_with_local_reads_off_is_read_through_the_network(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path, count=2) as cluster:
        quiet = await cluster.started(cluster.spawn("no-local", local_reads=False))
        with pytest.raises(RpcError) as caught:
            await LocalReadLink.connect(quiet.address, KEY, name="test-local")
        assert caught.value.code == errno.ECONNREFUSED

        cluster.meta.placement_order = [quiet.address]
        data = rng.randbytes(CHUNK + BLOCK + 3)
        placements = await write_file(cluster, data)
        assert all(p.replicas == (quiet.address,) for p in placements.values())
        async with DataserverPool.open(KEY, name="local-reader") as pool:
            served_before = bytes_read_by([quiet])
            assert await read_file(pool, cluster.meta, placements, len(data)) == data
            assert pool.local is not None and pool.local.bytes_read == 0
            assert bytes_read_by([quiet]) - served_before >= len(data)
        assert "ERROR" not in quiet.log_text()


# ---------------------------------------------------------------- descriptors


async def test_descriptors_are_bounded_and_all_closed_with_the_pool(
    tmp_path: Path, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fuse_client.local_replicas, "OPEN_REPLICAS_MAX", 2)
    async with running_cluster(tmp_path) as cluster:
        data = rng.randbytes(4 * CHUNK)
        placements = all_for_reading(cluster.meta, await write_file(cluster, data))
        fds_before = open_fds()
        async with DataserverPool.open(KEY, name="local-reader") as pool:
            for index, placement in sorted(placements.items()):
                reader = ChunkReader(pool, placement, readahead_bytes=0)
                want = data[index * CHUNK : (index + 1) * CHUNK]
                assert await reader.read(0, CHUNK) == want
                assert len(replica_fds()) == min(index + 1, 2), "the cache's bound"
            assert pool.local is not None and pool.local.bytes_read == len(data)
            # An evicted replica is opened again when read again.
            again = ChunkReader(pool, placements[0], readahead_bytes=0)
            assert await again.read(0, CHUNK) == data[:CHUNK]
            assert len(replica_fds()) == 2
        assert not replica_fds()
        leaked = {fd: t for fd, t in open_fds().items() if fds_before.get(fd) != t}
        assert len(open_fds()) <= len(fds_before), f"descriptors left open: {leaked}"


async def test_a_handed_out_descriptor_outlives_its_dataserver_and_other_chunks_fail_over(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        data = rng.randbytes(2 * CHUNK)
        placements = all_for_reading(cluster.meta, await write_file(cluster, data))
        first = placements[0]
        victim_address = first.replicas[0]  # the replica chunk 0 is read from locally
        # Chunk 1 would be read from the victim first too, had it not gone.
        second = placements[1]
        assert victim_address in second.replicas
        second = dataclasses.replace(
            second,
            replicas=(victim_address,) + tuple(a for a in second.replicas if a != victim_address),
        )
        async with DataserverPool.open(KEY, name="local-reader") as pool:
            assert pool.local is not None
            reader = ChunkReader(pool, first, readahead_bytes=0)
            assert await reader.read(0, CHUNK // 2) == data[: CHUNK // 2]
            assert reader.bytes_from == {victim_address: CHUNK // 2}

            victim = cluster.by_address(victim_address)
            victim.kill()
            victim.process.wait()

            other = ChunkReader(pool, second, readahead_bytes=0)
            assert await other.read(0, CHUNK) == data[CHUNK:]
            assert other.bytes_from.get(victim_address, 0) == 0
            assert sum(other.bytes_from.values()) == CHUNK
            # The client has seen its link to the victim break; the descriptor lives on.
            assert await reader.read(CHUNK // 2, CHUNK // 2) == data[CHUNK // 2 : CHUNK]
            assert reader.bytes_from == {victim_address: CHUNK}, "read from the kept fd"
