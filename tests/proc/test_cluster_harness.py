"""A whole cluster of real processes for the cluster-manager tests (no tests in here).

Three metaservers (``paxfs metaserver``, through :mod:`tests.proc.metaserver_harness`)
with the real cluster manager, N real dataservers (``paxfs dataserver``, each on a fixed
loopback port so that a restart keeps its address), and a :class:`DataClient` that
writes and reads files the way a client does: namespace calls through
:class:`~fuse_client.meta_client.MetaClient`, chunk data through
:mod:`fuse_client.chunk_io`, placements from ``OPEN_FOR_WRITE`` and ``LOCATE``.

Observations are made from outside the metaservers: what each dataserver stores is read
from the file names in its chunk directory (``chunk_<id>_<version>``), and replica bytes
are read from each dataserver alone with a token signed by the test.  Every process is
stopped by PID when the block ends, also on failure; their logs are printed, and a
traceback in a metaserver log fails the test.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from fuse_client.chunk_io import ChunkPlacement, DataserverPool, PlacedFile
from fuse_client.meta_client import MetaClient, open_meta_client
from tests.proc.metaserver_harness import (
    FAST_ELECTIONS,
    ManagedProcess,
    MetaserverGroup,
    free_ports,
    paxfs_argv,
    toml_config,
)
from wire.data_ops import (
    LOCATE,
    OPEN_FOR_WRITE,
    REPORT_BAD_REPLICA,
    SPACE,
    Locate,
    Located,
    LocatedChunk,
    OpenForWrite,
    ReportBadReplica,
    Space,
    SpaceRequest,
    WritableChunk,
)
from wire.dataserver_ops import READ, ReadRequest
from wire.ids import ROOT_INODE, ChunkId, ChunkVersion, DataserverId, InodeId
from wire.namespace_ops import (
    CHUNK_PAGE_MAX,
    ROOT_CREDENTIALS,
    ChunkWrite,
    CommitWrite,
    Create,
    GetChunks,
    OpenChunk,
    QueryCall,
    Release,
    SetGoal,
    StatFs,
    StatFsReply,
)
from wire.tokens import AccessMode, sign_token

CHUNK_BYTES = 256 * 1024
DEAD_AFTER_S = 2.5
HEARTBEAT_S = 0.2
REGISTER_TIMEOUT_S = 30.0
BLOCK_DATA_OFFSET = 64 * 1024
"""Where block 0's data starts in a replica file (see wire.replica_format)."""
_REPLICA_NAME = re.compile(r"^chunk_([0-9a-f]{16})_([0-9a-f]{16})$")


def seeded_rng() -> random.Random:
    """A random source whose seed is printed; replay with ``PAXFS_SEED=N``."""
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"PAXFS_SEED={seed}")
    return random.Random(seed)


@dataclass
class DataserverNode:
    name: str
    address: str
    data_dir: Path
    process: ManagedProcess

    @property
    def dataserver_id(self) -> DataserverId | None:
        try:
            text = (self.data_dir / "DATASERVER").read_text()
        except OSError:
            return None
        return DataserverId(int(text.split("id ")[1].strip(), 16))

    def stored(self) -> dict[ChunkId, ChunkVersion]:
        """Every replica in this dataserver's chunk directory (staged copies excluded)."""
        found: dict[ChunkId, ChunkVersion] = {}
        try:
            names = os.listdir(self.data_dir / "chunks")
        except OSError:
            return found
        for name in names:
            match = _REPLICA_NAME.match(name)
            if match:
                found[ChunkId(int(match[1], 16))] = ChunkVersion(int(match[2], 16))
        return found

    def replica_path(self, chunk: ChunkId, version: ChunkVersion) -> Path:
        return self.data_dir / "chunks" / f"chunk_{chunk:016x}_{version:016x}"


def flip_bit(path: Path, offset: int) -> None:
    """Flip one bit of a replica file on disk (bit rot)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x10]))


@dataclass
class Cluster:
    group: MetaserverGroup
    dataservers: list[DataserverNode] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.group.key

    def start_dataserver(self, node: DataserverNode) -> None:
        node.process.start()

    def by_address(self, address: str) -> DataserverNode:
        return next(node for node in self.dataservers if node.address == address)

    def holders(self, chunk: ChunkId, version: ChunkVersion | None = None) -> set[str]:
        """Addresses of running dataservers storing ``chunk`` (at ``version`` if given)."""
        return {
            node.address
            for node in self.dataservers
            if node.process.running
            and chunk in (stored := node.stored())
            and (version is None or stored[chunk] == version)
        }

    async def leader(self) -> int:
        return await self.group.wait_for_leader()

    @asynccontextmanager
    async def client(self) -> AsyncIterator[DataClient]:
        async with (
            open_meta_client(self.group.addresses(), self.key, name="test-client") as meta,
            DataserverPool.open(self.key, name="test-client") as pool,
        ):
            yield DataClient(meta, pool, self.key)


class MetaAllocator:
    """Chunk placements for one file from the real leader (``OPEN_FOR_WRITE``)."""

    def __init__(self, meta: MetaClient, inode: InodeId) -> None:
        self._meta = meta
        self._inode = inode
        self.granted: list[WritableChunk] = []

    async def _open(self, index: int, exclude: tuple[str, ...]) -> ChunkPlacement:
        writable: WritableChunk = await self._meta.mutate(
            OpenChunk(self._inode, index),
            method=OPEN_FOR_WRITE,
            envelope=lambda call: OpenForWrite(call, exclude),
        )
        self.granted.append(writable)
        return ChunkPlacement(
            writable.chunk,
            writable.version,
            writable.base_version,
            writable.replicas,
            writable.token,
            writable.compress,
        )

    async def allocate(self, index: int, exclude: tuple[str, ...] = ()) -> ChunkPlacement:
        return await self._open(index, exclude)

    async def open_for_write(self, index: int, current: ChunkPlacement) -> ChunkPlacement:
        return await self._open(index, ())

    async def renew(
        self, index: int, current: ChunkPlacement, failed: tuple[str, ...]
    ) -> ChunkPlacement:
        return await self._open(index, failed)


@dataclass
class DataClient:
    """Writes and reads whole files as a client does (namespace + chunk data path)."""

    meta: MetaClient
    pool: DataserverPool
    key: bytes
    bad_replicas_reported: list[tuple[ChunkId, str]] = field(default_factory=list)

    async def create(self, name: bytes, goal: int | None = None) -> InodeId:
        entry = await self.meta.mutate(Create(ROOT_INODE, name, 0o644, False))
        inode = InodeId(entry.attr.ino)
        if goal is not None:
            await self.meta.mutate(SetGoal(inode, goal=goal))
        await self.meta.mutate(Release(inode))
        return inode

    async def write(self, inode: InodeId, offset: int, data: bytes) -> dict[int, ChunkPlacement]:
        """Write ``data`` at ``offset``, sync every replica, commit; the new placements."""
        located = await self.locate(inode)
        current = {
            chunk.index: ChunkPlacement(
                chunk.chunk, chunk.version, None, chunk.replicas, chunk.token
            )
            for chunk in located.chunks
        }
        file = PlacedFile(
            self.pool,
            located.chunk_size,
            MetaAllocator(self.meta, inode),
            current,
            length_bytes=located.size,
        )
        await file.write(offset, data)
        placements = await file.sync()
        chunk_size = located.chunk_size
        end = offset + len(data)
        writes = tuple(
            ChunkWrite(
                index,
                placement.chunk_id,
                placement.version,
                min(chunk_size, end - index * chunk_size),
            )
            for index, placement in sorted(placements.items())
            if index * chunk_size < end and (index + 1) * chunk_size > offset
        )
        await self.meta.mutate(CommitWrite(inode, writes))
        return {w.index: placements[w.index] for w in writes}

    async def write_file(self, name: bytes, data: bytes, goal: int | None = None) -> InodeId:
        inode = await self.create(name, goal)
        await self.write(inode, 0, data)
        return inode

    async def locate(self, inode: InodeId) -> Located:
        """Every chunk of the file (all pages)."""
        chunks: list[LocatedChunk] = []
        first = 0
        while True:
            page: Located = await self.meta.call(
                LOCATE, Locate(QueryCall(ROOT_CREDENTIALS, GetChunks(inode, first, CHUNK_PAGE_MAX)))
            )
            chunks.extend(page.chunks)
            if not page.more or not page.chunks:
                return Located(page.size, page.chunk_size, tuple(chunks), False)
            first = page.chunks[-1].index + 1

    async def read(self, inode: InodeId) -> bytes:
        """The whole file, read through replica failover (bad replicas are reported)."""
        located = await self.locate(inode)
        placements = {
            chunk.index: ChunkPlacement(
                chunk.chunk, chunk.version, None, chunk.replicas, chunk.token
            )
            for chunk in located.chunks
        }

        file = PlacedFile(
            self.pool,
            located.chunk_size,
            MetaAllocator(self.meta, inode),
            placements,
            length_bytes=located.size,
            on_corrupt=self.report_bad_replica,
            readahead_bytes=0,
        )
        return await file.read(0, located.size)

    async def report_bad_replica(
        self, chunk: ChunkId, version: ChunkVersion, address: str, why: str
    ) -> None:
        """What a reader does on a checksum mismatch (``ChunkReader``'s ``on_corrupt``)."""
        self.bad_replicas_reported.append((chunk, address))
        await self.meta.call(REPORT_BAD_REPLICA, ReportBadReplica(chunk, version, address, why))

    async def replica_bytes(self, address: str, chunk: LocatedChunk) -> bytes:
        """What one dataserver alone returns for a chunk version (the whole replica)."""
        token = sign_token(self.key, chunk.chunk, chunk.version, AccessMode.READ, time.time())
        request = ReadRequest(chunk.chunk, chunk.version, 0, CHUNK_BYTES, token)
        _, payload = await self.pool.call(address, READ, request, timeout_s=10)
        return bytes(payload or b"")

    async def space(self) -> Space:
        reply: Space = await self.meta.call(SPACE, SpaceRequest())
        return reply

    async def statfs(self) -> StatFsReply:
        reply: StatFsReply = await self.meta.query(StatFs())
        return reply


def expected_chunks(data: bytes, chunk_size: int = CHUNK_BYTES) -> dict[int, bytes]:
    return {
        index: data[index * chunk_size : (index + 1) * chunk_size]
        for index in range((len(data) + chunk_size - 1) // chunk_size)
    }


async def wait_for(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0
) -> None:
    """Poll an async ``condition`` every 100 ms until it returns true."""
    with trio.move_on_after(timeout_s):
        while True:
            if await condition():
                return
            await trio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    *,
    dataservers: int = 4,
    replication: int = 3,
    dead_after_s: float = DEAD_AFTER_S,
    chunk_size_bytes: int = CHUNK_BYTES,
    replication_rate_mib_s: float = 200.0,
    show_logs: bool = True,
    metaserver_settings: dict[str, object] | None = None,
) -> AsyncIterator[Cluster]:
    """Start 3 metaservers and ``dataservers`` dataservers; stop every one on exit
    (printing the tails of their logs unless ``show_logs`` is False).
    ``metaserver_settings`` adds to (or overrides) the ``[metaserver]`` table."""
    settings = {
        **FAST_ELECTIONS,
        "dataserver_dead_after_s": dead_after_s,
        "replication_rate_mib_s": replication_rate_mib_s,
        **(metaserver_settings or {}),
    }
    group = MetaserverGroup(tmp_path, 3, settings=settings)
    ports = free_ports(dataservers)
    group.config_path.write_text(
        toml_config(
            {
                "cluster": {
                    "key": group.key.hex(),
                    "metaservers": {str(i): str(a) for i, a in group.founders.items()},
                    "chunk_size_bytes": chunk_size_bytes,
                    "replication": replication,
                },
                "metaserver": settings,
                "dataserver": {"heartbeat_interval_s": HEARTBEAT_S, "scrub_rate_mib_s": 0.0},
                "client": {"call_timeout_s": 2.0, "no_quorum_timeout_s": 30.0},
            }
        )
    )
    cluster = Cluster(group)
    try:
        for node_id in list(group.nodes):
            group.start(node_id)
        for position, port in enumerate(ports):
            name = f"dataserver-{position}"
            address = f"127.0.0.1:{port}"
            data_dir = tmp_path / f"ds{position}"
            process = ManagedProcess(
                name,
                paxfs_argv(
                    "dataserver", group.config_path, "--data", str(data_dir), "--listen", address
                ),
                tmp_path / f"{name}.log",
            )
            node = DataserverNode(name, address, data_dir, group.adopt(process))
            cluster.dataservers.append(node)
            cluster.start_dataserver(node)
        await group.wait_for_leader()
        async with cluster.client() as client:

            async def all_registered() -> bool:
                for node in cluster.dataservers:
                    if not node.process.running:
                        raise AssertionError(f"{node.name} exited:\n{node.process.log_text()}")
                return (await client.space()).live_dataservers == dataservers

            await wait_for(all_registered, "every dataserver to register", REGISTER_TIMEOUT_S)
        yield cluster
    finally:
        statuses = group.stop_all()
        if show_logs:
            group.print_logs()
        tracebacks = [
            node.process.name
            for node in group.nodes.values()
            if "Traceback" in node.process.log_text()
        ]
        assert not tracebacks, f"tracebacks in the logs of {tracebacks}"
        unclean = {
            name: status
            for name, status in statuses.items()
            if status not in (0, -signal.SIGKILL, None)
        }
        assert not unclean, f"processes did not stop cleanly: {unclean}"
