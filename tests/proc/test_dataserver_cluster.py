"""A dataserver process and the metaserver leader: registration, reports, commands, restarts.

The leader is the stand-in of :mod:`tests.proc.dataserver_harness`; the dataservers are
real processes.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from fuse_client.chunk_io import PlacedFile
from tests.proc.dataserver_harness import (
    CHUNK_SIZE_BYTES,
    KEY,
    REPO_ROOT,
    running_cluster,
    wait_until,
    write_config,
)
from wire.address import Address
from wire.cluster_ops import (
    FULL_REPORT,
    HEARTBEAT,
    REGISTER,
    REPORT_CORRUPT,
    DeleteReplica,
    ReplicateChunk,
    SendFullReport,
)
from wire.dataserver_ops import REPLICATE, ReplicateRequest
from wire.errors import NOT_LEADER, RpcError
from wire.rpc import CallContext, Handlers
from wire.tokens import AccessMode
from wire.transport import bound_port, serve

CHUNK = CHUNK_SIZE_BYTES


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"PAXFS_SEED={seed}")
    return random.Random(seed)


async def test_registration_and_reports_give_the_leader_every_replica(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path) as cluster:
        for server in cluster.dataservers:
            registration = cluster.meta.registrations[server.dataserver_id]  # type: ignore[index]
            assert registration.address == server.address
            assert registration.space.capacity_bytes > 0
            assert cluster.meta.full_reports[server.dataserver_id] >= 1  # type: ignore[index]
        data = rng.randbytes(2 * CHUNK + 10)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        placements = await file.sync()

        def reported() -> bool:
            for index, placement in placements.items():
                length = min(CHUNK, len(data) - index * CHUNK)
                for address in placement.replicas:
                    server = cluster.by_address(address)
                    known = cluster.meta.replicas.get(server.dataserver_id, {})  # type: ignore[arg-type]
                    report = known.get(placement.chunk_id)
                    if report is None or (report.version, report.length_bytes) != (
                        placement.version,
                        length,
                    ):
                        return False
                    assert not report.corrupt
            return True

        await wait_until(reported, "incremental reports of the new replicas and their lengths")
        first_id = cluster.dataservers[0].dataserver_id

        def idle_heartbeat() -> bool:
            heartbeat = cluster.meta.heartbeats[first_id]  # type: ignore[index]
            return heartbeat.active_writes == 0 and heartbeat.space.replica_count >= 1

        await wait_until(idle_heartbeat, "a heartbeat showing the replicas and no writes")


async def test_a_new_leader_epoch_or_a_command_brings_a_full_report(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, count=1, replication=1) as cluster:
        server = cluster.dataservers[0]
        before = cluster.meta.full_reports[server.dataserver_id]  # type: ignore[index]
        cluster.meta.epoch += 1
        await wait_until(
            lambda: cluster.meta.full_reports[server.dataserver_id] == before + 1,  # type: ignore[index]
            "a full report after the epoch changed",
        )
        cluster.meta.send(server.dataserver_id, SendFullReport())  # type: ignore[arg-type]
        await wait_until(
            lambda: cluster.meta.full_reports[server.dataserver_id] == before + 2,  # type: ignore[index]
            "a full report on command",
        )
        cluster.meta.unknown.add(server.dataserver_id)  # type: ignore[arg-type]
        await wait_until(
            lambda: (
                server.dataserver_id not in cluster.meta.unknown
                and cluster.meta.full_reports[server.dataserver_id] == before + 3
            ),  # type: ignore[index]
            "registration again when the leader forgot us",
        )


async def test_delete_and_replicate_commands_move_replicas(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path, count=4) as cluster:
        cluster.meta.placement_order = [s.address for s in cluster.dataservers[:3]]
        data = rng.randbytes(CHUNK - 5)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        placement = (await file.sync())[0]
        spare = cluster.dataservers[3]
        token = cluster.meta.token(placement.chunk_id, placement.version, AccessMode.READ)
        cluster.meta.send(
            spare.dataserver_id,  # type: ignore[arg-type]
            ReplicateChunk(placement.chunk_id, placement.version, placement.replicas[1], token),
        )

        def copied() -> bool:
            known = cluster.meta.replicas.get(spare.dataserver_id, {})  # type: ignore[arg-type]
            report = known.get(placement.chunk_id)
            return report is not None and report.version == placement.version

        await wait_until(copied, "the spare to copy the replica and report it")
        assert await cluster.replica_bytes(spare.address, placement) == data
        info = await cluster.replica_info(spare.address, placement)
        assert info.length_bytes == len(data)

        doomed = cluster.by_address(placement.replicas[0])
        cluster.meta.send(
            doomed.dataserver_id,  # type: ignore[arg-type]
            DeleteReplica(placement.chunk_id, placement.version),
        )
        await wait_until(
            lambda: placement.chunk_id not in cluster.meta.replicas[doomed.dataserver_id],  # type: ignore[index]
            "the deletion to be reported",
        )
        with pytest.raises(RpcError) as caught:
            await cluster.replica_info(doomed.address, placement)
        assert caught.value.code == errno.ENOENT
        assert await file.read(0, len(data)) == data


async def test_copies_of_one_chunk_asked_for_at_once_all_succeed(
    tmp_path: Path, rng: random.Random
) -> None:
    """A drain's copy and an open for write's top-up can ask one server for the same
    chunk at once: each gets the copy, none a "chunk already stored" error."""
    async with running_cluster(tmp_path, count=4) as cluster:
        cluster.meta.placement_order = [s.address for s in cluster.dataservers[:3]]
        data = rng.randbytes(3 * CHUNK // 4)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        placement = (await file.sync())[0]
        spare = cluster.dataservers[3]
        token = cluster.meta.token(placement.chunk_id, placement.version, AccessMode.READ)
        lengths: list[int] = []

        async def copy(source: str) -> None:
            request = ReplicateRequest(placement.chunk_id, placement.version, source, token)
            reply, _ = await cluster.pool.call(spare.address, REPLICATE, request)
            lengths.append(reply.length_bytes)

        async with trio.open_nursery() as nursery:
            for source in [*placement.replicas, *placement.replicas]:
                nursery.start_soon(copy, source)
        assert lengths == [len(data)] * 6
        assert await cluster.replica_bytes(spare.address, placement) == data


async def test_a_restarted_dataserver_keeps_its_id_and_its_synced_replicas(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path, count=1, replication=1) as cluster:
        data = rng.randbytes(CHUNK + 77)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        placements = await file.sync()
        server = cluster.dataservers[0]
        old_id, old_incarnation = server.dataserver_id, server.incarnation
        again = await cluster.restart(server)
        assert again.dataserver_id == old_id
        assert again.incarnation != old_incarnation
        await wait_until(
            lambda: (
                set(cluster.meta.replicas.get(again.dataserver_id, {}))  # type: ignore[arg-type]
                == {p.chunk_id for p in placements.values()}
            ),
            "the full report after the restart",
        )
        placements = {
            index: p.__class__(p.chunk_id, p.version, p.base_version, (again.address,), p.token)
            for index, p in placements.items()
        }
        reader = PlacedFile(cluster.pool, CHUNK, cluster.meta, placements, length_bytes=len(data))
        assert await reader.read(0, len(data)) == data


async def test_the_scrubber_finds_a_flipped_bit_nobody_reads(
    tmp_path: Path, rng: random.Random
) -> None:
    async with running_cluster(tmp_path, count=1, replication=1) as cluster:
        data = rng.randbytes(CHUNK)
        file = PlacedFile(cluster.pool, CHUNK, cluster.meta)
        await file.write(0, data)
        placement = (await file.sync())[0]
        server = cluster.dataservers[0]
        assert server.stop() == 0
        replica = (
            server.data_dir / "chunks" / f"chunk_{placement.chunk_id:016x}_{placement.version:016x}"
        )
        with open(replica, "r+b") as handle:
            handle.seek(64 * 1024 + 3 * 64 * 1024 + 5)  # block 3, slot 0
            byte = handle.read(1)[0]
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte ^ 1]))
        server.process.returncode = None  # let restart() stop the exited process quietly
        cluster.dataservers.remove(server)
        again = cluster.spawn(server.name, scrub_rate_mib_s=100.0)
        again.incarnation = server.incarnation
        await cluster.started(again)
        await wait_until(
            lambda: any(
                r.reporter == "scrubber" and r.chunk_id == placement.chunk_id
                for r in cluster.meta.corrupt_reports
            ),
            "the scrubber to report the replica",
        )
        report = next(r for r in cluster.meta.corrupt_reports if r.chunk_id == placement.chunk_id)
        assert report.dataserver_id == again.dataserver_id
        assert "3" in report.reason


async def test_a_follower_redirects_the_dataserver_to_the_leader(tmp_path: Path) -> None:
    follower_calls: list[str] = []

    def redirecting(leader: str, name: str) -> object:
        async def handler(_request: object, _context: CallContext) -> object:
            follower_calls.append(name)
            raise RpcError(NOT_LEADER, leader)

        return handler

    async with running_cluster(tmp_path, count=0) as cluster:
        leader = f"127.0.0.1:{cluster.metaserver_port}"
        follower_handlers = Handlers()
        for method in (REGISTER, HEARTBEAT, FULL_REPORT, REPORT_CORRUPT):
            follower_handlers.register(method, redirecting(leader, method.name))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(serve, follower_handlers, KEY, Address("127.0.0.1", 0))
            )
            follower_port = bound_port(listeners)
            server = cluster.spawn("ds0", metaserver_ports=[follower_port, cluster.metaserver_port])
            await cluster.started(server)
            nursery.cancel_scope.cancel()
        assert follower_calls and follower_calls[0] == "cluster.register"


def _run_dataserver(tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "refused.toml"
    write_config(config, metaserver_ports=[1], data_dir=data_dir)
    return subprocess.run(
        [sys.executable, "-m", "dataserver.server", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"DATASERVER": "paxfs-dataserver 9\nid 00000000000000aa\n"}, "format 9"),
        ({"holiday-photos.jpg": "..."}, "not a paxfs dataserver directory"),
        (
            {"DATASERVER": "paxfs-dataserver 1\nid 00000000000000aa\n", "chunks/FORMAT": "x\n"},
            "not a paxfs chunk store",
        ),
    ],
    ids=["future-format", "foreign-directory", "foreign-chunk-store"],
)
def test_a_data_directory_it_does_not_know_is_refused_in_one_line(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    data_dir = tmp_path / "data"
    for name, text in files.items():
        (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / name).write_text(text)
    result = _run_dataserver(tmp_path, data_dir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
