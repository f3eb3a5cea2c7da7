"""Decommission and maintenance outlive the metaserver leader (real processes).

The mode goes through the Paxos log, so after ``kill -9`` of the leader the new leader
keeps a stopped dataserver in maintenance (nothing is re-replicated, even past the
dead-after time, though that server never reported to the new leader) and carries on a
drain that the old leader began.  Three metaservers, four dataservers, goal 3, 256 KiB
chunks, dead after 2.5 s.  Randomised data prints its seed; replay with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

from pathlib import Path

import trio

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
    Cluster,
    running_cluster,
    seeded_rng,
    wait_for,
)
from wire.ids import ChunkId

GOAL = 3


async def kill_the_leader(cluster: Cluster) -> int:
    """``kill -9`` the metaserver leader; the id of the next leader."""
    old = await cluster.leader()
    cluster.group.kill(old)
    survivors = [node for node in cluster.group.nodes if node != old]
    new = await cluster.group.wait_for_leader(among=survivors)
    assert new != old
    print(f"metaserver {old} killed; {new} leads")
    return new


async def state_of(cluster: Cluster, address: str) -> str:
    report = await admin_json(cluster, "report")
    states: dict[str, str] = {s["address"]: s["state"] for s in report["dataservers"]}
    return states[address]


async def test_maintenance_survives_a_leader_change_while_the_server_is_down(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    files = {f"m{i}".encode(): rng.randbytes(2 * CHUNK_BYTES + 100 * i) for i in range(3)}
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inodes = {name: await client.write_file(name, data) for name, data in files.items()}
        await wait_out_of_safe_mode(cluster)
        victim, _ = await busiest(cluster, client, list(inodes.values()))
        before = {node.address: node.stored() for node in cluster.dataservers}
        assert (await admin_json(cluster, "maintenance", victim.address, "on"))["state"] == (
            "maintenance"
        )
        assert victim.process.stop() == 0
        await kill_the_leader(cluster)
        # The new leader never hears from the victim: past its grace period and the
        # dead-after time, it still holds it in maintenance and copies nothing.
        await wait_out_of_safe_mode(cluster)
        await trio.sleep(DEAD_AFTER_S + 1.0)
        report = await admin_json(cluster, "report")
        states = {s["address"]: s["state"] for s in report["dataservers"]}
        assert states[victim.address] == "maintenance"
        assert report["health"]["repair"]["replicas_wanted"] == 0
        others = {n.address: n.stored() for n in cluster.dataservers if n is not victim}
        assert others == {a: s for a, s in before.items() if a != victim.address}
        for name, inode in inodes.items():
            assert await client.read(inode) == files[name]

        victim.process.start()
        async with admin_client(cluster) as tool:

            async def reported_again() -> bool:
                servers, _ = await tool.dataservers()
                return any(s.address == victim.address and s.replicas > 0 for s in servers)

            await wait_for(reported_again, "the restarted dataserver to report", 20)
        assert await state_of(cluster, victim.address) == "maintenance"
        assert (await admin_json(cluster, "maintenance", victim.address, "off"))["state"] == "live"
        await trio.sleep(1.0)
        assert {n.address: n.stored() for n in cluster.dataservers} == before
        assert (await admin(cluster, "fsck", "/")).returncode == 0


async def test_a_new_leader_carries_on_a_drain_the_old_one_began(tmp_path: Path) -> None:
    rng = seeded_rng()
    files = {f"d{i}".encode(): rng.randbytes(3 * CHUNK_BYTES) for i in range(4)}
    async with (
        running_cluster(tmp_path, replication_rate_mib_s=0.5) as cluster,
        cluster.client() as client,
    ):
        inodes = {name: await client.write_file(name, data) for name, data in files.items()}
        await wait_out_of_safe_mode(cluster)
        victim, chunks = await busiest(cluster, client, list(inodes.values()))
        started = await admin_json(cluster, "decommission", victim.address)
        assert started["state"] == "decommissioning" and started["drain_chunks"] > 1
        await kill_the_leader(cluster)
        # Nobody sets the mode again: the new leader knows it from the log.
        assert await state_of(cluster, victim.address) == "decommissioning"

        async def drained() -> bool:
            shown = await admin_json(cluster, "decommission", victim.address, "--status")
            assert shown["state"] == "decommissioning", shown
            return bool(shown["decommissioned"])

        await wait_for(drained, "the new leader to finish the drain", 30)
        done = await admin_json(cluster, "decommission", victim.address, "--wait")
        assert done["decommissioned"] and done["drain_chunks"] == 0
        assert victim.process.stop() == 0
        holders: dict[ChunkId, int] = {
            chunk.chunk: len(cluster.holders(chunk.chunk, chunk.version))
            for chunk in chunks.values()
        }
        assert min(holders.values()) >= GOAL, holders
        for name, inode in inodes.items():
            assert await client.read(inode) == files[name]
