"""Chunk I/O benchmark: sequential write and read through the client library.

Run ``python -m benchmarks.bench_chunk_io [--size-mib N]``.  Starts 3 dataserver
processes on loopback (and the test harness's stand-in metaserver), writes a file of
``--size-mib`` (default 1024) with replication 1 and then 3 (or ``--replication N``) through
:class:`fuse_client.chunk_io.PlacedFile` (close = sync on every replica), drops the
replica files from the page cache, and reads the file back sequentially with read tokens,
as a client that located the file does, in turns: from the replicas' files (local reads,
:mod:`fuse_client.local_replicas`, the default for replicas on the client's host), then
through the dataservers (local reads off, the path of a client on another host).
Beside it, the local disk's own sequential write (ending in fsync) and cold read of the
same size in the same directory, measured in the same run; the figures are quoted as
ratios to those.  On a shared machine one cold read of the disk can swing by a factor of
two between minutes, so the plain file is read cold again right before and right after
each cluster read, and that read is quoted against the mean of its two neighbours.

Since the machine is shared and wall-clock figures swing, each phase also reports CPU time
per MiB: of the client process (``time.process_time``) and of every dataserver process
(user + system time from ``/proc/PID/stat``), which judges a change far more steadily.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import crc32c
import trio

from fuse_client.chunk_io import READ_PIECE_BYTES, ChunkPlacement, DataserverPool, PlacedFile
from tests.proc.dataserver_harness import KEY, Cluster, FakeMetaserver
from wire.address import Address
from wire.tokens import AccessMode
from wire.transport import bound_port, serve

MIB = 1024 * 1024
CHUNK_BYTES = 64 * MIB
IO_BYTES = 64 * MIB
READ_BYTES = READ_PIECE_BYTES
"""Bytes per read call, for the disk as for the cluster: one of the client's read pieces,
which the library hands out as a view of what it received (a read across pieces is
joined into a copy)."""
READAHEAD_BYTES = 32 * MIB
READ_ROUNDS = 3
"""Cold reads of the file per replication and read path.  On these virtual machines,
page-cache memory freed a while ago costs about 8x the copy to touch again (the host has
taken it back), memory freed a moment ago does not.  So each read, of the plain file as of
the cluster, starts right after the page cache of both was dropped, and the first reads
after the write, which find less such memory, are not the ones to quote."""


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process (of this machine) has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime field 14 and stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Phase:
    """One measured phase: throughput and CPU milliseconds per MiB in each process."""

    mib_s: float
    client_cpu_ms_per_mib: float
    server_cpu_ms_per_mib: tuple[float, ...]


@dataclass(frozen=True)
class ReadPhase:
    """A cluster read and the disk's cold reads of the plain file just before and after."""

    phase: Phase
    disk_mib_s: tuple[float, float]

    @property
    def disk_ratio(self) -> float:
        return self.phase.mib_s / (sum(self.disk_mib_s) / len(self.disk_mib_s))


class CpuMeter:
    """CPU time of the client and of each dataserver across one phase."""

    def __init__(self, cluster: Cluster) -> None:
        self._pids = [server.process.pid for server in cluster.dataservers]
        self._client = time.process_time()
        self._servers = [process_cpu_s(pid) for pid in self._pids]
        self._started = time.perf_counter()

    def phase(self, size_bytes: int) -> Phase:
        elapsed_s = time.perf_counter() - self._started
        size_mib = size_bytes / MIB
        client_s = time.process_time() - self._client
        servers_s = [
            process_cpu_s(pid) - was for pid, was in zip(self._pids, self._servers, strict=True)
        ]
        return Phase(
            size_mib / elapsed_s,
            1000 * client_s / size_mib,
            tuple(1000 * spent / size_mib for spent in servers_s),
        )


def drop_cache(path: Path) -> None:
    """Evict a file's pages so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_write_mib_s(path: Path, data: bytes) -> float:
    """Write ``data`` to a plain file at ``path``: MiB/s including the final fsync."""
    view = memoryview(data)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), IO_BYTES):
            os.write(fd, view[start : start + IO_BYTES])
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data) / MIB / (time.perf_counter() - started)


def disk_cold_read_mib_s(path: Path) -> float:
    """Read a plain file from the disk (its pages dropped first), checksumming it as the
    cluster read is checksummed: MiB/s."""
    drop_cache(path)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    checksum = 0
    size = 0
    try:
        while chunk := os.read(fd, READ_BYTES):
            checksum = crc32c.crc32c(chunk, checksum)
            size += len(chunk)
    finally:
        os.close(fd)
    return size / MIB / (time.perf_counter() - started)


async def through_cluster(
    cluster: Cluster,
    remote_pool: DataserverPool,
    replication: int,
    data: bytes,
    baseline: Path,
) -> tuple[Phase, list[ReadPhase]]:
    """(write to durable on every replica, cold sequential reads beside the disk's: in
    ``READ_ROUNDS`` rounds, a local read and then one through ``remote_pool``)."""
    cluster.meta.replication = replication
    file = PlacedFile(cluster.pool, CHUNK_BYTES, cluster.meta, readahead_bytes=READAHEAD_BYTES)
    view = memoryview(data)
    meter = CpuMeter(cluster)
    for start in range(0, len(data), IO_BYTES):
        await file.write(start, view[start : start + IO_BYTES])
    placements = await file.sync()
    write = meter.phase(len(data))
    assert all(len(p.replicas) == replication for p in placements.values())
    located = {
        index: replace(p, token=cluster.meta.token(p.chunk_id, p.version, AccessMode.READ))
        for index, p in placements.items()
    }
    reads = []
    for _ in range(READ_ROUNDS):
        for pool in (cluster.pool, remote_pool):
            reads.append(await cold_read(cluster, pool, located, data, baseline))
    return write, reads


def drop_all(cluster: Cluster, baseline: Path) -> None:
    """Evict the replicas and the plain file, so the next read, whichever it is, starts
    from the disk with the same memory just freed (see ``READ_ROUNDS``)."""
    for server in cluster.dataservers:
        for path in (server.data_dir / "chunks").glob("chunk_*"):
            drop_cache(path)
    drop_cache(baseline)


async def cold_read(
    cluster: Cluster,
    pool: DataserverPool,
    placements: dict[int, ChunkPlacement],
    data: bytes,
    baseline: Path,
) -> ReadPhase:
    """Read the file back sequentially from the disk, between two cold reads of the plain
    file; each of the three reads starts right after everything was dropped."""
    reader = PlacedFile(
        pool,
        CHUNK_BYTES,
        cluster.meta,
        placements,
        length_bytes=len(data),
        readahead_bytes=READAHEAD_BYTES,
    )
    drop_all(cluster, baseline)
    disk_before = disk_cold_read_mib_s(baseline)
    drop_all(cluster, baseline)
    checksum = 0
    meter = CpuMeter(cluster)
    for start in range(0, len(data), READ_BYTES):
        checksum = crc32c.crc32c(await reader.read(start, READ_BYTES), checksum)
    read = meter.phase(len(data))
    drop_all(cluster, baseline)
    disk_after = disk_cold_read_mib_s(baseline)
    if checksum != crc32c.crc32c(data):
        raise SystemExit("read back different data")
    return ReadPhase(read, (disk_before, disk_after))


async def run_cluster_benchmark(
    directory: Path, data: bytes, replications: list[int], baseline: Path
) -> dict[int, tuple[Phase, list[ReadPhase]]]:
    meta = FakeMetaserver()
    results: dict[int, tuple[Phase, list[ReadPhase]]] = {}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(serve, meta.handlers(), KEY, Address("127.0.0.1", 0))
        )
        async with (
            DataserverPool.open(KEY, name="bench") as pool,
            DataserverPool.open(KEY, name="bench-remote", local_reads=False) as remote_pool,
        ):
            cluster = Cluster(directory, meta, bound_port(listeners), pool)
            try:
                for position in range(3):
                    cluster.spawn(f"ds{position}", chunk_size_bytes=CHUNK_BYTES)
                for server in cluster.dataservers:
                    await cluster.started(server)
                for replication in replications:
                    results[replication] = await through_cluster(
                        cluster, remote_pool, replication, data, baseline
                    )
            finally:
                cluster.stop_all()
        nursery.cancel_scope.cancel()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument("--dir", default=None, help="where to put data (default: a temp dir)")
    parser.add_argument(
        "--replication",
        type=int,
        action="append",
        choices=(1, 2, 3),
        help="replication to measure (repeatable; default 1 and 3)",
    )
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="paxfs-bench-") as temp:
        directory = Path(temp)
        baseline = directory / "baseline.bin"
        disk_write = disk_write_mib_s(baseline, data)
        disk_read = disk_cold_read_mib_s(baseline)
        results = trio.run(
            run_cluster_benchmark, directory, data, args.replication or [1, 3], baseline
        )
    print(
        f"sequential I/O of a {args.size_mib} MiB file, 3 dataservers on loopback, "
        f"{CHUNK_BYTES // MIB} MiB chunks, {os.cpu_count()} cores"
    )
    print(
        f"local disk (same dir)   write+fsync {disk_write:8,.0f} MiB/s"
        f"   read {disk_read:8,.0f} MiB/s (cold, at the start)"
    )
    for replication, (write, reads) in results.items():
        print(
            f"replication {replication} write+sync     {write.mib_s:8,.0f} MiB/s"
            f" ({write.mib_s / disk_write:4.2f} x disk)"
        )
        for round_number, read in enumerate(reads, 1):
            before, after = read.disk_mib_s
            print(
                f"replication {replication} {_read_name(round_number)}"
                f" {read.phase.mib_s:8,.0f} MiB/s"
                f" ({read.disk_ratio:4.2f} x disk; disk before/after {before:,.0f}/{after:,.0f})"
            )
        disk = statistics.median(mib_s for read in reads for mib_s in read.disk_mib_s)
        local = statistics.median(read.phase.mib_s for read in reads[0::2])
        remote = statistics.median(read.phase.mib_s for read in reads[1::2])
        print(
            f"replication {replication} medians       local {local:,.0f} ({local / disk:4.2f} x),"
            f" remote {remote:,.0f} ({remote / disk:4.2f} x), disk {disk:,.0f} MiB/s"
        )
    print("CPU ms per MiB          client   dataservers (each)")
    for replication, (write, reads) in results.items():
        phases = [("write", write)] + [
            (_read_name(n), read.phase) for n, read in enumerate(reads, 1)
        ]
        for name, phase in phases:
            servers = " ".join(f"{spent:5.2f}" for spent in phase.server_cpu_ms_per_mib)
            print(
                f"replication {replication} {name:<14} {phase.client_cpu_ms_per_mib:5.2f}"
                f"   {sum(phase.server_cpu_ms_per_mib):5.2f} ({servers})"
            )
    return 0


def _read_name(number: int) -> str:
    """``local read 1``, ``remote read 1``, ``local read 2``...: the reads in order."""
    path = "local" if number % 2 else "remote"
    return f"{path} read {(number + 1) // 2}"


if __name__ == "__main__":
    sys.exit(main())
