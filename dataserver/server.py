"""The ``paxfs dataserver`` process: serves chunk replicas and talks to the metaserver leader.

It opens its data directory (:mod:`dataserver.data_dir`: a stable id and the chunk store),
serves the methods of :mod:`wire.dataserver_ops` on ``[dataserver] listen``, and keeps a
session with the metaserver leader (:mod:`dataserver.metaserver_link`): registration,
heartbeats, full and incremental chunk reports, corrupt-replica reports, and the commands
heartbeat replies carry.  A background scrubber re-verifies replicas at
``[dataserver] scrub_rate_mib_s``.  It serves data without waiting for a leader: tokens
are checked with the cluster key alone.

The chunk store is synchronous; every call into it goes through ``trio.to_thread``.

Run it as ``paxfs dataserver`` (``tools.cli`` calls :func:`run`) or, without the CLI, as
``python -m dataserver.server -c FILE [--data DIR] [--listen HOST:PORT]``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

import trio

from dataserver.chunk_store import (
    BLOCK_SIZE_BYTES,
    ChunkExists,
    ChunkNotFound,
    ChunkStore,
    ChunkStoreError,
    CorruptReplica,
    InvalidRequest,
    NoSpace,
    RawBlock,
    ReplicaBusy,
    StagedReplica,
    StaleVersion,
    StoreFormatError,
    StoreInUse,
)
from dataserver.data_dir import DataDir, DataDirError, open_data_dir
from dataserver.metaserver_link import MetaserverLink
from dataserver.replica_ops import ReplicaOps, VersionRefused
from dataserver.scrubber import scrub_forever
from wire import schema
from wire.address import Address, parse_address
from wire.cluster_ops import ReplicaReport, Space
from wire.config import Config, ConfigError, load_config
from wire.dataserver_ops import (
    BULK_LANES,
    CHECKSUM_MISMATCH,
    CHUNK_INFO,
    DELETE,
    PIPELINE_MEMBERS_MAX,
    RAW_BLOCKS_PER_CALL_MAX,
    READ,
    READ_BYTES_MAX,
    READ_RAW,
    REPLICATE,
    SYNC,
    TRUNCATE,
    WRITE,
    WRITE_BYTES_MAX,
    ChunkInfoReply,
    ChunkInfoRequest,
    DeleteReply,
    DeleteRequest,
    MemberAck,
    PeerConnections,
    PipelineReply,
    RawBlockHeader,
    RawReadReply,
    RawReadRequest,
    ReadReply,
    ReadRequest,
    ReplicateReply,
    ReplicateRequest,
    SyncRequest,
    TruncateRequest,
    WriteRequest,
    failed_members,
    failure_reason,
    member_failure,
    pipeline_timeout_s,
)
from wire.errors import STALE_VERSION, TOKEN_REFUSED, RpcError
from wire.ids import ChunkId, ChunkVersion
from wire.invariant import invariant
from wire.local_reads import OpenReplicaReply, OpenReplicaRequest, serve_local_reads
from wire.rpc import CallContext, Handlers, WithPayload
from wire.tokens import AccessMode, ChunkToken, TokenRefused, check_token
from wire.transport import bound_port, raise_single, serve

log = logging.getLogger("dataserver")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

REPLICATIONS_IN_FLIGHT_MAX = 4
"""Replica copies this dataserver runs at once (as target); more wait their turn."""
REPLICATE_CALL_TIMEOUT_S = 30.0

LocalStep = Callable[[], int]
PipelineRequest = TypeVar("PipelineRequest", WriteRequest, TruncateRequest, SyncRequest)
T = TypeVar("T")


class Dataserver:
    """One dataserver: its store, its RPC handlers, its peers and its metaserver link."""

    def __init__(
        self,
        *,
        config: Config,
        key: bytes,
        data_dir: DataDir,
        store: ChunkStore,
        address: str,
    ) -> None:
        self.config = config
        self.key = key
        self.data_dir = data_dir
        self.dataserver_id = data_dir.dataserver_id
        self.store = store
        self.ops = ReplicaOps(store)
        self.address = address
        self.incarnation = secrets.randbits(63)
        self.active_writes = 0
        self.active_reads = 0
        self._replications = trio.Semaphore(REPLICATIONS_IN_FLIGHT_MAX)
        self._replicating: dict[ChunkId, trio.Lock] = {}
        """One copy of a chunk at a time: a second request (a drain's copy and an open
        for write's top-up, say) waits and then finds the version already here."""
        self._peers: PeerConnections | None = None
        self.link: MetaserverLink | None = None

    @property
    def peers(self) -> PeerConnections:
        invariant(self._peers is not None, "dataserver is not running")
        assert self._peers is not None
        return self._peers

    def handlers(self) -> Handlers:
        handlers = Handlers()
        handlers.register(WRITE, self.handle_write)
        handlers.register(TRUNCATE, self.handle_truncate)
        handlers.register(SYNC, self.handle_sync)
        handlers.register(READ, self.handle_read)
        handlers.register(CHUNK_INFO, self.handle_chunk_info)
        handlers.register(READ_RAW, self.handle_read_raw)
        handlers.register(REPLICATE, self.handle_replicate)
        handlers.register(DELETE, self.handle_delete)
        return handlers

    async def run(
        self,
        listen: Address,
        metaservers: dict[int, Address],
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``listen`` and keep the metaserver session, until cancelled.

        ``task_status.started`` reports the advertised address (the bound port when
        ``listen`` asked for port 0)."""
        async with trio.open_nursery() as nursery:
            self._peers = PeerConnections(
                self.key, nursery, name=f"dataserver-{self.dataserver_id:016x}", lanes=BULK_LANES
            )
            listeners = await nursery.start(partial(serve, self.handlers(), self.key, listen))
            self.address = str(Address(_advertised_host(listen.host), bound_port(listeners)))
            log.info(
                "dataserver %016x serving %s on %s (incarnation %016x)",
                self.dataserver_id,
                self.data_dir.path,
                self.address,
                self.incarnation,
            )
            if self.config.dataserver.local_reads:
                await self._serve_local_reads(nursery)
            self.link = MetaserverLink(self, metaservers)
            nursery.start_soon(self.link.run)
            nursery.start_soon(
                scrub_forever, self.ops, self.config.dataserver.scrub_rate_mib_s, self.wake_link
            )
            task_status.started(self.address)

    async def _serve_local_reads(self, nursery: trio.Nursery) -> None:
        """Let clients on this host read replicas from their files (see
        :mod:`wire.local_reads`); a name already taken costs a warning, not the server."""
        try:
            await nursery.start(
                partial(serve_local_reads, self.handle_open_replica, self.key, self.address)
            )
        except OSError as error:
            log.warning("local reads are off: cannot listen for %s: %s", self.address, error)

    def wake_link(self) -> None:
        if self.link is not None:
            self.link.wake()

    async def space(self) -> Space:
        usage = await trio.to_thread.run_sync(self.store.usage)
        return Space(
            usage.capacity_bytes, usage.used_bytes, usage.available_bytes, usage.replica_count
        )

    # ---- checks --------------------------------------------------------------------------

    def _check_token(
        self, token: ChunkToken, chunk_id: ChunkId, version: ChunkVersion, mode: AccessMode
    ) -> None:
        try:
            check_token(self.key, token, chunk_id, version, mode, time.time())
        except TokenRefused as error:
            log.warning(
                "refused %s of chunk %#x v%d: %s", mode.name.lower(), chunk_id, version, error
            )
            raise RpcError(
                TOKEN_REFUSED, f"chunk {chunk_id:#x} v{version}: token refused: {error}"
            ) from None

    def _check_downstream(self, downstream: tuple[str, ...]) -> None:
        if len(downstream) >= PIPELINE_MEMBERS_MAX:
            raise RpcError(errno.EINVAL, f"pipeline longer than {PIPELINE_MEMBERS_MAX} members")
        if self.address in downstream or len(set(downstream)) != len(downstream):
            raise RpcError(errno.EINVAL, "pipeline names a member twice")
        for address in downstream:
            try:
                parse_address(address)
            except ValueError as error:
                raise RpcError(errno.EINVAL, f"pipeline: {error}") from None

    # ---- the write pipeline --------------------------------------------------------------

    async def handle_write(self, request: WriteRequest, context: CallContext) -> PipelineReply:
        self._check_pipeline_request(request)
        data = context.payload if context.payload is not None else b""
        if len(data) > WRITE_BYTES_MAX or request.offset < 0:
            raise RpcError(errno.EINVAL, f"write of {len(data)} bytes at {request.offset}")
        return await self._pipelined(
            WRITE, request, partial(self.ops.write, request, request.offset, data), data
        )

    async def handle_truncate(
        self, request: TruncateRequest, _context: CallContext
    ) -> PipelineReply:
        self._check_pipeline_request(request)
        return await self._pipelined(
            TRUNCATE, request, partial(self.ops.truncate, request, request.length_bytes)
        )

    async def handle_sync(self, request: SyncRequest, _context: CallContext) -> PipelineReply:
        self._check_pipeline_request(request)
        try:
            return await self._pipelined(SYNC, request, partial(self.ops.sync, request))
        finally:
            self.wake_link()

    def _check_pipeline_request(
        self, request: WriteRequest | TruncateRequest | SyncRequest
    ) -> None:
        self._check_token(request.token, request.chunk_id, request.version, AccessMode.WRITE)
        self._check_downstream(request.downstream)

    async def _pipelined(
        self,
        method: schema.Method[PipelineRequest, PipelineReply],
        request: PipelineRequest,
        local: LocalStep,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> PipelineReply:
        """Serve one checked pipeline request: forward it (with ``payload``) to the next
        member, and run ``local`` (the replica operation, in a thread) meanwhile."""

        async def forward(address: str, rest: tuple[str, ...]) -> PipelineReply:
            reply, _ = await self.peers.call(
                address,
                method,
                replace(request, downstream=rest),
                payload=payload,
                timeout_s=pipeline_timeout_s(len(rest)),
            )
            return reply

        self.active_writes += 1
        try:
            return await self._pipeline(request.downstream, forward, local)
        finally:
            self.active_writes -= 1

    async def _pipeline(
        self,
        downstream: tuple[str, ...],
        forward: Callable[[str, tuple[str, ...]], Awaitable[PipelineReply]],
        local: LocalStep,
    ) -> PipelineReply:
        """Forward to the next member, run the local step concurrently, combine outcomes.

        The forward starts before the local step (the local step first yields to the
        scheduler in ``to_thread``), so the next member starts writing while we do.
        """
        downstream_outcome: PipelineReply | RpcError | None = None

        async def run_forward() -> None:
            nonlocal downstream_outcome
            try:
                downstream_outcome = await forward(downstream[0], downstream[1:])
            except RpcError as error:
                downstream_outcome = error

        local_outcome: int | RpcError
        async with trio.open_nursery() as nursery:
            if downstream:
                nursery.start_soon(run_forward)
            try:
                local_outcome = await trio.to_thread.run_sync(local)
            except (ChunkStoreError, VersionRefused, OSError) as error:
                local_outcome = self._store_error(error)
                if local_outcome.code == CHECKSUM_MISMATCH:
                    self.wake_link()

        failed: list[str] = []
        reasons: list[str] = []
        code = 0
        if isinstance(local_outcome, RpcError):
            failed.append(self.address)
            reasons.append(f"{self.address}: {local_outcome}")
            code = local_outcome.code
        if isinstance(downstream_outcome, PipelineReply) and not _acks_match(
            downstream_outcome, downstream
        ):
            downstream_outcome = RpcError(errno.EPROTO, "reply names other pipeline members")
        if isinstance(downstream_outcome, RpcError):
            names = failed_members(downstream_outcome) or (downstream[0],)
            failed.extend(names)
            if failed_members(downstream_outcome) is None:
                reasons.append(f"{downstream[0]}: {downstream_outcome}")
            else:
                reasons.append(failure_reason(downstream_outcome))
            code = code or downstream_outcome.code
        if failed:
            raise member_failure(failed, code, "; ".join(reasons))
        invariant(isinstance(local_outcome, int), "local step gave no length")
        assert isinstance(local_outcome, int)
        members: tuple[MemberAck, ...] = (MemberAck(self.address, self.incarnation),)
        if isinstance(downstream_outcome, PipelineReply):
            members += downstream_outcome.members
        return PipelineReply(local_outcome, members)

    def _store_error(self, error: Exception) -> RpcError:
        """The wire error for a chunk-store failure."""
        if isinstance(error, VersionRefused):
            return RpcError(errno.ENOENT if error.missing else STALE_VERSION, str(error))
        if isinstance(error, StaleVersion):
            return RpcError(STALE_VERSION, str(error))
        if isinstance(error, ChunkNotFound):
            return RpcError(errno.ENOENT, str(error))
        if isinstance(error, ChunkExists):
            return RpcError(errno.EEXIST, str(error))
        if isinstance(error, CorruptReplica):
            return RpcError(CHECKSUM_MISMATCH, str(error))
        if isinstance(error, ReplicaBusy):
            return RpcError(errno.EBUSY, str(error))
        if isinstance(error, NoSpace):
            return RpcError(errno.ENOSPC, f"{self.address}: {error}")
        if isinstance(error, InvalidRequest):
            return RpcError(errno.EINVAL, str(error))
        if isinstance(error, OSError):
            log.error("I/O error in the chunk store: %s", error)
            return RpcError(error.errno or errno.EIO, f"I/O error: {error.strerror or error}")
        log.error("chunk store failure: %s", error)
        return RpcError(errno.EIO, str(error))

    async def _in_thread(self, function: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(function)
        except (ChunkStoreError, VersionRefused, OSError) as error:
            rpc_error = self._store_error(error)
            if rpc_error.code == CHECKSUM_MISMATCH:
                self.wake_link()
            raise rpc_error from None

    # ---- reads ---------------------------------------------------------------------------

    async def handle_read(
        self, request: ReadRequest, _context: CallContext
    ) -> WithPayload[ReadReply]:
        self._check_token(request.token, request.chunk_id, request.version, AccessMode.READ)
        if not 0 <= request.length_bytes <= READ_BYTES_MAX or request.offset < 0:
            raise RpcError(
                errno.EINVAL, f"read of {request.length_bytes} bytes at {request.offset}"
            )
        self.active_reads += 1
        try:
            result = await self._in_thread(
                lambda: self.ops.read(
                    request.chunk_id, request.version, request.offset, request.length_bytes
                )
            )
        finally:
            self.active_reads -= 1
        data, length = result
        load = self.active_reads + self.active_writes
        return WithPayload(ReadReply(length, load), data)

    async def handle_open_replica(
        self, request: OpenReplicaRequest
    ) -> tuple[OpenReplicaReply, int]:
        """A read-only descriptor of the replica's file for a reader on this host."""
        self._check_token(request.token, request.chunk_id, request.version, AccessMode.READ)
        fd, name = await self._in_thread(
            lambda: self.ops.open_for_local_read(request.chunk_id, request.version)
        )
        return OpenReplicaReply(name), fd

    async def handle_chunk_info(
        self, request: ChunkInfoRequest, _context: CallContext
    ) -> ChunkInfoReply:
        self._check_token(request.token, request.chunk_id, request.version, AccessMode.READ)
        info = await self._in_thread(lambda: self.ops.info(request.chunk_id, request.version))
        return ChunkInfoReply(
            info.chunk_id,
            info.version,
            info.length_bytes,
            info.capacity_bytes,
            info.compressed,
            info.disk_bytes,
        )

    async def handle_read_raw(
        self, request: RawReadRequest, _context: CallContext
    ) -> WithPayload[RawReadReply]:
        self._check_token(request.token, request.chunk_id, request.version, AccessMode.READ)
        if not 0 < request.block_count <= RAW_BLOCKS_PER_CALL_MAX or request.first_block < 0:
            raise RpcError(errno.EINVAL, f"raw read of {request.block_count} blocks")
        self.active_reads += 1
        try:
            result = await self._in_thread(
                lambda: self.ops.read_raw(
                    request.chunk_id, request.version, request.first_block, request.block_count
                )
            )
        finally:
            self.active_reads -= 1
        info, blocks = result
        headers = tuple(
            RawBlockHeader(b.block_index, b.data_len, b.compressed, b.crc32c, len(b.payload))
            for b in blocks
        )
        reply = RawReadReply(info.length_bytes, info.capacity_bytes, info.compressed, headers)
        return WithPayload(reply, b"".join(b.payload for b in blocks))

    # ---- healing and deletion --------------------------------------------------------------

    async def handle_replicate(
        self, request: ReplicateRequest, _context: CallContext
    ) -> ReplicateReply:
        try:
            parse_address(request.source)
        except ValueError as error:
            raise RpcError(errno.EINVAL, f"replicate: {error}") from None
        if request.source == self.address:
            raise RpcError(errno.EINVAL, "replicate: the source is this dataserver")
        length = await self.replicate(
            request.chunk_id, request.version, request.source, request.token
        )
        return ReplicateReply(length)

    async def replicate(
        self, chunk_id: ChunkId, version: ChunkVersion, source: str, token: ChunkToken
    ) -> int:
        """Copy ``(chunk_id, version)`` from ``source``; return the copy's length.

        The copy is staged under a temporary name and appears atomically.  An older local
        version is deleted first (it is stale whatever happens); an equal one is kept.
        """
        lock = self._replicating.setdefault(chunk_id, trio.Lock())
        try:
            async with lock:
                return await self._replicate_alone(chunk_id, version, source, token)
        finally:
            if not lock.locked() and self._replicating.get(chunk_id) is lock:
                del self._replicating[chunk_id]

    async def _replicate_alone(
        self, chunk_id: ChunkId, version: ChunkVersion, source: str, token: ChunkToken
    ) -> int:
        async with self._replications:
            try:
                stored = await trio.to_thread.run_sync(self.store.stat, chunk_id)
            except ChunkNotFound:
                stored = None
            if stored is not None:
                if stored.version == version and not self.ops.is_corrupt(chunk_id, version):
                    return stored.length_bytes
                if stored.version > version:
                    raise RpcError(
                        STALE_VERSION,
                        f"chunk {chunk_id:#x}: version {stored.version} stored, newer than"
                        f" {version}",
                    )
                await trio.to_thread.run_sync(self.ops.delete, chunk_id, stored.version)
            length = await self._copy_from(chunk_id, version, source, token)
        self.ops.changes.add(ReplicaReport(chunk_id, version, length, False))
        self.wake_link()
        log.info("chunk %#x v%d: copied %d bytes from %s", chunk_id, version, length, source)
        return length

    async def _copy_from(
        self, chunk_id: ChunkId, version: ChunkVersion, source: str, token: ChunkToken
    ) -> int:
        async def fetch(first_block: int) -> tuple[RawReadReply, bytes]:
            reply, payload = await self.peers.call(
                source,
                READ_RAW,
                RawReadRequest(chunk_id, version, first_block, RAW_BLOCKS_PER_CALL_MAX, token),
                timeout_s=REPLICATE_CALL_TIMEOUT_S,
            )
            return reply, bytes(payload or b"")

        reply, payload = await fetch(0)
        block_total = reply.capacity_bytes // BLOCK_SIZE_BYTES
        staged = await self._in_thread(
            lambda: self.store.stage(
                chunk_id,
                version,
                compressed=reply.compressed,
                capacity_bytes=reply.capacity_bytes,
            )
        )
        committed = False
        try:
            first = 0
            while True:
                await self._in_thread(partial(_store_raw, staged, reply, payload))
                first += RAW_BLOCKS_PER_CALL_MAX
                if first >= block_total:
                    break
                reply, payload = await fetch(first)
            length = reply.length_bytes
            await self._in_thread(partial(staged.truncate, length))
            await self._in_thread(staged.commit)
            committed = True
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(staged.abort)
        return length

    async def handle_delete(self, request: DeleteRequest, _context: CallContext) -> DeleteReply:
        self._check_token(request.token, request.chunk_id, request.version, AccessMode.WRITE)
        deleted = await self._in_thread(partial(self.ops.delete, request.chunk_id, request.version))
        self.wake_link()
        return DeleteReply(deleted)


def _store_raw(staged: StagedReplica, reply: RawReadReply, payload: bytes) -> None:
    """Write the blocks of one raw read into a staged replica (thread side)."""
    position = 0
    for header in reply.blocks:
        end = position + header.payload_bytes
        if end > len(payload):
            raise InvalidRequest("raw read reply is shorter than its block headers say")
        raw = RawBlock(
            header.block_index,
            header.data_len,
            header.compressed,
            header.crc32c,
            payload[position:end],
        )
        staged.write_raw_block(raw)
        position = end
    if position != len(payload):
        raise InvalidRequest("raw read reply is longer than its block headers say")


def _acks_match(reply: PipelineReply, downstream: tuple[str, ...]) -> bool:
    return tuple(member.address for member in reply.members) == downstream


def _advertised_host(host: str) -> str:
    """The host others should dial: the listening host, or this machine's name for a
    wildcard listen address."""
    if host in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return host


# ---------------------------------------------------------------- the process


def run(config: Config) -> int:
    """Run a dataserver with ``config`` until SIGTERM or SIGINT.

    Returns 0 after a clean stop; 2 for an unusable configuration and 1 when it cannot
    start (data directory of another format or in use, address taken), each with one line
    on stderr.  This is what ``paxfs dataserver`` calls.
    """
    _setup_logging()
    try:
        key = config.cluster_key()
        metaservers = config.metaserver_addresses()
        listen = parse_address(config.dataserver.listen, any_port=True)
    except (ConfigError, ValueError) as error:
        print(f"paxfs dataserver: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        data_dir = open_data_dir(config.dataserver.data_dir)
        store = ChunkStore(
            data_dir.chunks_path,
            chunk_size_bytes=config.cluster.chunk_size_bytes,
            capacity_bytes_max=config.dataserver.capacity_bytes or None,
        )
    except (DataDirError, StoreFormatError, StoreInUse, OSError) as error:
        print(f"paxfs dataserver: {error}", file=sys.stderr)
        return EXIT_FAILURE
    server = Dataserver(config=config, key=key, data_dir=data_dir, store=store, address="")
    try:
        trio.run(_run_until_signalled, server, listen, metaservers)
    except OSError as error:
        print(f"paxfs dataserver: cannot serve on {listen}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        store.close()
    log.info("dataserver %016x stopped", server.dataserver_id)
    return EXIT_OK


async def _run_until_signalled(
    server: Dataserver, listen: Address, metaservers: dict[int, Address]
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(server.run, listen, metaservers))
                async for signum in signals:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        except BaseExceptionGroup as group:
            raise_single(group)


def _setup_logging() -> None:
    level = os.environ.get("PAXFS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dataserver.server -c FILE [--data DIR] [--listen HOST:PORT]``."""
    parser = argparse.ArgumentParser(
        prog="python -m dataserver.server", description="run a paxfs dataserver"
    )
    parser.add_argument(
        "-c", "--config", default=os.environ.get("PAXFS_CONFIG"), help="TOML configuration file"
    )
    parser.add_argument("--data", help="data directory (overrides [dataserver] data_dir)")
    parser.add_argument("--listen", help="HOST:PORT to serve on (overrides [dataserver] listen)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.data:
            config.dataserver.data_dir = args.data
        if args.listen:
            config.dataserver.listen = args.listen
        config.validate()
    except ConfigError as error:
        print(f"paxfs dataserver: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
