"""Real mounts of real clusters on loopback, one cluster per test module where tests do
not interfere.

A cluster is started with ``paxfs cluster up --dir D --mount D/mnt`` (small chunks, short
timeouts) and always stopped with ``paxfs cluster down --dir D``, also when a test fails.
Tests skip, with the reason, where ``/dev/fuse`` or ``fusermount3`` is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tools import local_cluster
from tools.local_cluster import (
    ClusterLayout,
    check_health,
    is_mounted,
    paxfs_command,
    write_config,
)
from wire.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNK_SIZE_BYTES = 256 * 1024
START_TIMEOUT_S = 60.0
TEST_SETTINGS = """
[metaserver]
election_timeout_ms = 500
heartbeat_interval_ms = 50
session_timeout_s = 20.0
dataserver_dead_after_s = 3.0

[dataserver]
heartbeat_interval_s = 0.2
scrub_rate_mib_s = 0.0

[client]
call_timeout_s = 2.0
no_quorum_timeout_s = 60.0

[mount]
attr_timeout_s = 1.0
entry_timeout_s = 1.0
write_buffer_bytes = 8388608
readahead_bytes = 1048576
"""


def _missing_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


@pytest.fixture(scope="session", autouse=True)
def _require_fuse() -> None:
    reason = _missing_fuse()
    if reason:
        pytest.skip(reason)


def paxfs(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``paxfs ARGS`` with this interpreter; fail with its output if ``check``."""
    result = subprocess.run(
        paxfs_command(*args),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"paxfs {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass
class LocalCluster:
    """A running cluster and its mount, as ``paxfs cluster up`` left them."""

    directory: Path
    mountpoint: Path

    @property
    def config_path(self) -> Path:
        return self.directory / local_cluster.CONFIG_NAME

    def layout(self) -> ClusterLayout:
        layout = ClusterLayout.load(self.directory)
        assert layout is not None, "no processes.json"
        return layout

    def logs(self) -> str:
        parts = []
        for path in sorted((self.directory / "logs").glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"---- {path.name} (tail)\n{text[-2500:]}")
        return "\n".join(parts)

    def down(self) -> None:
        result = paxfs("cluster", "down", "--dir", str(self.directory), check=False)
        if result.returncode != 0:
            print(result.stdout, result.stderr)


def start_cluster(
    directory: Path, *, dataservers: int = 3, metaservers: int = 3, mount: bool = True
) -> LocalCluster:
    """``paxfs cluster up`` under ``directory`` (mounted at ``directory/mnt``)."""
    directory.mkdir(parents=True, exist_ok=True)
    mountpoint = directory / "mnt"
    write_config(directory, metaservers, dataservers, 3, CHUNK_SIZE_BYTES, extra=TEST_SETTINGS)
    cluster = LocalCluster(directory, mountpoint)
    args = ["cluster", "up", "--dir", str(directory), "--timeout", str(START_TIMEOUT_S)]
    if mount:
        args += ["--mount", str(mountpoint)]
    try:
        paxfs(*args)
    except BaseException:
        print(cluster.logs())
        cluster.down()
        raise
    return cluster


@contextmanager
def cluster_directory() -> Iterator[Path]:
    """A directory other users can traverse (pytest's own tmp dirs are private to root,
    which would turn every check as another user into EACCES); removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="paxfs-fuse-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def running_cluster(**options: Any) -> Iterator[LocalCluster]:
    """A mounted cluster for the block; stopped and unmounted on the way out."""
    with cluster_directory() as directory:
        running = start_cluster(directory, **options)
        try:
            yield running
        finally:
            running.down()
            assert not is_mounted(str(running.mountpoint)), "still mounted after cluster down"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One mounted cluster shared by the tests of a module."""
    with running_cluster() as running:
        yield running


@pytest.fixture
def workdir(cluster: LocalCluster, request: pytest.FixtureRequest) -> Path:
    """A fresh directory in the mount for one test."""
    path = cluster.mountpoint / request.node.name.replace("[", "_").replace("]", "_")[:200]
    path.mkdir()
    return path


def healthy(cluster: LocalCluster) -> bool:
    health = check_health(load_config(str(cluster.config_path)))
    return health.leader_id is not None


def poll(condition: object, what: str, timeout_s: float = 20.0) -> None:
    """Poll ``condition()`` every 50 ms until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
