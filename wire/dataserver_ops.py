"""The dataserver protocol: methods dataservers serve to clients and to each other.

Every data call names ``(chunk id, version)`` and carries a :class:`~wire.tokens.ChunkToken`
that the metaserver signed for exactly that pair; a dataserver checks it on every call
(forged, altered, expired, or for another chunk: ``RpcError(TOKEN_REFUSED)``).

**Write pipeline** (HDFS/GFS chain).  The client sends :data:`WRITE` to the first replica
of the ordered replica list, with the rest of the list as ``downstream``.  Each member
forwards the request (``downstream[1:]``, same token, same payload) to ``downstream[0]``
*before* writing locally, writes locally concurrently with the forward, and replies only
when its own write and everything downstream succeeded.  :data:`TRUNCATE` and :data:`SYNC`
travel the same way; :data:`SYNC` replies once every member has fsynced, which is what
``fsync``/``close`` wait for.  Every reply lists each member with its *incarnation* (a
random number a dataserver draws at start): a member whose incarnation changes between
two replies restarted and may have lost unsynced writes, so the client treats it as failed.

**Failures name members.**  A pipeline error is an :class:`RpcError` whose message is
``"pipeline@ADDR[,ADDR...]: reason"`` (see :func:`member_failure` and
:func:`failed_members`), with the errno of the first failure: ENOSPC for a full disk,
ECONNRESET/ECONNREFUSED/ETIMEDOUT for an unreachable member, STALE_VERSION, TOKEN_REFUSED,
:data:`CHECKSUM_MISMATCH`.  The client cuts the named members out, asks the metaserver for
a new version for the survivors, and goes on.

**Version fencing.**  Let W be the version a dataserver stores and V the version a request
names.  W == V: served.  W > V: refused with STALE_VERSION (an old writer).  W < V: a
mutating request (write, truncate, sync) whose ``base_version`` equals W turns the replica
into version V first (a rename: the metaserver bumped the version after a pipeline
failure); any other request is refused with STALE_VERSION, because the replica missed
updates.  No replica stored: a mutating request with ``base_version`` None creates an
empty replica (atomically) first; otherwise ENOENT.  A mutating request may also carry
``base_length_bytes``, how much of the base version is file data (the length the
metaserver committed for it): deriving V then drops the bytes past it, durably, before
the rename, so bytes an earlier writer left uncommitted never reappear in V.  A writer
sends it only while no request of V has been acknowledged; after that (a version derived
for the survivors of a failed pipeline) it sends None, since the survivors hold
acknowledged data past the committed length.

Addresses travel as ``"host:port"`` strings (:func:`wire.address.parse_address`).
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from wire import schema
from wire.address import parse_address
from wire.errors import RpcError
from wire.ids import ChunkId, ChunkVersion
from wire.rpc import RpcConnection
from wire.tokens import ChunkToken
from wire.transport import connect

log = logging.getLogger(__name__)

WRITE_BYTES_MAX = 8 * 1024 * 1024
"""Largest payload of one :data:`WRITE` (the frame limit is 16 MiB)."""
READ_BYTES_MAX = 8 * 1024 * 1024
"""Largest ``length_bytes`` of one :data:`READ`."""
RAW_BLOCKS_PER_CALL_MAX = 64
"""Most blocks one :data:`READ_RAW` returns (64 x 64 KiB = 4 MiB)."""
PIPELINE_MEMBERS_MAX = 16
"""Longest replica chain (the replication goal is at most 16)."""
CHECKSUM_MISMATCH = errno.EBADMSG
"""Error code of a read whose replica failed checksum verification; no data is returned,
the dataserver reports the replica to the metaserver, and the reader should try another."""

PIPELINE_TIMEOUT_BASE_S = 20.0
PIPELINE_TIMEOUT_PER_HOP_S = 10.0


def pipeline_timeout_s(hops_after: int) -> float:
    """Deadline of a pipeline call to a member followed by ``hops_after`` more members.

    Each upstream member waits one hop longer than the member it calls, so when a member
    hangs it is its direct upstream neighbour, not someone further up, whose call expires
    first, and the error names the right member.
    """
    return PIPELINE_TIMEOUT_BASE_S + hops_after * PIPELINE_TIMEOUT_PER_HOP_S


# ---------------------------------------------------------------- messages


@schema.message("data.member")
@dataclass(frozen=True)
class MemberAck:
    """One pipeline member that did its part: its address and its incarnation."""

    address: str
    incarnation: int


@schema.message("data.pipeline_reply")
@dataclass(frozen=True)
class PipelineReply:
    """Reply to write, truncate and sync: every member (in chain order) succeeded.

    ``length_bytes`` is the first member's replica length after the operation.
    """

    length_bytes: int
    members: tuple[MemberAck, ...]


@schema.message("data.write")
@dataclass(frozen=True)
class WriteRequest:
    """Write the frame payload (at most :data:`WRITE_BYTES_MAX`) at ``offset`` in the chunk.

    ``compressed`` applies when this write creates the replica (zstd per block).
    Acknowledged when every member has written; durable only after :data:`SYNC`.
    """

    chunk_id: ChunkId
    version: ChunkVersion
    base_version: ChunkVersion | None
    offset: int
    compressed: bool
    token: ChunkToken
    downstream: tuple[str, ...]
    base_length_bytes: int | None = None


@schema.message("data.truncate")
@dataclass(frozen=True)
class TruncateRequest:
    """Set the replica's length (shrink drops data, growth reads as zeros); needs sync."""

    chunk_id: ChunkId
    version: ChunkVersion
    base_version: ChunkVersion | None
    length_bytes: int
    compressed: bool
    token: ChunkToken
    downstream: tuple[str, ...]
    base_length_bytes: int | None = None


@schema.message("data.sync")
@dataclass(frozen=True)
class SyncRequest:
    """Make every write and truncate so far durable on every member (fsync)."""

    chunk_id: ChunkId
    version: ChunkVersion
    base_version: ChunkVersion | None
    compressed: bool
    token: ChunkToken
    downstream: tuple[str, ...]
    base_length_bytes: int | None = None


@schema.message("data.read")
@dataclass(frozen=True)
class ReadRequest:
    """Read up to ``length_bytes`` (at most :data:`READ_BYTES_MAX`) at ``offset``.

    The reply payload holds fewer bytes at the end of the replica and none past it; holes
    read as zeros.  Every block read is verified (:data:`CHECKSUM_MISMATCH` otherwise).
    """

    chunk_id: ChunkId
    version: ChunkVersion
    offset: int
    length_bytes: int
    token: ChunkToken


@schema.message("data.read_reply")
@dataclass(frozen=True)
class ReadReply:
    """``length_bytes``: the replica's length; ``load``: requests the server is serving."""

    length_bytes: int
    load: int


@schema.message("data.info")
@dataclass(frozen=True)
class ChunkInfoRequest:
    """What this dataserver stores for ``(chunk_id, version)``; a read token is needed."""

    chunk_id: ChunkId
    version: ChunkVersion
    token: ChunkToken


@schema.message("data.info_reply")
@dataclass(frozen=True)
class ChunkInfoReply:
    chunk_id: ChunkId
    version: ChunkVersion
    length_bytes: int
    capacity_bytes: int
    compressed: bool
    disk_bytes: int


@schema.message("data.read_raw")
@dataclass(frozen=True)
class RawReadRequest:
    """Blocks as stored (verified, still compressed), to copy a replica between dataservers.

    Returns the present blocks among ``[first_block, first_block + block_count)``, with
    ``block_count`` at most :data:`RAW_BLOCKS_PER_CALL_MAX`; holes are left out.
    """

    chunk_id: ChunkId
    version: ChunkVersion
    first_block: int
    block_count: int
    token: ChunkToken


@dataclass(frozen=True)
class RawBlockHeader:
    """One block of a :class:`RawReadReply`; its stored bytes follow in the payload."""

    block_index: int
    data_len: int
    compressed: bool
    crc32c: int
    payload_bytes: int


@schema.message("data.read_raw_reply")
@dataclass(frozen=True)
class RawReadReply:
    """The replica's shape and the blocks; payload = the blocks' stored bytes, in order."""

    length_bytes: int
    capacity_bytes: int
    compressed: bool
    blocks: tuple[RawBlockHeader, ...]


@schema.message("data.replicate")
@dataclass(frozen=True)
class ReplicateRequest:
    """Copy ``(chunk_id, version)`` from the dataserver at ``source`` (healing).

    ``token`` (read or write, for this chunk version) is passed to the source.  The copy
    is built under a temporary name and appears atomically; an older local version is
    replaced, an equal one kept (nothing to do), a newer one refused (STALE_VERSION).
    """

    chunk_id: ChunkId
    version: ChunkVersion
    source: str
    token: ChunkToken


@schema.message("data.replicate_reply")
@dataclass(frozen=True)
class ReplicateReply:
    length_bytes: int


@schema.message("data.delete")
@dataclass(frozen=True)
class DeleteRequest:
    """Remove the replica ``(chunk_id, version)``; a write token for it is needed."""

    chunk_id: ChunkId
    version: ChunkVersion
    token: ChunkToken


@schema.message("data.delete_reply")
@dataclass(frozen=True)
class DeleteReply:
    """``deleted`` is False when no replica of that version was stored (nothing to do)."""

    deleted: bool


WRITE = schema.Method("data.write", WriteRequest, PipelineReply, carries_payload=True)
TRUNCATE = schema.Method("data.truncate", TruncateRequest, PipelineReply)
SYNC = schema.Method("data.sync", SyncRequest, PipelineReply)
READ = schema.Method("data.read", ReadRequest, ReadReply, returns_payload=True)
CHUNK_INFO = schema.Method("data.info", ChunkInfoRequest, ChunkInfoReply)
READ_RAW = schema.Method("data.read_raw", RawReadRequest, RawReadReply, returns_payload=True)
REPLICATE = schema.Method("data.replicate", ReplicateRequest, ReplicateReply)
DELETE = schema.Method("data.delete", DeleteRequest, DeleteReply)


# ---------------------------------------------------------------- member failures

_PIPELINE_PREFIX = "pipeline@"


def member_failure(addresses: Sequence[str], code: int, reason: str) -> RpcError:
    """An error that names the pipeline members that failed (in chain order)."""
    return RpcError(code, f"{_PIPELINE_PREFIX}{','.join(addresses)}: {reason}")


def failed_members(error: RpcError) -> tuple[str, ...] | None:
    """The members an error from :func:`member_failure` names; None for any other error."""
    if not error.message.startswith(_PIPELINE_PREFIX):
        return None
    names, sep, _reason = error.message[len(_PIPELINE_PREFIX) :].partition(": ")
    if not sep or not names:
        return None
    return tuple(names.split(","))


def failure_reason(error: RpcError) -> str:
    """The reason part of a member failure (the whole message for other errors)."""
    if failed_members(error) is None:
        return error.message
    return error.message.partition(": ")[2]


# ---------------------------------------------------------------- connections

PEER_CONNECTIONS_MAX = 256
"""Connections one :class:`PeerConnections` keeps open; the least recently used idle one
is closed beyond that."""
CONNECT_TIMEOUT_S = 5.0
BULK_LANES = 2
"""Connections per dataserver for chunk data (clients, and dataservers forwarding): one
connection carries one bulk payload at a time, and a second lets the next payload flow
while the first is being taken in; measured on loopback with 4 MiB replies, 1 lane gave
0.7-0.9 GiB/s and 2 lanes 1.9-2.3 GiB/s, 4 lanes no more."""
LANES_MAX = 8

Req = TypeVar("Req")
Rep = TypeVar("Rep")
_Lane = tuple[str, int]


class PeerConnections:
    """``lanes`` multiplexed connections per peer address (one by default), each opened
    on first use and reopened when it is found closed.  Used by clients (to dataservers
    and to metaservers) and by dataservers forwarding in a pipeline.

    A call goes to the address's lane with the fewest calls in flight (the lowest on a
    tie), so light traffic stays on one connection and bulk traffic spreads.  Calls on
    different lanes may overtake each other; a caller that needs an order waits for the
    earlier call, as the chunk writer does for overlapping pieces.

    Connections run in ``nursery``; :meth:`aclose` closes them all.  A call that fails to
    connect, or whose connection dies, raises :class:`RpcError` (ECONNREFUSED, ETIMEDOUT,
    ECONNRESET, EACCES) like any other failed call; it is not retried here, because a
    pipeline member whose connection died may have lost writes and must be named.
    """

    def __init__(
        self,
        key: bytes,
        nursery: trio.Nursery,
        *,
        name: str,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        lanes: int = 1,
    ) -> None:
        if not 1 <= lanes <= LANES_MAX:
            raise ValueError(f"lanes must be 1..{LANES_MAX}, got {lanes}")
        self._key = key
        self._nursery = nursery
        self._name = name
        self._connect_timeout_s = connect_timeout_s
        self._lanes = lanes
        self._connections: OrderedDict[_Lane, RpcConnection] = OrderedDict()
        self._connecting: dict[_Lane, trio.Lock] = {}
        self._in_flight: dict[_Lane, int] = {}

    async def get(self, address: str, lane: int = 0) -> RpcConnection:
        """The open connection of ``lane`` to ``address``, dialling it if there is none."""
        key = (address, lane)
        connection = self._connections.get(key)
        if connection is not None and not connection.closed:
            self._connections.move_to_end(key)
            return connection
        lock = self._connecting.setdefault(key, trio.Lock())
        async with lock:
            connection = self._connections.get(key)
            if connection is not None and not connection.closed:
                return connection
            try:
                target = parse_address(address)
            except ValueError as error:
                raise RpcError(errno.EINVAL, str(error)) from None
            connection = await connect(
                target,
                self._key,
                self._nursery,
                name=self._name,
                timeout_s=self._connect_timeout_s,
            )
            self._connections[key] = connection
            self._connections.move_to_end(key)
        await self._close_excess()
        return connection

    async def call(
        self,
        address: str,
        method: schema.Method[Req, Rep],
        request: Req,
        *,
        payload: bytes | bytearray | memoryview | None = None,
        timeout_s: float | None = None,
    ) -> tuple[Rep, bytes | bytearray | memoryview | None]:
        """Call ``method`` on the peer at ``address``; return (reply, payload)."""
        lane = min(range(self._lanes), key=lambda n: self._in_flight.get((address, n), 0))
        key = (address, lane)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            connection = await self.get(address, lane)
            return await connection.call_with_payload(
                method, request, payload=payload, timeout_s=timeout_s
            )
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]

    async def _close_excess(self) -> None:
        while len(self._connections) > PEER_CONNECTIONS_MAX:
            key, oldest = self._connections.popitem(last=False)
            lock = self._connecting.get(key)
            if lock is not None and not lock.locked():
                del self._connecting[key]
            await oldest.aclose()

    async def close(self, address: str) -> None:
        """Close the pooled connections to ``address`` (the next call dials anew)."""
        for lane in range(self._lanes):
            connection = self._connections.pop((address, lane), None)
            if connection is not None:
                await connection.aclose()

    async def aclose(self) -> None:
        connections = list(self._connections.values())
        self._connections.clear()
        for connection in connections:
            await connection.aclose()
