"""Chunk I/O benchmark: sequential write and read through the client library.

Run ``python -m benchmarks.bench_chunk_io [--size-mib N]``.  Starts 3 dataserver
processes on loopback (and the test harness's stand-in metaserver), writes a file of
``--size-mib`` (default 1024) with replication 1 and then 3 through
:class:`fuse_client.chunk_io.PlacedFile` (close = sync on every replica), drops the
replica files from the page cache, and reads the file back sequentially.  Beside it, the
local disk's own sequential write (ending in fsync) and read of the same size in the same
directory, measured in the same run; the figures are quoted as ratios to those.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import crc32c
import trio

from fuse_client.chunk_io import PlacedFile
from tests.proc.dataserver_harness import KEY, Cluster, FakeMetaserver
from wire.address import Address
from wire.transport import bound_port, serve

MIB = 1024 * 1024
CHUNK_BYTES = 64 * MIB
IO_BYTES = 64 * MIB
READ_BYTES = 8 * MIB
READAHEAD_BYTES = 32 * MIB


def drop_cache(path: Path) -> None:
    """Evict a file's pages so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_baseline(directory: Path, data: bytes) -> tuple[float, float]:
    """(write MiB/s including the final fsync, cold read MiB/s) of one plain file."""
    path = directory / "baseline.bin"
    view = memoryview(data)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), IO_BYTES):
            os.write(fd, view[start : start + IO_BYTES])
        os.fsync(fd)
    finally:
        os.close(fd)
    write_s = time.perf_counter() - started
    drop_cache(path)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    checksum = 0
    try:
        while chunk := os.read(fd, READ_BYTES):
            checksum = crc32c.crc32c(chunk, checksum)
    finally:
        os.close(fd)
    read_s = time.perf_counter() - started
    path.unlink()
    size_mib = len(data) / MIB
    return size_mib / write_s, size_mib / read_s


async def through_cluster(cluster: Cluster, replication: int, data: bytes) -> tuple[float, float]:
    """(write MiB/s to durable on every replica, cold sequential read MiB/s)."""
    cluster.meta.replication = replication
    file = PlacedFile(cluster.pool, CHUNK_BYTES, cluster.meta, readahead_bytes=READAHEAD_BYTES)
    view = memoryview(data)
    started = time.perf_counter()
    for start in range(0, len(data), IO_BYTES):
        await file.write(start, view[start : start + IO_BYTES])
    placements = await file.sync()
    write_s = time.perf_counter() - started
    assert all(len(p.replicas) == replication for p in placements.values())
    for server in cluster.dataservers:
        for path in (server.data_dir / "chunks").glob("chunk_*"):
            drop_cache(path)
    reader = PlacedFile(
        cluster.pool,
        CHUNK_BYTES,
        cluster.meta,
        placements,
        length_bytes=len(data),
        readahead_bytes=READAHEAD_BYTES,
    )
    checksum = 0
    started = time.perf_counter()
    for start in range(0, len(data), READ_BYTES):
        checksum = crc32c.crc32c(await reader.read(start, READ_BYTES), checksum)
    read_s = time.perf_counter() - started
    if checksum != crc32c.crc32c(data):
        raise SystemExit("read back different data")
    size_mib = len(data) / MIB
    return size_mib / write_s, size_mib / read_s


async def run_cluster_benchmark(directory: Path, data: bytes) -> dict[int, tuple[float, float]]:
    meta = FakeMetaserver()
    results: dict[int, tuple[float, float]] = {}
    from fuse_client.chunk_io import DataserverPool

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(serve, meta.handlers(), KEY, Address("127.0.0.1", 0))
        )
        async with DataserverPool.open(KEY, name="bench") as pool:
            cluster = Cluster(directory, meta, bound_port(listeners), pool)
            try:
                for position in range(3):
                    cluster.spawn(f"ds{position}", chunk_size_bytes=CHUNK_BYTES)
                for server in cluster.dataservers:
                    await cluster.started(server)
                for replication in (1, 3):
                    results[replication] = await through_cluster(cluster, replication, data)
            finally:
                cluster.stop_all()
        nursery.cancel_scope.cancel()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument("--dir", default=None, help="where to put data (default: a temp dir)")
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="paxfs-bench-") as temp:
        directory = Path(temp)
        disk_write, disk_read = disk_baseline(directory, data)
        results = trio.run(run_cluster_benchmark, directory, data)
    print(
        f"sequential I/O of a {args.size_mib} MiB file, 3 dataservers on loopback, "
        f"{CHUNK_BYTES // MIB} MiB chunks, {os.cpu_count()} cores"
    )
    print(
        f"local disk (same dir)   write+fsync {disk_write:8,.0f} MiB/s"
        f"   read {disk_read:8,.0f} MiB/s"
    )
    for replication, (write, read) in results.items():
        print(
            f"replication {replication}           write+sync  {write:8,.0f} MiB/s"
            f" ({write / disk_write:4.2f} x disk)   read {read:8,.0f} MiB/s"
            f" ({read / disk_read:4.2f} x disk)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
