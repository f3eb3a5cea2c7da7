"""A single-process stand-in for the metaserver leader, inside a test's trio run.

It serves what a client and dataservers need from the leader: every namespace method
(answered by the real :class:`metaserver.namespace.Namespace`, in memory, without Paxos),
the cluster protocol (the dataserver harness's :class:`FakeMetaserver`), and the
client's data-path calls (``OPEN_FOR_WRITE``, ``LOCATE``, ``SPACE``,
``REPORT_BAD_REPLICA``) with chains chosen over the registered dataservers and tokens
signed with the cluster key.  The in-process tests of the file client and of the pyfuse3
operations use it: they start in a fraction of a second, and they can see (and kill) the
very replica chain a write goes through.  The mount tests use real clusters.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from metaserver.client_service import mutation_answer
from metaserver.namespace import Namespace, NamespaceConfig
from tests.proc.dataserver_harness import FakeMetaserver
from wire.address import Address
from wire.admin_ops import GROUP_STATUS, GroupStatusReply, GroupStatusRequest
from wire.cluster_ops import FULL_REPORT, HEARTBEAT, REGISTER, REPORT_CORRUPT, HeartbeatRequest
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
    Reported,
    Space,
    SpaceRequest,
    WritableChunk,
)
from wire.dataserver_ops import CHUNK_INFO, ChunkInfoRequest, PeerConnections
from wire.errors import RpcError
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.namespace_ops import (
    METHOD_OF_OP,
    MUTATING_OPS,
    QUERY_OPS,
    SESSION_OPS,
    ChunkListReply,
    ChunkReply,
    ClientCommand,
    MutationCall,
    NsError,
    OpenChunk,
    QueryCall,
    SessionCommand,
)
from wire.rpc import CallContext, Handlers
from wire.tokens import AccessMode, sign_token
from wire.transport import bound_port, serve

log = logging.getLogger("standin-leader")

LIVE_AFTER_HEARTBEAT_S = 1.5


def reply_or_raise(reply: Any) -> Any:
    """The namespace's reply, or an RpcError carrying its errno (as the metaserver does)."""
    if isinstance(reply, NsError):
        raise RpcError(reply.errno, os.strerror(reply.errno))
    return reply


@dataclass
class StandinLeader:
    """The namespace, the dataserver registry and the replica chain of every chunk."""

    key: bytes
    namespace: Namespace
    address: str
    fake: FakeMetaserver = field(init=False)
    chains: dict[ChunkId, tuple[str, ...]] = field(default_factory=dict)
    rotation: int = 0
    peers: PeerConnections | None = None
    last_heartbeat: dict[DataserverId, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fake = FakeMetaserver(key=self.key)

    def handlers(self) -> Handlers:
        handlers = Handlers()
        handlers.register(REGISTER, self.fake._register)  # noqa: SLF001
        handlers.register(HEARTBEAT, self._heartbeat)
        handlers.register(FULL_REPORT, self.fake._full_report)  # noqa: SLF001
        handlers.register(REPORT_CORRUPT, self.fake._report_corrupt)  # noqa: SLF001
        for op_type, method in METHOD_OF_OP.items():
            if op_type in MUTATING_OPS:
                handlers.register(method, self._mutation)
            elif op_type in QUERY_OPS:
                handlers.register(method, self._query)
            elif op_type in SESSION_OPS:
                handlers.register(method, self._session)
        handlers.register(OPEN_FOR_WRITE, self._open_for_write)
        handlers.register(LOCATE, self._locate)
        handlers.register(SPACE, self._space)
        handlers.register(REPORT_BAD_REPLICA, self._report_bad)
        handlers.register(GROUP_STATUS, self._group_status)
        return handlers

    async def _mutation(self, call: MutationCall, _context: CallContext) -> Any:
        reply = self.namespace.apply(ClientCommand(time.time_ns(), call))
        return mutation_answer(self.namespace, call, reply)

    async def _query(self, call: QueryCall, _context: CallContext) -> Any:
        return reply_or_raise(self.namespace.query(call.op, call.credentials))

    async def _session(self, op: Any, _context: CallContext) -> Any:
        return reply_or_raise(self.namespace.apply(SessionCommand(time.time_ns(), op)))

    async def _holders(
        self, candidates: tuple[str, ...], chunk: ChunkId, version: int
    ) -> tuple[str, ...]:
        """The candidates that store ``(chunk, version)`` now (asked directly: reports
        lag behind)."""
        if version < 1 or self.peers is None:
            return ()
        token = sign_token(self.key, chunk, ChunkVersion(version), AccessMode.READ, time.time())
        request = ChunkInfoRequest(chunk, ChunkVersion(version), token)
        holders = []
        for address in candidates:
            try:
                await self.peers.call(address, CHUNK_INFO, request, timeout_s=5)
            except RpcError:
                continue
            holders.append(address)
        return tuple(holders)

    async def _heartbeat(self, request: HeartbeatRequest, context: CallContext) -> Any:
        self.last_heartbeat[request.dataserver_id] = time.monotonic()
        return await self.fake._heartbeat(request, context)  # noqa: SLF001

    def _live(self) -> list[str]:
        """Dataservers registered and heard from within ``LIVE_AFTER_HEARTBEAT_S``."""
        now = time.monotonic()
        return sorted(
            request.address
            for server, request in self.fake.registrations.items()
            if now - self.last_heartbeat.get(server, now) < LIVE_AFTER_HEARTBEAT_S
        )

    async def _open_for_write(self, request: OpenForWrite, _context: CallContext) -> WritableChunk:
        op = request.call.op
        assert isinstance(op, OpenChunk)
        reply: ChunkReply = reply_or_raise(
            self.namespace.apply(ClientCommand(time.time_ns(), request.call))
        )
        previous = tuple(a for a in self.chains.get(reply.chunk, ()) if a not in request.exclude)
        holders = await self._holders(previous, reply.chunk, reply.version - 1)
        if reply.version > 1 and holders:
            chain, base = holders, reply.version - 1
        else:
            # No replica holds the previous version (a new chunk, or one whose first
            # pipeline never formed): start afresh on a new chain.
            candidates = [a for a in self._live() if a not in request.exclude]
            self.rotation += 1
            shift = self.rotation % max(1, len(candidates))
            chain = tuple((candidates[shift:] + candidates[:shift])[: reply.goal])
            base = None
        self.chains[reply.chunk] = chain
        token = sign_token(self.key, reply.chunk, reply.version, AccessMode.WRITE, time.time())
        return WritableChunk(
            op.index,
            reply.chunk,
            reply.version,
            base,  # type: ignore[arg-type]
            reply.length,
            reply.goal,
            reply.compress,
            chain,
            token,
        )

    async def _locate(self, request: Locate, _context: CallContext) -> Located:
        reply: ChunkListReply = reply_or_raise(
            self.namespace.query(request.call.op, request.call.credentials)
        )
        now = time.time()
        chunks = tuple(
            LocatedChunk(
                info.index,
                info.chunk,
                info.version,
                info.length,
                self.chains.get(info.chunk, ()),
                sign_token(self.key, info.chunk, info.version, AccessMode.READ, now),
            )
            for info in reply.chunks
        )
        return Located(reply.size, reply.chunk_size, chunks, reply.more)

    async def _space(self, _request: SpaceRequest, _context: CallContext) -> Space:
        spaces = [r.space for r in self.fake.registrations.values()]
        return Space(
            sum(s.capacity_bytes for s in spaces),
            sum(s.used_bytes for s in spaces),
            sum(s.available_bytes for s in spaces),
            len(spaces),
        )

    async def _report_bad(self, _request: ReportBadReplica, _context: CallContext) -> Reported:
        return Reported()

    async def _group_status(
        self, _request: GroupStatusRequest, _context: CallContext
    ) -> GroupStatusReply:
        return GroupStatusReply(1, "leader", 1, self.address, "1", 0, 0, 0, 0, 0, 0, ())


async def serve_standin(
    key: bytes,
    address: Address,
    namespace_config: NamespaceConfig,
    task_status: trio.TaskStatus[StandinLeader] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a stand-in leader on ``address`` (port 0: any) until cancelled; report it,
    with its bound address, through ``task_status``."""
    leader = StandinLeader(key, Namespace(namespace_config), str(address))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(serve, leader.handlers(), key, address))
        leader.address = str(Address(address.host, bound_port(listeners)))
        leader.peers = PeerConnections(key, nursery, name="standin-leader")
        task_status.started(leader)
