"""The admin tools' view of a running cluster: calls to the metaserver leader, to each
metaserver, and to dataservers, behind one :class:`AdminClient`.

* The cluster manager's admin RPCs (:mod:`wire.cluster_admin_ops`) and namespace calls go
  through a :class:`~fuse_client.meta_client.MetaClient`, which finds the leader and
  rides out failovers.
* The group status (:data:`wire.admin_ops.GROUP_STATUS`) is asked of every metaserver
  directly: each answers with its own view (role, applied index), the leader also with
  the lag and last contact of the others.
* Replica reads for checksum verification and balancer copies go to dataservers through
  a :class:`~fuse_client.chunk_io.DataserverPool`.

Paths are paths in the paxfs namespace (``/`` is its root), resolved by ``Lookup``.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import crc32c
import trio

from fuse_client.chunk_io import DataserverPool
from fuse_client.meta_client import MetaClient, open_meta_client
from wire.address import Address, parse_address
from wire.admin_ops import GROUP_STATUS, GroupStatusReply, GroupStatusRequest
from wire.cluster_admin_ops import (
    CLUSTER_HEALTH,
    FILE_CHUNKS,
    LIST_DATASERVERS,
    LIST_REPLICAS,
    MOVE_BEGIN,
    MOVE_COMMIT,
    SET_DATASERVER_STATE,
    ChunkStatus,
    ClusterHealthReply,
    ClusterHealthRequest,
    DataserverMode,
    DataserverPage,
    DataserverReport,
    FileChunksReply,
    FileChunksRequest,
    ListDataserversRequest,
    ListReplicasRequest,
    MoveCommitRequest,
    MoveRequest,
    MoveResult,
    MoveTicket,
    ReplicaPage,
    SetDataserverStateRequest,
    StoredReplica,
)
from wire.config import Config
from wire.dataserver_ops import (
    READ,
    READ_BYTES_MAX,
    REPLICATE,
    ReadRequest,
    ReplicateReply,
    ReplicateRequest,
)
from wire.errors import RpcError
from wire.ids import ROOT_INODE, ChunkId, ChunkVersion, DataserverId, InodeId
from wire.namespace_ops import (
    READDIR_PAGE_MAX,
    Attr,
    AttrReply,
    EntryReply,
    GetAttr,
    Lookup,
    ReadDir,
    ReadDirReply,
)
from wire.tokens import ChunkToken
from wire.transport import open_connection

GROUP_STATUS_TIMEOUT_S = 2.0
"""One metaserver's answer to a status call; silent ones are shown as unreachable."""
READ_TIMEOUT_S = 30.0
COPY_TIMEOUT_BASE_S = 20.0
COPY_TIMEOUT_RATE_BYTES_S = 10 * 1024 * 1024
"""A balancer copy not done within base + length / rate is abandoned."""
WALK_DEPTH_MAX = 4096
"""Deepest directory nesting a walk follows (a path is at most PATH_MAX bytes anyway)."""
PATH_BYTES_MAX = 4096


class AdminError(Exception):
    """An admin command failed in a way the operator can act on; one line."""


@dataclass(frozen=True)
class MetaserverView:
    """One metaserver's answer to a status call (``status`` None: unreachable)."""

    node_id: int
    address: str
    status: GroupStatusReply | None
    error: str


@dataclass(frozen=True)
class FileView:
    """Every chunk of one file as the leader knows it (all pages)."""

    inode: InodeId
    size: int
    chunk_size: int
    goal: int
    safe_mode: bool
    chunks: tuple[ChunkStatus, ...]


@dataclass(frozen=True)
class ReplicaRead:
    """What reading one replica gave: its CRC32C over the committed length, or the error."""

    address: str
    crc: int | None
    length_bytes: int
    error: str


def split_path(path: str) -> list[bytes]:
    """The components of a namespace path; AdminError for an unusable one."""
    raw = path.encode()
    if not raw or len(raw) > PATH_BYTES_MAX or b"\0" in raw:
        raise AdminError(f"{path!r}: not a usable path")
    return [part for part in raw.split(b"/") if part and part != b"."]


def join_path(parent: str, name: bytes) -> str:
    text = name.decode(errors="surrogateescape")
    return f"/{text}" if parent == "/" else f"{parent}/{text}"


def match_dataserver(servers: list[DataserverReport], text: str) -> DataserverReport:
    """The one of ``servers`` named by ``text``: its id in hex (a unique prefix of at least
    4 digits will do) or its HOST:PORT address; AdminError for none or several."""
    by_address = [s for s in servers if s.address == text]
    if by_address:
        return by_address[0]
    digits = text.lower().removeprefix("0x")
    if len(digits) < 4 or any(c not in "0123456789abcdef" for c in digits):
        raise AdminError(f"{text!r} is neither a dataserver id (hex) nor HOST:PORT")
    matches = [s for s in servers if s.dataserver_id == int(digits, 16)]
    if not matches:
        matches = [s for s in servers if f"{s.dataserver_id:016x}".startswith(digits)]
    if not matches:
        raise AdminError(f"no dataserver {text} is known to the metaserver leader")
    if len(matches) > 1:
        raise AdminError(f"{text} names {len(matches)} dataservers; give more digits")
    return matches[0]


class AdminClient:
    """Calls of the admin tools into one cluster; open with :func:`open_admin_client`."""

    def __init__(
        self,
        meta: MetaClient,
        pool: DataserverPool,
        key: bytes,
        metaservers: dict[int, Address],
    ) -> None:
        self.meta = meta
        self.pool = pool
        self.key = key
        self.metaservers = metaservers

    # ---- the cluster manager ----------------------------------------------------------

    async def health(self) -> ClusterHealthReply:
        reply: ClusterHealthReply = await self.meta.call(CLUSTER_HEALTH, ClusterHealthRequest())
        return reply

    async def dataservers(self) -> tuple[list[DataserverReport], bool]:
        """Every dataserver the leader knows (all pages), and whether it is in safe mode."""
        found: list[DataserverReport] = []
        after = DataserverId(0)
        while True:
            page: DataserverPage = await self.meta.call(
                LIST_DATASERVERS, ListDataserversRequest(after)
            )
            found.extend(page.dataservers)
            if not page.more or not page.dataservers:
                return found, page.safe_mode
            after = page.dataservers[-1].dataserver_id

    async def find_dataserver(self, text: str) -> DataserverReport:
        """The dataserver named by ``text`` (see :func:`match_dataserver`)."""
        servers, _ = await self.dataservers()
        return match_dataserver(servers, text)

    async def set_mode(self, dataserver: DataserverId, mode: DataserverMode) -> DataserverReport:
        reply: DataserverReport = await self.meta.call(
            SET_DATASERVER_STATE, SetDataserverStateRequest(dataserver, mode)
        )
        return reply

    async def file_view(self, inode: InodeId) -> FileView:
        chunks: list[ChunkStatus] = []
        first = 0
        while True:
            page: FileChunksReply = await self.meta.call(
                FILE_CHUNKS, FileChunksRequest(inode, first)
            )
            chunks.extend(page.chunks)
            if not page.more or not page.chunks:
                return FileView(
                    inode, page.size, page.chunk_size, page.goal, page.safe_mode, tuple(chunks)
                )
            first = page.chunks[-1].index + 1

    async def replicas_on(self, dataserver: DataserverId, limit: int) -> list[StoredReplica]:
        """Up to ``limit`` replicas stored on ``dataserver``, in chunk id order."""
        found: list[StoredReplica] = []
        after = ChunkId(0)
        while len(found) < limit:
            page: ReplicaPage = await self.meta.call(
                LIST_REPLICAS, ListReplicasRequest(dataserver, after)
            )
            found.extend(page.replicas)
            if not page.more or not page.replicas:
                break
            after = page.replicas[-1].chunk
        return found[:limit]

    async def begin_move(self, move: MoveRequest) -> MoveTicket:
        ticket: MoveTicket = await self.meta.call(MOVE_BEGIN, move)
        return ticket

    async def commit_move(self, move: MoveRequest, length_bytes: int) -> MoveResult:
        result: MoveResult = await self.meta.call(
            MOVE_COMMIT, MoveCommitRequest(move, length_bytes)
        )
        return result

    # ---- the metaserver group ---------------------------------------------------------

    async def group(self) -> list[MetaserverView]:
        """Every metaserver's own status (the configured ones and any the leader names)."""
        views: dict[int, MetaserverView] = {}

        async def ask(node_id: int, address: Address) -> None:
            status, error = None, "no answer"
            with trio.move_on_after(GROUP_STATUS_TIMEOUT_S):
                try:
                    async with open_connection(address, self.key, name="admin") as connection:
                        status = await connection.call(
                            GROUP_STATUS, GroupStatusRequest(), timeout_s=GROUP_STATUS_TIMEOUT_S
                        )
                    error = ""
                except (RpcError, OSError) as failure:
                    error = str(failure)
            views[node_id] = MetaserverView(node_id, str(address), status, error)

        async with trio.open_nursery() as nursery:
            for node_id, address in self.metaservers.items():
                nursery.start_soon(ask, node_id, address)
        known = {
            member.node_id: member.address
            for view in views.values()
            if view.status is not None
            for member in view.status.addresses
        }
        extra = {i: a for i, a in known.items() if i not in views}
        if extra:
            async with trio.open_nursery() as nursery:
                for node_id, text in extra.items():
                    try:
                        address = parse_address(text)
                    except ValueError:
                        continue
                    nursery.start_soon(ask, node_id, address)
        return [views[i] for i in sorted(views)]

    # ---- the namespace ----------------------------------------------------------------

    async def resolve(self, path: str) -> Attr:
        """The attributes of the inode at ``path`` (AdminError when it does not exist)."""
        inode = ROOT_INODE
        for part in split_path(path):
            try:
                entry: EntryReply = await self.meta.query(Lookup(inode, part))
            except RpcError as error:
                if error.code in (errno.ENOENT, errno.ENOTDIR):
                    raise AdminError(f"{path}: no such file or directory") from None
                raise
            inode = InodeId(entry.attr.ino)
        reply: AttrReply = await self.meta.query(GetAttr(inode))
        return reply.attr

    async def walk(self, path: str, attr: Attr) -> AsyncIterator[tuple[str, Attr]]:
        """``path`` itself and, for a directory, everything under it, depth first; entries
        removed while the walk goes on are skipped."""
        stack: list[tuple[str, Attr, int]] = [(path, attr, 0)]
        while stack:
            where, node, depth = stack.pop()
            yield where, node
            if not stat.S_ISDIR(node.mode) or depth >= WALK_DEPTH_MAX:
                continue
            children: list[tuple[str, Attr, int]] = []
            cookie = 0
            while True:
                try:
                    page: ReadDirReply = await self.meta.query(
                        ReadDir(InodeId(node.ino), cookie, READDIR_PAGE_MAX)
                    )
                except RpcError as error:
                    if error.code in (errno.ENOENT, errno.ENOTDIR):
                        break
                    raise
                for entry in page.entries:
                    children.append((join_path(where, entry.name), entry.attr, depth + 1))
                if page.eof or not page.entries:
                    break
                cookie = page.entries[-1].cookie
            stack.extend(reversed(children))

    # ---- dataservers ------------------------------------------------------------------

    async def read_replica(
        self,
        address: str,
        chunk: ChunkId,
        version: ChunkVersion,
        length_bytes: int,
        token: ChunkToken,
    ) -> ReplicaRead:
        """Read ``[0, length_bytes)`` of one replica (the dataserver verifies every block's
        checksum on the way) and return its CRC32C, or the error that stopped it."""
        crc = 0
        offset = 0
        try:
            while offset < length_bytes:
                want = min(READ_BYTES_MAX, length_bytes - offset)
                _reply, payload = await self.pool.call(
                    address,
                    READ,
                    ReadRequest(chunk, version, offset, want, token),
                    timeout_s=READ_TIMEOUT_S,
                )
                data = bytes(payload or b"")
                if not data:
                    return ReplicaRead(address, None, offset, f"short: {offset} bytes stored")
                crc = crc32c.crc32c(data, crc)
                offset += len(data)
        except RpcError as error:
            return ReplicaRead(address, None, offset, str(error))
        return ReplicaRead(address, crc, offset, "")

    async def replicate(
        self,
        target: str,
        chunk: ChunkId,
        version: ChunkVersion,
        source: str,
        token: ChunkToken,
        length_bytes: int,
    ) -> int:
        """Have ``target`` copy ``(chunk, version)`` (about ``length_bytes``) from
        ``source``; the copy's length."""
        reply: ReplicateReply
        reply, _ = await self.pool.call(
            target,
            REPLICATE,
            ReplicateRequest(chunk, version, source, token),
            timeout_s=COPY_TIMEOUT_BASE_S + length_bytes / COPY_TIMEOUT_RATE_BYTES_S,
        )
        return reply.length_bytes


@asynccontextmanager
async def open_admin_client(config: Config, *, session: bool = False) -> AsyncIterator[AdminClient]:
    """A client on the cluster of ``config`` (``session`` for namespace mutations)."""
    metaservers = config.metaserver_addresses()
    key = config.cluster_key()
    async with (
        open_meta_client(
            list(metaservers.values()),
            key,
            name="admin",
            call_timeout_s=config.client.call_timeout_s,
            no_quorum_timeout_s=config.client.no_quorum_timeout_s,
            session=session,
        ) as meta,
        DataserverPool.open(key, name="admin") as pool,
    ):
        yield AdminClient(meta, pool, key, metaservers)
