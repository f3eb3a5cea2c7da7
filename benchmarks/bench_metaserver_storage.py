"""Metaserver storage benchmark: group-committed appends and snapshot saves.

Run ``python -m benchmarks.bench_metaserver_storage [--dir DIR] [--seconds S]``.

Prints, for 1, 16 and 64 concurrent appenders of single small records (the size of a Paxos
accept record), records/s and data syncs/s, records per sync and the append latency p50/p99;
then the time to save a snapshot. The baseline, measured first in the same run on the same
disk: the latency of a raw small append + ``fdatasync`` (what the log does per batch) and of
``fsync``, p50/p99. On this shared virtual disk the absolute numbers move a lot from run to
run (PITFALLS.md); compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable

import trio

from metaserver.storage import StorageOptions, open_storage

RECORD_BYTES = 160
RAW_SYNCS = 1000
CONCURRENCIES = (1, 16, 64)
SNAPSHOT_BYTES = 64 * 1024 * 1024
CLUSTER = "bench"


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def raw_sync_latency_us(directory: str, sync: Callable[[int], None]) -> tuple[float, float]:
    """p50/p99 of one small append followed by ``sync``, in microseconds."""
    path = os.path.join(directory, "raw-sync")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    record = os.urandom(RECORD_BYTES)
    samples: list[float] = []
    try:
        for _ in range(RAW_SYNCS):
            started = time.perf_counter()
            os.write(fd, record)
            sync(fd)
            samples.append((time.perf_counter() - started) * 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
    return _percentile(samples, 0.5), _percentile(samples, 0.99)


async def appenders(directory: str, concurrency: int, seconds: float) -> None:
    latencies_us: list[float] = []
    record = os.urandom(RECORD_BYTES)
    async with open_storage(directory, CLUSTER) as storage:
        deadline = time.perf_counter() + seconds

        async def appender() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await storage.append([record])
                latencies_us.append((time.perf_counter() - started) * 1e6)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(appender)
        elapsed = time.perf_counter() - started
        stats = storage.stats()
    print(
        f"{concurrency:3} appenders: {len(latencies_us) / elapsed:9,.0f} records/s"
        f"  {stats.data_syncs / elapsed:7,.0f} syncs/s"
        f"  {stats.records_written / max(stats.data_syncs, 1):5.1f} records/sync"
        f"  latency p50 {_percentile(latencies_us, 0.5):6,.0f} µs"
        f"  p99 {_percentile(latencies_us, 0.99):6,.0f} µs"
    )


async def snapshot_save(directory: str) -> None:
    rng = random.Random(0)
    words = [rng.randbytes(rng.randrange(4, 24)) for _ in range(5000)]
    parts: list[bytes] = []
    size = 0
    while size < SNAPSHOT_BYTES:
        word = words[rng.randrange(len(words))]
        parts.append(word)
        size += len(word)
    data = b"".join(parts)
    async with open_storage(directory, CLUSTER, StorageOptions()) as storage:
        started = time.perf_counter()
        await storage.save_snapshot(1, data)
        elapsed = time.perf_counter() - started
    snapshot_bytes = sum(
        os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if "snap" in n
    )
    print(
        f"snapshot of {len(data) / 2**20:.0f} MiB saved in {elapsed:.2f} s"
        f" ({len(data) / 2**20 / elapsed:,.0f} MiB/s, {snapshot_bytes / 2**20:.1f} MiB on disk)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="parent directory on the disk to measure")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each phase")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="paxfs-bench-storage-", dir=args.dir)
    try:
        for name, sync in (("fdatasync", os.fdatasync), ("fsync", os.fsync)):
            p50, p99 = raw_sync_latency_us(root, sync)
            print(
                f"raw {RECORD_BYTES}-byte append + {name:9}: p50 {p50:6,.0f} µs  p99 {p99:6,.0f} µs"
                f"  (one syncer: at most {1e6 / p50:7,.0f} syncs/s)  (baseline)"
            )
        for concurrency in CONCURRENCIES:
            directory = os.path.join(root, f"log-{concurrency}")
            trio.run(appenders, directory, concurrency, args.seconds)
        trio.run(snapshot_save, os.path.join(root, "snapshot"))
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
