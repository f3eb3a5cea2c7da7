"""``paxfs admin decommission`` and ``maintenance`` against real processes, and the
report's repair progress while a lost dataserver is healed.

Three metaservers, four dataservers, goal 3, 256 KiB chunks, a dataserver is dead after
2.5 s of silence (see :mod:`tests.proc.test_cluster_harness`).  Randomised data prints
its seed; replay with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from metaserver.cluster_admin import RATE_WINDOW_S_MIN
from tests.proc.test_admin_harness import (
    admin,
    admin_client,
    admin_json,
    busiest,
    wait_out_of_safe_mode,
)
from tests.proc.test_cluster_harness import (
    CHUNK_BYTES,
    DEAD_AFTER_S,
    running_cluster,
    seeded_rng,
    wait_for,
)
from tools.admin_fsck import judge_chunk
from wire.ids import InodeId

GOAL = 3


async def test_decommission_while_files_are_read_and_written_keeps_every_chunk_at_its_goal(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    static = {f"s{i}".encode(): rng.randbytes(2 * CHUNK_BYTES + 1000 * i) for i in range(4)}
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inodes = {name: await client.write_file(name, data) for name, data in static.items()}
        await wait_out_of_safe_mode(cluster)
        victim, chunks = await busiest(cluster, client, list(inodes.values()))
        held_before = set(victim.stored())
        stop = trio.Event()
        errors: list[str] = []
        written: dict[InodeId, bytes] = {}
        fewest_on_disk = GOAL
        fewest_safe = GOAL
        reads = writes = 0

        async def read_all() -> None:
            nonlocal reads
            while not stop.is_set():
                for name, inode in inodes.items():
                    try:
                        if await client.read(inode) != static[name]:
                            errors.append(f"read {name!r}: wrong bytes")
                    except Exception as error:
                        errors.append(f"read {name!r}: {error!r}")
                    reads += 1

        async def write_more() -> None:
            nonlocal writes
            while not stop.is_set():
                data = rng.randbytes(rng.randrange(1, 2 * CHUNK_BYTES))
                try:
                    if written and rng.random() < 0.5:
                        inode = rng.choice(sorted(written))
                        patch = rng.randbytes(1000)
                        await client.write(inode, 500, patch)
                        # A file shorter than 500 bytes gains a hole of zeros up to 500.
                        old = written[inode].ljust(500, b"\0")
                        written[inode] = old[:500] + patch + old[500 + len(patch) :]
                    else:
                        written[await client.write_file(f"w{writes}".encode(), data)] = data
                except Exception as error:
                    errors.append(f"write: {error!r}")
                writes += 1

        async def watch() -> None:
            """No static chunk is ever stored on fewer than GOAL running servers, and the
            leader never sees any settled chunk with fewer than GOAL safe replicas."""
            nonlocal fewest_on_disk, fewest_safe
            async with admin_client(cluster) as tool:
                while not stop.is_set():
                    for chunk in chunks.values():
                        held = len(cluster.holders(chunk.chunk, chunk.version))
                        fewest_on_disk = min(fewest_on_disk, held)
                    for inode in [*inodes.values(), *written]:
                        view = await tool.file_view(inode)
                        for status in view.chunks:
                            if status.health != "writing":
                                verdict = judge_chunk(status)
                                fewest_safe = min(fewest_safe, verdict.safe_replicas)
                    await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            nursery.start_soon(write_more)
            nursery.start_soon(watch)
            await trio.sleep(0.5)
            drained = await admin_json(cluster, "decommission", victim.address, "--wait")
            await trio.sleep(0.5)
            stop.set()
        print(f"{reads} reads and {writes} writes during the decommission")
        assert not errors, errors[:10]
        assert reads > 0 and writes > 0
        assert fewest_on_disk >= GOAL and fewest_safe >= GOAL
        assert drained["decommissioned"] and drained["drain_chunks"] == 0
        prefix = f"{victim.dataserver_id:016x}"[:6]
        status = await admin_json(cluster, "decommission", prefix, "--status")
        assert status["state"] == "decommissioning" and status["decommissioned"]
        # Its replicas stayed readable throughout and are still there...
        assert held_before <= set(victim.stored())
        # ...but every chunk now has its goal elsewhere: the server can go.
        assert victim.process.stop() == 0
        for chunk in chunks.values():
            assert len(cluster.holders(chunk.chunk, chunk.version)) >= GOAL
        for name, inode in inodes.items():
            assert await client.read(inode) == static[name]
        for inode, data in written.items():
            assert await client.read(inode) == data
        assert (await admin(cluster, "fsck", "/")).returncode == 0


async def test_maintenance_holds_back_re_replication_and_a_real_loss_shows_repair_progress(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    files = {f"f{i}".encode(): rng.randbytes(3 * CHUNK_BYTES) for i in range(4)}
    async with (
        running_cluster(tmp_path, replication_rate_mib_s=0.5) as cluster,
        cluster.client() as client,
    ):
        inodes = {name: await client.write_file(name, data) for name, data in files.items()}
        await wait_out_of_safe_mode(cluster)
        victim, chunks = await busiest(cluster, client, list(inodes.values()))
        before = {node.address: node.stored() for node in cluster.dataservers}

        shown = await admin_json(cluster, "maintenance", victim.address, "on")
        assert shown["state"] == "maintenance"
        assert victim.process.stop() == 0
        await trio.sleep(DEAD_AFTER_S + 2.0)
        report = await admin_json(cluster, "report")
        states = {s["address"]: s["state"] for s in report["dataservers"]}
        assert states[victim.address] == "maintenance"
        assert report["health"]["under_replicated"] == 0
        assert report["health"]["repair"]["replicas_wanted"] == 0
        assert {n.address: n.stored() for n in cluster.dataservers if n is not victim} == {
            a: s for a, s in before.items() if a != victim.address
        }
        assert (await admin(cluster, "fsck", "/")).returncode == 0

        victim.process.start()
        async with admin_client(cluster) as tool:

            async def heard_again() -> bool:
                servers, _ = await tool.dataservers()
                return any(s.address == victim.address and s.silent_ms < 500 for s in servers)

            await wait_for(heard_again, "the restarted dataserver to report", 20)
            shown = await admin_json(cluster, "maintenance", victim.address, "off")
            assert shown["state"] == "live"
            await trio.sleep(1.0)
            assert {n.address: n.stored() for n in cluster.dataservers} == before

            # A real loss: the report shows the repair going on, then done.
            victim.process.kill(signal.SIGKILL)
            wanted_seen = rate_seen = 0.0
            eta_seen = False

            async def healed() -> bool:
                nonlocal wanted_seen, rate_seen, eta_seen
                health = await tool.health()
                repair = health.repair
                wanted_seen = max(wanted_seen, repair.bytes_wanted)
                rate_seen = max(rate_seen, repair.rate_bytes_s)
                eta_seen |= repair.eta_s is not None and repair.eta_s > 0
                cells = [(c.goal, c.replicas, c.chunks) for c in health.matrix]
                return cells == [(GOAL, GOAL, len(chunks))] and repair.bytes_wanted == 0

            async def noticed() -> bool:
                return (await tool.health()).dataservers_dead == 1

            await wait_for(noticed, "the leader to find the dataserver dead", DEAD_AFTER_S + 5)
            await wait_for(healed, "re-replication at 0.5 MiB/s", 30)
        lost = sum(1 for chunk in chunks.values() if victim.address in chunk.replicas)
        print(f"repair of {lost} replicas: {wanted_seen} bytes wanted, {rate_seen:.0f} B/s seen")
        assert wanted_seen >= CHUNK_BYTES and eta_seen
        # The cap, plus the core's burst (a second's worth, at least a chunk) over the
        # shortest window a rate is given for (2 s), plus sampling jitter.
        cap = 0.5 * 1024 * 1024
        assert 0 < rate_seen <= 1.1 * (cap + max(cap, CHUNK_BYTES) / RATE_WINDOW_S_MIN)
        assert (await admin(cluster, "fsck", "/", "--verify-checksums")).returncode == 0
        for name, inode in inodes.items():
            assert await client.read(inode) == files[name]
