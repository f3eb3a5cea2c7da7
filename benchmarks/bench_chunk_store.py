"""Chunk store benchmark: sequential write and read through the store beside raw file I/O.

Run ``python -m benchmarks.bench_chunk_store [--dir D] [--total-mib 256]``.

Writes ``--total-mib`` of data as chunks of ``--chunk-mib`` in pieces of ``--piece-mib``
(fsync at the end of each chunk), then reads it back in pieces of the same size, through
the store (uncompressed, compressed with compressible data, compressed with incompressible
data) and as raw ``os.write``/``os.read`` of the same amounts into plain files on the same
disk, measured in the same run. Reads are cold by default (the page cache of the files is
dropped with ``posix_fadvise(DONTNEED)`` before reading); ``--warm`` keeps it. Each case
runs ``--rounds`` times; within a round the cases are interleaved chunk by chunk, since
this disk is shared and its speed swings. Medians are printed with the ratio to raw.
Target: uncompressed store >= 70% of raw.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from dataserver.chunk_store import ChunkStore, replica_file_name
from wire.ids import ChunkId, ChunkVersion

MIB = 1024 * 1024
VERSION = ChunkVersion(1)


@dataclass(frozen=True)
class Config:
    directory: str
    total_bytes: int
    chunk_bytes: int
    piece_bytes: int
    rounds: int
    cold: bool

    @property
    def chunk_count(self) -> int:
        return self.total_bytes // self.chunk_bytes


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(action: Callable[[int], None], chunk: int) -> float:
    start = time.perf_counter()
    action(chunk)
    return time.perf_counter() - start


class _RawCase:
    """Baseline: ``os.write`` pieces into one plain file per chunk, ``fsync``, ``os.read``."""

    name = "raw os.write/os.read"

    def __init__(self, config: Config, piece: bytes) -> None:
        self._config = config
        self._piece = piece
        self._directory = os.path.join(config.directory, "raw")
        os.makedirs(self._directory)

    def path(self, chunk: int) -> str:
        return os.path.join(self._directory, f"chunk-{chunk}")

    def write_chunk(self, chunk: int) -> None:
        fd = os.open(self.path(chunk), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(self._config.chunk_bytes // self._config.piece_bytes):
                os.write(fd, self._piece)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_chunk(self, chunk: int) -> None:
        fd = os.open(self.path(chunk), os.O_RDONLY)
        try:
            while os.read(fd, self._config.piece_bytes):
                pass
        finally:
            os.close(fd)

    def disk_bytes(self) -> int:
        return sum(
            os.stat(self.path(chunk)).st_blocks * 512 for chunk in range(self._config.chunk_count)
        )

    def clear(self) -> None:
        for chunk in range(self._config.chunk_count):
            os.unlink(self.path(chunk))

    def close(self) -> None:
        return None


class _StoreCase:
    """The chunk store: ``write`` pieces, ``sync`` per chunk, ``read`` pieces."""

    def __init__(self, config: Config, piece: bytes, name: str, *, compressed: bool) -> None:
        self.name = name
        self._config = config
        self._piece = piece
        self._compressed = compressed
        self._directory = os.path.join(config.directory, name.replace(" ", "").replace(",", "-"))
        self._store = ChunkStore(self._directory, chunk_size_bytes=config.chunk_bytes)

    def path(self, chunk: int) -> str:
        return os.path.join(self._directory, replica_file_name(ChunkId(chunk + 1), VERSION))

    def write_chunk(self, chunk: int) -> None:
        chunk_id = ChunkId(chunk + 1)
        self._store.create(chunk_id, VERSION, compressed=self._compressed)
        for offset in range(0, self._config.chunk_bytes, self._config.piece_bytes):
            self._store.write(chunk_id, VERSION, offset, self._piece)
        self._store.sync(chunk_id, VERSION)

    def read_chunk(self, chunk: int) -> None:
        chunk_id = ChunkId(chunk + 1)
        for offset in range(0, self._config.chunk_bytes, self._config.piece_bytes):
            data = self._store.read(chunk_id, VERSION, offset, self._config.piece_bytes)
            if len(data) != self._config.piece_bytes:
                raise AssertionError(f"short read at {offset}")

    def disk_bytes(self) -> int:
        return self._store.usage().used_bytes

    def clear(self) -> None:
        for chunk in range(self._config.chunk_count):
            self._store.delete(ChunkId(chunk + 1), VERSION)

    def close(self) -> None:
        self._store.close()


def _compressible(size: int, rng: random.Random) -> bytes:
    """Text-like bytes (log lines from a small vocabulary), compressing roughly 3-5x."""
    words = [
        b"chunk",
        b"replica",
        b"version",
        b"write",
        b"pipeline",
        b"OK",
        b"ERROR",
        b"dataserver",
        b"2024-05-01T12:00:00Z",
    ]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(8)) + b" %d\n" % rng.randrange(10**6)
    return bytes(out[:size])


def _mib_s(config: Config, seconds: float) -> float:
    return config.total_bytes / MIB / seconds


def run(config: Config) -> None:
    """Interleave the cases chunk by chunk (rotating who goes first) so that every case
    meets the same disk weather: other processes share this disk and its speed swings."""
    rng = random.Random(1)
    random_piece = rng.randbytes(config.piece_bytes)
    text_piece = _compressible(config.piece_bytes, rng)
    cases: list[_RawCase | _StoreCase] = [
        _RawCase(config, random_piece),
        _StoreCase(config, random_piece, "store, uncompressed", compressed=False),
        _StoreCase(config, text_piece, "store, zstd, text data", compressed=True),
        _StoreCase(config, random_piece, "store, zstd, random data", compressed=True),
    ]
    write_s: dict[str, list[float]] = {case.name: [] for case in cases}
    read_s: dict[str, list[float]] = {case.name: [] for case in cases}
    disk = {case.name: 0 for case in cases}
    try:
        for _ in range(config.rounds):
            for phase, times in (("write", write_s), ("read", read_s)):
                totals = dict.fromkeys(times, 0.0)
                if phase == "read" and config.cold:
                    for case in cases:
                        for chunk in range(config.chunk_count):
                            _drop_cache(case.path(chunk))
                for chunk in range(config.chunk_count):
                    for position in range(len(cases)):
                        case = cases[(position + chunk) % len(cases)]
                        action = case.write_chunk if phase == "write" else case.read_chunk
                        totals[case.name] += _timed(action, chunk)
                for name, total in totals.items():
                    times[name].append(total)
            for case in cases:
                disk[case.name] = case.disk_bytes()
                case.clear()
            os.sync()
    finally:
        for case in cases:
            case.close()
    raw = cases[0].name
    raw_w = _mib_s(config, statistics.median(write_s[raw]))
    raw_r = _mib_s(config, statistics.median(read_s[raw]))
    reads = "cold" if config.cold else "warm"
    print(
        f"{config.total_bytes // MIB} MiB as {config.chunk_count} chunks of"
        f" {config.chunk_bytes // MIB} MiB, {config.piece_bytes // MIB} MiB pieces,"
        f" fsync per chunk, {reads} reads, median of {config.rounds} rounds"
    )
    print(f"{'case':<28}{'write MiB/s':>12}{'vs raw':>8}{'read MiB/s':>12}{'vs raw':>8}{'disk':>8}")
    for case in cases:
        store_w = _mib_s(config, statistics.median(write_s[case.name]))
        store_r = _mib_s(config, statistics.median(read_s[case.name]))
        print(
            f"{case.name:<28}{store_w:>12.0f}{store_w / raw_w:>8.0%}"
            f"{store_r:>12.0f}{store_r / raw_r:>8.0%}{disk[case.name] / config.total_bytes:>8.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--total-mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=64)
    parser.add_argument("--piece-mib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="read from the page cache")
    args = parser.parse_args()
    parent = tempfile.mkdtemp(prefix="bench-chunk-store-", dir=args.dir)
    try:
        run(
            Config(
                directory=parent,
                total_bytes=args.total_mib * MIB,
                chunk_bytes=args.chunk_mib * MIB,
                piece_bytes=args.piece_mib * MIB,
                rounds=args.rounds,
                cold=not args.warm,
            )
        )
    finally:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
