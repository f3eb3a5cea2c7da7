"""Re-replication benchmark: how fast the cluster heals after losing a dataserver.

Run ``python -m benchmarks.bench_rereplication [--lost-mib N] [--rate-mib-s R]``.

Starts 3 metaservers and 4 dataservers on loopback (the process harness of
:mod:`tests.proc.test_cluster_harness`), writes files with goal 3 in 64 MiB chunks until
the dataserver holding the most replicas holds ``--lost-mib`` (default 1024) of them,
kills that dataserver with ``kill -9`` and measures:

* the time from the kill until every chunk is back at 3 live replicas (what a user
  waits for; it includes ``dataserver_dead_after_s`` = 3 s of silence before the leader
  declares the server dead);
* the copy rate: the lost bytes over the time from the first copy appearing on a
  surviving dataserver to the last chunk healed.

``--rate-mib-s`` is ``[metaserver] replication_rate_mib_s`` (default: uncapped, to
measure the machinery; the production default is 200).  Beside it, this disk's own
sequential write rate (ending in fsync), measured in the same run: every copy reads the
replica on one dataserver and writes and fsyncs it on another, on this same disk.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio

from tests.proc.test_cluster_harness import Cluster, DataClient, running_cluster
from wire.ids import ChunkId, InodeId

MIB = 1024 * 1024
CHUNK_BYTES = 64 * MIB
DEAD_AFTER_S = 3.0
POLL_S = 0.05
HEAL_TIMEOUT_S = 600.0


def disk_write_mib_s(directory: Path, size_bytes: int) -> float:
    """Sequential write of one file, ending in fsync."""
    path = directory / "baseline.bin"
    block = os.urandom(8 * MIB)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size_bytes // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    path.unlink()
    return size_bytes / MIB / elapsed


def copy_started(cluster: Cluster, lost: set[ChunkId], holders: dict[ChunkId, set[str]]) -> bool:
    """True once a dataserver holds (or is staging) a copy of a lost chunk it did not have."""
    wanted = {f"{chunk:016x}": chunk for chunk in lost}
    for node in cluster.dataservers:
        if not node.process.running:
            continue
        for name in os.listdir(node.data_dir / "chunks"):
            parts = name.split("_")
            chunk = wanted.get(parts[1]) if len(parts) >= 3 else None
            if chunk is not None and node.address not in holders[chunk]:
                return True
    return False


async def fill(
    client: DataClient, lost_bytes: int
) -> tuple[list[InodeId], dict[ChunkId, set[str]]]:
    """Write 64 MiB chunks until some dataserver holds ``lost_bytes``; the files written
    and where each chunk's replicas are."""
    payload = os.urandom(CHUNK_BYTES)
    per_server: dict[str, int] = {}
    holders: dict[ChunkId, set[str]] = {}
    inodes: list[InodeId] = []
    while max(per_server.values(), default=0) < lost_bytes:
        inode = await client.write_file(f"f{len(inodes)}".encode(), payload, goal=3)
        inodes.append(inode)
        for chunk in (await client.locate(inode)).chunks:
            holders[chunk.chunk] = set(chunk.replicas)
            for address in chunk.replicas:
                per_server[address] = per_server.get(address, 0) + chunk.length
    return inodes, holders


async def bench(lost_mib: int, rate_mib_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="paxfs-bench-heal-", dir="/tmp") as tmp:
        directory = Path(tmp)
        baseline = disk_write_mib_s(directory, min(lost_mib, 1024) * MIB)
        async with (
            running_cluster(
                directory,
                dataservers=4,
                replication=3,
                dead_after_s=DEAD_AFTER_S,
                chunk_size_bytes=CHUNK_BYTES,
                replication_rate_mib_s=rate_mib_s,
                show_logs=False,
            ) as cluster,
            cluster.client() as client,
        ):
            written_at = time.perf_counter()
            inodes, holders = await fill(client, lost_mib * MIB)
            write_s = time.perf_counter() - written_at
            counts: dict[str, int] = {}
            for addresses in holders.values():
                for address in addresses:
                    counts[address] = counts.get(address, 0) + 1
            victim_address = max(counts, key=lambda a: counts[a])
            lost = {chunk for chunk, addresses in holders.items() if victim_address in addresses}
            lost_bytes = len(lost) * CHUNK_BYTES
            victim = cluster.by_address(victim_address)
            await trio.sleep(1.0)  # let the last reports land before the loss

            victim.process.kill()
            killed_at = time.perf_counter()
            first_copy_at: float | None = None
            healed_at: float | None = None
            deadline = killed_at + HEAL_TIMEOUT_S
            while time.perf_counter() < deadline:
                if first_copy_at is None and copy_started(cluster, lost, holders):
                    first_copy_at = time.perf_counter()
                healthy = True
                for inode in inodes:
                    for chunk in (await client.locate(inode)).chunks:
                        replicas = set(chunk.replicas)
                        if len(replicas) < 3 or victim_address in replicas:
                            healthy = False
                            break
                    if not healthy:
                        break
                if healthy:
                    healed_at = time.perf_counter()
                    break
                await trio.sleep(POLL_S)
            if healed_at is None or first_copy_at is None:
                raise SystemExit(f"not healed within {HEAL_TIMEOUT_S:.0f} s")
            copy_s = healed_at - first_copy_at
            print(
                f"data written: {len(inodes) * CHUNK_BYTES / MIB:.0f} MiB x 3 replicas in "
                f"{write_s:.1f} s; lost dataserver held {lost_bytes / MIB:.0f} MiB "
                f"({len(lost)} chunks of {CHUNK_BYTES // MIB} MiB)"
            )
            cap = "uncapped" if rate_mib_s >= 10_000 else f"capped at {rate_mib_s:.0f} MiB/s"
            print(f"replication_rate_mib_s: {cap}; dead after {DEAD_AFTER_S:.0f} s of silence")
            print(f"kill -9 -> fully healthy:        {healed_at - killed_at:6.2f} s")
            print(f"kill -9 -> first copy appears:   {first_copy_at - killed_at:6.2f} s")
            print(
                f"copy phase: {copy_s:6.2f} s = {lost_bytes / MIB / copy_s:7.1f} MiB/s "
                f"({lost_bytes / MIB / copy_s / baseline:.2f}x this disk's sequential "
                f"write of {baseline:.0f} MiB/s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lost-mib", type=int, default=1024, help="data on the lost server")
    parser.add_argument(
        "--rate-mib-s", type=float, default=100_000.0, help="replication_rate_mib_s"
    )
    args = parser.parse_args()
    trio.run(bench, args.lost_mib, args.rate_mib_s)


if __name__ == "__main__":
    main()
