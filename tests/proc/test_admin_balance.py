"""``paxfs admin balance`` against real processes: an empty dataserver joins a full cluster.

Three metaservers, four dataservers of 12 MiB each holding a third of it, goal 3, 256 KiB
chunks (see :mod:`tests.proc.test_cluster_harness`); then a fifth, empty one joins.
Without ``--apply`` nothing moves; an ``--apply`` interrupted with Ctrl-C leaves no chunk
below its goal; the rerun resumes and brings every server within the threshold, with
every file's bytes unchanged.  Randomised data prints its seed; replay with
``PAXFS_SEED=N``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import trio

from tests.proc.test_admin_harness import (
    add_dataserver,
    admin,
    admin_client,
    admin_json,
    interrupt,
    restart_dataserver,
    start_admin,
    wait_out_of_safe_mode,
)
from tests.proc.test_cluster_harness import (
    CHUNK_BYTES,
    Cluster,
    DataClient,
    running_cluster,
    seeded_rng,
    wait_for,
)
from wire.cluster_admin_ops import DataserverReport
from wire.ids import ChunkId, ChunkVersion, InodeId

CAPACITY_BYTES = 12 * 1024 * 1024
THRESHOLD_PCT = 5.0
MIB = 1024 * 1024


def utilisation(servers: list[DataserverReport]) -> dict[str, float]:
    """Used % of every live dataserver, by address."""
    return {s.address: 100 * s.used_bytes / s.capacity_bytes for s in servers if s.state == "live"}


def within(servers: list[DataserverReport], threshold_pct: float) -> bool:
    live = [s for s in servers if s.state == "live"]
    mean = 100 * sum(s.used_bytes for s in live) / sum(s.capacity_bytes for s in live)
    return all(abs(u - mean) <= threshold_pct for u in utilisation(live).values())


def on_disk(cluster: Cluster) -> dict[str, dict[ChunkId, ChunkVersion]]:
    return {node.address: node.stored() for node in cluster.dataservers}


async def digests(client: DataClient, inodes: dict[bytes, InodeId]) -> dict[bytes, str]:
    return {
        name: hashlib.sha256(await client.read(inode)).hexdigest() for name, inode in inodes.items()
    }


async def test_an_empty_dataserver_is_filled_by_balance_and_only_with_apply(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    async with (
        running_cluster(tmp_path) as cluster,
        cluster.client() as client,
        admin_client(cluster) as tool,
    ):
        for node in cluster.dataservers:
            restart_dataserver(node, "--capacity-bytes", str(CAPACITY_BYTES))

        async def capped() -> bool:
            servers, _ = await tool.dataservers()
            return [s.capacity_bytes for s in servers] == [CAPACITY_BYTES] * 4

        await wait_for(capped, "every dataserver to report its capacity cap", 30)
        files = {f"f{i}".encode(): rng.randbytes(4 * CHUNK_BYTES) for i in range(5)}
        inodes = {name: await client.write_file(name, data) for name, data in files.items()}
        before = await digests(client, inodes)
        assert before == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
        newcomer = add_dataserver(cluster, tmp_path, "--capacity-bytes", str(CAPACITY_BYTES))
        await wait_out_of_safe_mode(cluster)

        async def joined() -> bool:
            return len(utilisation((await tool.dataservers())[0])) == 5

        await wait_for(joined, "the new dataserver to register", 30)
        servers, _ = await tool.dataservers()
        assert utilisation(servers)[newcomer.address] == 0.0
        assert not within(servers, THRESHOLD_PCT)

        # Without --apply: a plan, and nothing moves.
        stored = on_disk(cluster)
        planned = await admin_json(cluster, "balance", "--threshold", str(THRESHOLD_PCT))
        plan = planned["plan"]
        assert not planned["applied"] and plan["moves"]
        assert {m["target"] for m in plan["moves"]} == {f"{newcomer.dataserver_id:016x}"}
        assert not plan["outside_after"]
        await trio.sleep(1.0)  # several heartbeats: any move would show by now
        assert on_disk(cluster) == stored
        text = await admin(cluster, "balance", "--threshold", str(THRESHOLD_PCT))
        assert text.returncode == 0 and "run again with --apply" in text.stdout
        newcomer_id = f"{newcomer.dataserver_id:016x}"
        without = await admin_json(
            cluster, "balance", "--threshold", str(THRESHOLD_PCT), "--exclude", newcomer_id[:8]
        )
        involved = {m["source"] for m in without["plan"]["moves"]}
        involved |= {m["target"] for m in without["plan"]["moves"]}
        involved |= {s["dataserver_id"] for s in without["plan"]["servers"]}
        assert newcomer_id not in involved and len(without["plan"]["servers"]) == 4
        assert on_disk(cluster) == stored

        # --apply under a tight bandwidth cap, interrupted: no chunk below its goal.  At
        # 0.25 MiB/s a 256 KiB move reserves a second, so the run is still going at 3 s.
        slow = start_admin(
            cluster, "balance", "--threshold", str(THRESHOLD_PCT), "--apply", "--bandwidth", "0.25"
        )
        await trio.sleep(3.0)
        status, stderr = interrupt(slow)
        assert status == 130, stderr
        assert "interrupted" in stderr and "run it again to resume" in stderr
        fsck = await admin_json(cluster, "fsck", "/", "--chunks")
        assert fsck["healthy"], fsck
        assert all(c["counted"] >= 3 for f in fsck["files"] for c in f["chunks"])
        moved_so_far = len(newcomer.stored())
        assert 0 < moved_so_far < len(plan["moves"])

        # The rerun resumes from where the cluster is now.
        started = time.monotonic()
        applied = await admin_json(cluster, "balance", "--threshold", str(THRESHOLD_PCT), "--apply")
        elapsed_s = time.monotonic() - started
        run = applied["run"]
        assert applied["applied"] and run["failed"] == 0 and run["done"] == run["planned"]
        print(f"balance: {run['done']} moves, {run['bytes_moved']} bytes in {elapsed_s:.2f} s")

        async def balanced() -> bool:
            return within((await tool.dataservers())[0], THRESHOLD_PCT)

        await wait_for(balanced, f"every dataserver within ±{THRESHOLD_PCT} points", 20)
        print("utilisation after balance:", utilisation((await tool.dataservers())[0]))
        report = await admin_json(cluster, "report")
        assert report["health"]["under_replicated"] == 0 and report["health"]["missing"] == 0
        assert await digests(client, inodes) == before
        assert (await admin(cluster, "fsck", "/", "--verify-checksums")).returncode == 0
        again = await admin_json(cluster, "balance", "--threshold", str(THRESHOLD_PCT))
        assert again["plan"]["moves"] == []
