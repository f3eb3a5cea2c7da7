"""File-system benchmark: the same workloads on a paxfs mount and on a local directory.

``python -m tools.bench_fs MOUNT_DIR [LOCAL_DIR]`` (or ``--target MOUNT_DIR
[--baseline LOCAL_DIR]``) runs, in one process and in this order on each directory: a
sequential write of ``--size-mib`` (1 MiB blocks, fsync at the end), a sequential read of
it, 4 KiB random reads for ``--random-seconds``, and metadata loops (create+close
``--files`` empty files, stat them, list them, unlink them; mkdir ``--dirs``; write then
read ``--small-files`` files of 16 KiB).  ``--metadata-only`` skips the data workloads.
It prints one table with both results and their ratio, and the targets of issue 7 for a
mount with replication 3.

The I/O loops are plain Python (``os.pwrite``/``os.pread`` on one descriptor), the
equivalent of ``fio --rw=write|read|randread --bs=1M|4k --ioengine=psync
--end_fsync=1 --invalidate=1``: before each read phase the file's cached pages are
dropped with ``posix_fadvise(DONTNEED)`` on both sides, so reads reach the file system.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BLOCK_BYTES = 1 << 20
RANDOM_READ_BYTES = 4096
SMALL_FILE_BYTES = 16 * 1024


@dataclass(frozen=True)
class Measure:
    """One workload's result: ``value`` in ``unit`` (higher is better)."""

    name: str
    value: float
    unit: str


@dataclass(frozen=True)
class Target:
    name: str
    ratio_min: float | None = None
    absolute_min: float | None = None


TARGETS = (
    Target("sequential write", ratio_min=0.35),
    Target("sequential read", ratio_min=0.50),
    Target("create+close", absolute_min=1500.0),
    Target("stat", absolute_min=8000.0),
)


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _rate(count: float, started: float) -> float:
    return count / max(time.perf_counter() - started, 1e-9)


def sequential_write(root: Path, size_mib: int) -> Measure:
    block = os.urandom(BLOCK_BYTES)
    fd = os.open(root / "seq", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    started = time.perf_counter()
    try:
        for index in range(size_mib):
            os.pwrite(fd, block, index * BLOCK_BYTES)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Measure("sequential write", _rate(size_mib, started), "MiB/s")


def sequential_read(root: Path, size_mib: int) -> Measure:
    path = root / "seq"
    _drop_cache(path)
    fd = os.open(path, os.O_RDONLY)
    started = time.perf_counter()
    total = 0
    try:
        while True:
            data = os.read(fd, BLOCK_BYTES)
            if not data:
                break
            total += len(data)
    finally:
        os.close(fd)
    if total != size_mib * BLOCK_BYTES:
        raise RuntimeError(f"read {total} bytes back of {size_mib} MiB")
    return Measure("sequential read", _rate(total / BLOCK_BYTES, started), "MiB/s")


def random_reads(root: Path, size_mib: int, seconds: float, seed: int) -> Measure:
    path = root / "seq"
    _drop_cache(path)
    rng = random.Random(seed)
    blocks = size_mib * BLOCK_BYTES // RANDOM_READ_BYTES
    fd = os.open(path, os.O_RDONLY)
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline:
            for _ in range(64):
                os.pread(fd, RANDOM_READ_BYTES, rng.randrange(blocks) * RANDOM_READ_BYTES)
            count += 64
    finally:
        os.close(fd)
    os.unlink(path)
    return Measure("4 KiB random read", _rate(count, started), "IOPS")


def metadata(root: Path, files: int, dirs: int, small_files: int) -> list[Measure]:
    base = root / "meta"
    base.mkdir()
    names = [base / f"f{index:06d}" for index in range(files)]
    results = []
    started = time.perf_counter()
    for name in names:
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
    results.append(Measure("create+close", _rate(files, started), "files/s"))
    started = time.perf_counter()
    for name in names:
        os.stat(name)
    results.append(Measure("stat", _rate(files, started), "stats/s"))
    started = time.perf_counter()
    listed = len(os.listdir(base))
    results.append(Measure("list", _rate(listed, started), "entries/s"))
    if listed != files:
        raise RuntimeError(f"listed {listed} entries of {files}")
    started = time.perf_counter()
    for name in names:
        os.unlink(name)
    results.append(Measure("unlink", _rate(files, started), "files/s"))
    started = time.perf_counter()
    for index in range(dirs):
        os.mkdir(base / f"d{index:05d}")
    results.append(Measure("mkdir", _rate(dirs, started), "dirs/s"))
    payload = os.urandom(SMALL_FILE_BYTES)
    small = [base / f"s{index:05d}" for index in range(small_files)]
    started = time.perf_counter()
    for name in small:
        fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, payload)
        os.close(fd)
    results.append(Measure("write 16 KiB file", _rate(small_files, started), "files/s"))
    for name in small:
        _drop_cache(name)
    started = time.perf_counter()
    for name in small:
        fd = os.open(name, os.O_RDONLY)
        data = os.read(fd, SMALL_FILE_BYTES + 1)
        os.close(fd)
        if len(data) != SMALL_FILE_BYTES:
            raise RuntimeError(f"{name}: read {len(data)} bytes of {SMALL_FILE_BYTES}")
    results.append(Measure("read 16 KiB file", _rate(small_files, started), "files/s"))
    shutil.rmtree(base)
    return results


def run_all(root: Path, args: argparse.Namespace, log: Callable[[str], None]) -> list[Measure]:
    work = Path(tempfile.mkdtemp(prefix="bench-fs-", dir=root))
    try:
        results = []
        data_steps: tuple[Callable[[], Measure], ...] = (
            lambda: sequential_write(work, args.size_mib),
            lambda: sequential_read(work, args.size_mib),
            lambda: random_reads(work, args.size_mib, args.random_seconds, args.seed),
        )
        for step in () if args.metadata_only else data_steps:
            results.append(step())
            log(f"  {results[-1].name}: {results[-1].value:,.1f} {results[-1].unit}")
        for measure in metadata(work, args.files, args.dirs, args.small_files):
            results.append(measure)
            log(f"  {measure.name}: {measure.value:,.1f} {measure.unit}")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verdict(target: Target | None, value: float, ratio: float | None) -> str:
    if target is None:
        return ""
    if target.ratio_min is not None and ratio is not None:
        ok = ratio >= target.ratio_min
        return f"{'ok' if ok else 'MISSED'} (>= {target.ratio_min:.0%} of local)"
    if target.absolute_min is not None:
        ok = value >= target.absolute_min
        return f"{'ok' if ok else 'MISSED'} (>= {target.absolute_min:,.0f})"
    return ""


def print_table(target: list[Measure], baseline: list[Measure], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"paxfs mount {args.target} vs local {args.baseline_path}",
        header_style="bold",
    )
    for column in ("workload", "unit", "paxfs", "local", "ratio", "target"):
        table.add_column(column, justify="left" if column in ("workload", "target") else "right")
    targets = {t.name: t for t in TARGETS}
    for mine, theirs in zip(target, baseline, strict=True):
        ratio = mine.value / theirs.value if theirs.value else None
        table.add_row(
            mine.name,
            mine.unit,
            f"{mine.value:,.1f}",
            f"{theirs.value:,.1f}",
            f"{ratio:.2f}" if ratio is not None else "-",
            verdict(targets.get(mine.name), mine.value, ratio),
        )
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_fs", description=__doc__)
    parser.add_argument("target_dir", nargs="?", metavar="MOUNT_DIR", help="= --target")
    parser.add_argument("baseline_dir", nargs="?", metavar="LOCAL_DIR", help="= --baseline")
    parser.add_argument("--target", default="", help="a directory in the paxfs mount")
    parser.add_argument(
        "--baseline", default="", help="a local directory (default: a temporary one in /var/tmp)"
    )
    parser.add_argument(
        "--metadata-only", action="store_true", help="skip the sequential and random I/O"
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="sequential file size")
    parser.add_argument("--random-seconds", type=float, default=30.0)
    parser.add_argument("--files", type=int, default=5000, help="empty files to create")
    parser.add_argument("--dirs", type=int, default=1000)
    parser.add_argument("--small-files", type=int, default=2000, help="16 KiB files")
    parser.add_argument("--seed", type=int, default=7, help="random-read offsets")
    args = parser.parse_args(argv)
    args.target = args.target or args.target_dir
    args.baseline = args.baseline or args.baseline_dir or ""
    if not args.target:
        parser.error("the paxfs directory (MOUNT_DIR or --target) is required")
    baseline_root = Path(
        args.baseline or tempfile.mkdtemp(prefix="bench-fs-local-", dir="/var/tmp")
    )
    args.baseline_path = baseline_root

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        log(f"paxfs: {args.target}")
        mine = run_all(Path(args.target), args, log)
        log(f"local: {baseline_root}")
        theirs = run_all(baseline_root, args, log)
    finally:
        if not args.baseline:
            shutil.rmtree(baseline_root, ignore_errors=True)
    print_table(mine, theirs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
