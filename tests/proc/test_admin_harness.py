"""Helpers for the ``paxfs admin`` process tests (no tests in here).

The cluster is :func:`tests.proc.test_cluster_harness.running_cluster` (3 metaservers,
real dataservers); the admin tool runs as its own process, ``python -m tools.cli admin
ACTION -c CONFIG``, exactly as an operator runs it, and its ``--json`` output is parsed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from fuse_client.chunk_io import DataserverPool
from fuse_client.meta_client import open_meta_client
from tests.proc.metaserver_harness import REPO_ROOT, ManagedProcess, free_ports, paxfs_argv
from tests.proc.test_cluster_harness import Cluster, DataClient, DataserverNode, wait_for
from tools.admin_client import AdminClient
from wire.data_ops import LocatedChunk
from wire.ids import ChunkId, InodeId
from wire.namespace_ops import Create, Mkdir, Release

ADMIN_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class AdminResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def admin(cluster: Cluster, *args: str, timeout_s: float = ADMIN_TIMEOUT_S) -> AdminResult:
    """Run ``paxfs admin ARGS`` against ``cluster`` and wait for it."""
    argv = [sys.executable, "-m", "tools.cli", "admin", *args, "-c", str(cluster.group.config_path)]
    with trio.fail_after(timeout_s):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO_ROOT
        )
    result = AdminResult(done.returncode, done.stdout.decode(), done.stderr.decode())
    print(f"$ paxfs admin {' '.join(args)} -> {result.returncode}\n{result.stderr[-2000:]}")
    return result


async def admin_json(cluster: Cluster, *args: str, expect: int = 0) -> Any:
    """``paxfs admin ARGS --json``, asserting its exit status; the parsed document."""
    result = await admin(cluster, *args, "--json")
    assert result.returncode == expect, (result.stdout[-3000:], result.stderr)
    return result.json()


def _sigint_as_in_a_shell() -> None:
    """In the child, before exec: SIGINT back to its default, as an interactive shell gives
    a command.  An ignored signal stays ignored across exec, and a test runner started as
    a background job of a non-interactive shell (``sh -c 'make test &'``) ignores SIGINT;
    Python then installs no KeyboardInterrupt handler, and :func:`interrupt` would do
    nothing (the tool runs to the end and exits 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_admin(cluster: Cluster, *args: str) -> subprocess.Popen[bytes]:
    """Start ``paxfs admin ARGS`` without waiting (to interrupt it), with SIGINT at its
    default whatever this process inherited."""
    argv = [sys.executable, "-m", "tools.cli", "admin", *args, "-c", str(cluster.group.config_path)]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        preexec_fn=_sigint_as_in_a_shell,
    )


def interrupt(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> tuple[int, str]:
    """Ctrl-C (SIGINT to its PID); its exit status and stderr."""
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=timeout_s)
    return process.returncode, stderr.decode()


async def wait_out_of_safe_mode(cluster: Cluster, timeout_s: float = 30.0) -> None:
    """Until the leader's report is complete and no write is in flux."""

    async def settled() -> bool:
        result = await admin(cluster, "report", "--json")
        if result.returncode != 0:
            return False
        health = result.json()["health"]
        return not health["safe_mode"] and health["writes_in_flux"] == 0

    await wait_for(settled, "the leader to leave safe mode and writes to settle", timeout_s)


@asynccontextmanager
async def admin_client(cluster: Cluster) -> AsyncIterator[AdminClient]:
    """The tool's own client library, in the test process (for tight polling)."""
    async with (
        open_meta_client(cluster.group.addresses(), cluster.key, name="test-admin") as meta,
        DataserverPool.open(cluster.key, name="test-admin") as pool,
    ):
        yield AdminClient(meta, pool, cluster.key, dict(cluster.group.founders))


async def busiest(
    cluster: Cluster, client: DataClient, inodes: list[InodeId]
) -> tuple[DataserverNode, dict[ChunkId, LocatedChunk]]:
    """The dataserver holding the most replicas of ``inodes``, and their chunks."""
    chunks: dict[ChunkId, LocatedChunk] = {}
    for inode in inodes:
        for chunk in (await client.locate(inode)).chunks:
            chunks[chunk.chunk] = chunk
    counts = Counter(address for chunk in chunks.values() for address in chunk.replicas)
    return cluster.by_address(max(counts, key=lambda a: counts[a])), chunks


def restart_dataserver(node: DataserverNode, *flags: str) -> None:
    """Stop ``node`` (SIGTERM) and start it again on the same data and address, with
    ``flags`` added to its command line."""
    assert node.process.stop() == 0, node.process.log_text()[-2000:]
    node.process.argv = [*node.process.argv, *flags]
    node.process.start()


def add_dataserver(cluster: Cluster, tmp_path: Path, *flags: str) -> DataserverNode:
    """Start one more dataserver (a fresh, empty data directory)."""
    position = len(cluster.dataservers)
    name = f"dataserver-{position}"
    address = f"127.0.0.1:{free_ports(1)[0]}"
    data_dir = tmp_path / f"ds{position}"
    process = ManagedProcess(
        name,
        paxfs_argv(
            "dataserver",
            cluster.group.config_path,
            "--data",
            str(data_dir),
            "--listen",
            address,
            *flags,
        ),
        tmp_path / f"{name}.log",
    )
    node = DataserverNode(name, address, data_dir, cluster.group.adopt(process))
    cluster.dataservers.append(node)
    cluster.start_dataserver(node)
    return node


async def write_in(client: DataClient, parent: InodeId, name: bytes, data: bytes) -> InodeId:
    """Create ``name`` in directory ``parent`` and write ``data`` into it."""
    entry = await client.meta.mutate(Create(parent, name, 0o644, False))
    inode = InodeId(entry.attr.ino)
    await client.meta.mutate(Release(inode))
    await client.write(inode, 0, data)
    return inode


async def mkdir(client: DataClient, parent: InodeId, name: bytes) -> InodeId:
    entry = await client.meta.mutate(Mkdir(parent, name, 0o755))
    return InodeId(entry.attr.ino)
