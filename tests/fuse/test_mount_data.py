"""File data through the mount: multi-chunk files against a local copy, sparse files,
two mounts of one cluster (close-to-open), a dataserver killed during a large write.

Chunks are 256 KiB here, so a megabyte spans four of them.  Randomised tests print their
seed; replay with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fuse.conftest import (
    CHUNK_SIZE_BYTES,
    LocalCluster,
    poll,
    running_cluster,
)
from tools.local_cluster import is_mounted, paxfs_command, spawn, stop_processes, unmount
from wire.config import KERNEL_READAHEAD_BYTES_DEFAULT


def seed_of(request: pytest.FixtureRequest) -> int:
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"{request.node.name}: seed {seed} (replay with PAXFS_SEED={seed})")
    return seed


def test_random_offset_reads_and_writes_match_a_local_copy(
    workdir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed_of(request))
    size_max = 3 * CHUNK_SIZE_BYTES + 99_999
    remote = os.open(workdir / "big", os.O_CREAT | os.O_RDWR, 0o644)
    local = os.open(tmp_path / "big", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        initial = rng.randbytes(size_max)
        os.write(remote, initial)
        os.write(local, initial)
        for step in range(150):
            offset = rng.randrange(size_max + 1000)
            if rng.random() < 0.5:
                data = rng.randbytes(rng.choice([1, 511, 4096, 65536, 300_000]))
                assert os.pwrite(remote, data, offset) == len(data)
                os.pwrite(local, data, offset)
            else:
                length = rng.randrange(1, 400_000)
                assert os.pread(remote, length, offset) == os.pread(local, length, offset), step
            if step % 40 == 0:
                os.fsync(remote)
    finally:
        os.close(remote)
        os.close(local)
    assert (workdir / "big").read_bytes() == (tmp_path / "big").read_bytes()
    assert (workdir / "big").stat().st_size == (tmp_path / "big").stat().st_size


def test_sparse_file(workdir: Path) -> None:
    path = workdir / "sparse"
    with open(path, "wb") as handle:
        handle.seek(5 * CHUNK_SIZE_BYTES + 123)
        handle.write(b"end")
    info = path.stat()
    assert info.st_size == 5 * CHUNK_SIZE_BYTES + 126
    assert info.st_blocks * 512 < CHUNK_SIZE_BYTES  # holes take no space
    with open(path, "rb") as handle:
        handle.seek(2 * CHUNK_SIZE_BYTES)
        assert handle.read(CHUNK_SIZE_BYTES) == bytes(CHUNK_SIZE_BYTES)
        handle.seek(5 * CHUNK_SIZE_BYTES + 120)
        assert handle.read() == b"\0\0\0end"
    os.truncate(path, 10 * CHUNK_SIZE_BYTES)
    with open(path, "rb") as handle:
        handle.seek(5 * CHUNK_SIZE_BYTES + 123)
        assert handle.read(10) == b"end" + bytes(7)


def test_large_sequential_file_round_trip(workdir: Path) -> None:
    block = os.urandom(1 << 20)
    with open(workdir / "seq", "wb") as handle:
        for _ in range(12):
            handle.write(block)
    with open(workdir / "seq", "rb") as handle:
        for index in range(12):
            assert handle.read(1 << 20) == block, index
        assert handle.read(1) == b""


def test_cold_sequential_reads_come_in_large_requests_and_match(
    cluster: LocalCluster, workdir: Path
) -> None:
    """The mount raises its kernel read-ahead as configured, so a cold sequential read
    reaches it in 1 MiB requests, each spanning several 256 KiB chunks; bytes still match."""
    device = os.stat(cluster.mountpoint).st_dev
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    assert int(setting.read_text()) == KERNEL_READAHEAD_BYTES_DEFAULT // 1024
    data = os.urandom(5 * (1 << 20) + 12345)
    path = workdir / "cold"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        read_back = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    assert read_back == data


@contextmanager
def second_mount(cluster: LocalCluster) -> Iterator[Path]:
    """Another mount of the same cluster (its own process and session)."""
    mountpoint = cluster.directory / "mnt2"
    mountpoint.mkdir(exist_ok=True)
    record = spawn(
        "mount",
        "mount-2",
        paxfs_command("mount", "-c", str(cluster.config_path), "--foreground", str(mountpoint)),
        cluster.directory / "logs" / "mount-2.log",
    )
    try:
        poll(lambda: is_mounted(str(mountpoint)) or not record.alive(), "the second mount")
        assert record.alive(), (cluster.directory / "logs" / "mount-2.log").read_text()
        yield mountpoint
    finally:
        unmount(str(mountpoint))
        stop_processes([record])


def test_two_mounts_see_what_the_other_closed(workdir: Path, cluster: LocalCluster) -> None:
    relative = workdir.relative_to(cluster.mountpoint)
    with second_mount(cluster) as other_root:
        other = other_root / relative
        (workdir / "note").write_bytes(b"version 1")
        assert (other / "note").read_bytes() == b"version 1"
        with open(workdir / "note", "r+b") as handle:
            handle.write(b"VERSION")
            handle.flush()
            # Not closed yet: the other mount may still see the old contents.
        assert (other / "note").read_bytes() == b"VERSION 1"
        with open(other / "note", "ab") as handle:
            handle.write(b" and 2")
        assert (workdir / "note").read_bytes() == b"VERSION 1 and 2"
        big = os.urandom(2 * CHUNK_SIZE_BYTES + 5)
        (other / "big").write_bytes(big)
        assert (workdir / "big").read_bytes() == big
        os.unlink(other / "big")
        poll(lambda: not (workdir / "big").exists(), "the unlink to show in the first mount", 5)


def test_dataserver_killed_during_a_large_write_the_write_completes(tmp_path: Path) -> None:
    with running_cluster(dataservers=4) as cluster:
        payload = os.urandom(16 * CHUNK_SIZE_BYTES + 4321)
        victim = next(r for r in cluster.layout().processes if r.role == "dataserver")
        with open(cluster.mountpoint / "big", "wb") as handle:
            step = 256 * 1024
            for offset in range(0, len(payload), step):
                handle.write(payload[offset : offset + step])
                if offset == 4 * CHUNK_SIZE_BYTES:
                    os.kill(victim.pid, signal.SIGKILL)
        assert (cluster.mountpoint / "big").read_bytes() == payload
