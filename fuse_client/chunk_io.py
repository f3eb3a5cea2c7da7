"""The client's chunk data path: pipelined replicated writes, failover reads, read-ahead.

Usable without FUSE and without the metaserver: the caller hands in each chunk's
:class:`ChunkPlacement` (chunk id, version, base version, ordered replica addresses, a
signed token) as the metaserver gave it, and commits lengths and versions to the
namespace itself after :meth:`ChunkWriter.sync`.

* :class:`DataserverPool` keeps one multiplexed connection per dataserver (reopened when
  lost) and what it has seen of each: requests in flight, latency, recent failures.
* :class:`ChunkWriter` streams writes through the replica chain in pieces of at most
  ``piece_bytes`` with up to ``pieces_in_flight_max`` pieces in flight, keeping every
  piece until the whole chain acknowledged it.  When a member fails it raises
  :class:`PipelineFailed` naming it; the caller obtains a new version for the survivors
  from the metaserver and calls :meth:`ChunkWriter.retarget`, which re-sends every piece
  not yet acknowledged.  :meth:`ChunkWriter.sync` returns once every replica has fsynced.
  A member whose incarnation changes between two replies restarted and may have lost
  unsynced writes: it is reported as failed too.
* :class:`ChunkReader` reads a replica on this host from its file when it holds a read
  token (:mod:`fuse_client.local_replicas`), else from the least loaded replica; it fails
  over to the next on an error or a checksum mismatch (reported through ``on_corrupt``),
  and reads ahead when reads are sequential.
* :class:`PlacedFile` strings chunks together into a file for tests and benchmarks.
"""

from __future__ import annotations

import errno
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Protocol, TypeVar

import trio

from fuse_client.local_replicas import LocalReadFailed, LocalReplicas
from wire import schema
from wire.dataserver_ops import (
    BULK_LANES,
    CHECKSUM_MISMATCH,
    READ,
    READ_BYTES_MAX,
    SYNC,
    TRUNCATE,
    WRITE,
    WRITE_BYTES_MAX,
    PeerConnections,
    PipelineReply,
    ReadReply,
    ReadRequest,
    SyncRequest,
    TruncateRequest,
    WriteRequest,
    failed_members,
    failure_reason,
    pipeline_timeout_s,
)
from wire.errors import TOKEN_REFUSED, RpcError
from wire.framing import Payload
from wire.ids import ChunkId, ChunkVersion
from wire.invariant import invariant
from wire.tokens import AccessMode, ChunkToken
from wire.transport import raise_single

log = logging.getLogger(__name__)

WRITE_PIECE_BYTES_DEFAULT = 4 * 1024 * 1024
PIECES_IN_FLIGHT_MAX_DEFAULT = 8
"""Pieces of one chunk in flight at once (32 MiB with the default piece size)."""
READ_PIECE_BYTES = 4 * 1024 * 1024
READS_IN_FLIGHT_MAX = 4
"""Pieces one read call fetches at once (spread over the replicas by load)."""
READAHEAD_BYTES_DEFAULT = 8 * 1024 * 1024
STICKY_IN_FLIGHT_SLACK = 2
"""A reader stays on its replica while that has at most this many more requests in
flight than the least busy replica."""
CLIENT_TIMEOUT_MARGIN_S = 5.0
"""Added to the first member's pipeline deadline, so the first member's own deadline on
the rest of the chain expires first and names the member that hung."""
READ_TIMEOUT_S = 30.0
FAILED_REPLICA_AVOID_S = 10.0
"""After an error a replica goes to the back of the read order for this long."""
LATENCY_WEIGHT = 0.2
"""Weight of the newest sample in the exponentially weighted latency average."""
RETARGETS_MAX = 8
"""Pipeline failures one :class:`PlacedFile` operation recovers from before giving up."""
SYNCS_IN_FLIGHT_MAX = 8
"""Chunks one :meth:`PlacedFile.sync` fsyncs at once."""

invariant(WRITE_PIECE_BYTES_DEFAULT <= WRITE_BYTES_MAX, "write piece above the wire limit")
invariant(READ_PIECE_BYTES <= READ_BYTES_MAX, "read piece above the wire limit")

Req = TypeVar("Req")
Rep = TypeVar("Rep")


@dataclass(frozen=True)
class ChunkPlacement:
    """Where one chunk version lives and the permission to reach it.

    ``replicas`` is the write pipeline order (the metaserver's choice) and the set of
    replicas to read from; ``base_version`` is the version this one derives from (None
    for a new chunk); ``token`` is signed for ``(chunk_id, version)`` (a write token for
    writing; either kind for reading).  ``base_length_bytes`` is the committed length of
    the base version (``WritableChunk.length``): replicas deriving this version drop the
    bytes past it, which an earlier writer left uncommitted; None keeps every byte.
    """

    chunk_id: ChunkId
    version: ChunkVersion
    base_version: ChunkVersion | None
    replicas: tuple[str, ...]
    token: ChunkToken
    compressed: bool = False
    base_length_bytes: int | None = None


class ChunkIoError(Exception):
    """Base of the data path's errors; ``code`` is an errno (or a wire.errors code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PipelineFailed(ChunkIoError):
    """A write, truncate or sync did not reach every replica.

    ``failed`` names the members to cut out (empty when no member is to blame, e.g. the
    token was refused: get a new placement all the same).  ``code`` is ENOSPC when a
    member's disk is full.  Recover with a new version for the survivors and
    :meth:`ChunkWriter.retarget`.
    """

    def __init__(
        self,
        chunk_id: ChunkId,
        version: ChunkVersion,
        failed: tuple[str, ...],
        code: int,
        reason: str,
    ) -> None:
        members = ", ".join(failed) if failed else "no member"
        super().__init__(
            code, f"chunk {chunk_id:#x} v{version}: pipeline failed at {members}: {reason}"
        )
        self.chunk_id = chunk_id
        self.version = version
        self.failed = failed
        self.reason = reason

    def merged(self, other: PipelineFailed) -> PipelineFailed:
        failed = self.failed + tuple(a for a in other.failed if a not in self.failed)
        return PipelineFailed(self.chunk_id, self.version, failed, self.code, self.reason)


class ReplicasUnavailable(ChunkIoError):
    """Every replica of the chunk failed a read; ``errors`` says how, per replica."""

    def __init__(self, chunk_id: ChunkId, errors: dict[str, RpcError]) -> None:
        codes = {error.code for error in errors.values()}
        code = codes.pop() if len(codes) == 1 else errno.EIO
        detail = "; ".join(f"{address}: {error}" for address, error in errors.items())
        super().__init__(code, f"chunk {chunk_id:#x}: no replica could be read ({detail})")
        self.chunk_id = chunk_id
        self.errors = errors


CorruptionReport = Callable[[ChunkId, ChunkVersion, str, str], Awaitable[None]]
"""``on_corrupt(chunk_id, version, replica address, reason)``: pass it to the metaserver."""


# ---------------------------------------------------------------- the pool


@dataclass
class _PeerStats:
    in_flight: int = 0
    latency_s: float = 0.0
    failed_at: float = -1e18


class DataserverPool:
    """Connections to dataservers (one per address) and what was seen of each.

    Open it with ``async with DataserverPool.open(key) as pool``; writers and readers run
    their background tasks (pieces in flight, read-ahead) in the pool's nursery.
    """

    def __init__(
        self,
        key: bytes,
        nursery: trio.Nursery,
        *,
        name: str = "client",
        local_reads: bool = True,
    ) -> None:
        self.key = key
        self.nursery = nursery
        self._peers = PeerConnections(key, nursery, name=name, lanes=BULK_LANES)
        self._stats: dict[str, _PeerStats] = {}
        self._rotation = itertools.count()
        self.local = LocalReplicas(key, name=name) if local_reads else None
        """Replicas on this host, read from their files; None when local reads are off."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls, key: bytes, *, name: str = "client", local_reads: bool = True
    ) -> AsyncIterator[DataserverPool]:
        try:
            async with trio.open_nursery() as nursery:
                pool = cls(key, nursery, name=name, local_reads=local_reads)
                try:
                    yield pool
                finally:
                    nursery.cancel_scope.cancel()
                    if pool.local is not None:
                        pool.local.close()
                    await pool._peers.aclose()
        except BaseExceptionGroup as group:
            raise_single(group)

    def stats(self, address: str) -> _PeerStats:
        stats = self._stats.get(address)
        if stats is None:
            stats = self._stats[address] = _PeerStats()
        return stats

    def read_order(self, replicas: Sequence[str]) -> list[str]:
        """Replicas best first: not recently failed, fewest requests in flight, lowest
        latency; ties rotate so equal replicas share the load."""
        now = time.monotonic()
        turn = next(self._rotation)
        ranked = []
        for position, address in enumerate(replicas):
            stats = self.stats(address)
            recently_failed = now - stats.failed_at < FAILED_REPLICA_AVOID_S
            rotation = (position - turn) % len(replicas)
            ranked.append(
                (recently_failed, stats.in_flight, round(stats.latency_s, 3), rotation, address)
            )
        ranked.sort()
        return [entry[-1] for entry in ranked]

    async def call(
        self,
        address: str,
        method: schema.Method[Req, Rep],
        request: Req,
        *,
        payload: Payload | None = None,
        timeout_s: float | None = None,
    ) -> tuple[Rep, Payload | None]:
        stats = self.stats(address)
        stats.in_flight += 1
        started = time.monotonic()
        try:
            result = await self._peers.call(
                address, method, request, payload=payload, timeout_s=timeout_s
            )
        except RpcError:
            stats.failed_at = time.monotonic()
            raise
        finally:
            stats.in_flight -= 1
        elapsed = time.monotonic() - started
        stats.latency_s += LATENCY_WEIGHT * (elapsed - stats.latency_s)
        return result


# ---------------------------------------------------------------- writing


@dataclass
class _Piece:
    offset: int
    data: Payload
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


_REQUEST_ERRORS = frozenset({TOKEN_REFUSED, errno.EINVAL, errno.EPROTO, errno.ENOSYS})
"""Errors the first member raises about the request itself, before any pipeline work:
no member is to blame."""


class ChunkWriter:
    """Writes to one chunk through its replica pipeline (see the module docstring).

    The caller must not change a buffer passed to :meth:`write` until :meth:`flush` (or
    :meth:`sync`) returns: pieces are sent from it, and kept for re-sending, without a copy.
    """

    def __init__(
        self,
        pool: DataserverPool,
        placement: ChunkPlacement,
        *,
        piece_bytes: int = WRITE_PIECE_BYTES_DEFAULT,
        pieces_in_flight_max: int = PIECES_IN_FLIGHT_MAX_DEFAULT,
    ) -> None:
        if not 0 < piece_bytes <= WRITE_BYTES_MAX:
            raise ValueError(f"piece_bytes must be 1..{WRITE_BYTES_MAX}")
        if pieces_in_flight_max < 1:
            raise ValueError("pieces_in_flight_max must be at least 1")
        self._pool = pool
        self.placement = placement
        self._piece_bytes = piece_bytes
        self._window = trio.Semaphore(pieces_in_flight_max)
        self._in_flight: list[_Piece] = []
        self._unacked: list[_Piece] = []
        self._failure: PipelineFailed | None = None
        self._incarnations: dict[str, int] = {}
        self.length_bytes = 0
        self.acknowledged = False
        """True once the whole chain acknowledged anything: from then on every member
        holds the chunk, and a failure is recovered with a new version of it; before,
        with a new chunk altogether (as HDFS abandons a block whose pipeline never
        formed)."""

    async def write(self, offset: int, data: Payload) -> None:
        """Queue ``data`` at ``offset`` (within the chunk); returns once it is in flight.

        Raises :class:`PipelineFailed` for a failure seen so far (after every piece in
        flight has settled, so the set of unacknowledged pieces is final)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        view = memoryview(data).cast("B")
        position = 0
        while position < len(view):
            start = offset + position
            end = min(offset + len(view), (start // self._piece_bytes + 1) * self._piece_bytes)
            piece = _Piece(start, view[position : position + end - start])
            position += end - start
            await self._launch(piece)
        await self._raise_failure_if_any()

    async def _launch(self, piece: _Piece) -> None:
        await self._raise_failure_if_any()
        # A piece overlapping one in flight waits for it: replicas apply pieces in any
        # order, and the later write must win.
        for other in list(self._in_flight):
            if other.offset < piece.end and piece.offset < other.end:
                await other.done.wait()
        await self._window.acquire()
        self._in_flight.append(piece)
        self._unacked.append(piece)
        self._pool.nursery.start_soon(self._send, piece, self.placement)

    async def _send(self, piece: _Piece, placement: ChunkPlacement) -> None:
        chain = placement.replicas
        request = WriteRequest(
            placement.chunk_id,
            placement.version,
            placement.base_version,
            piece.offset,
            placement.compressed,
            placement.token,
            chain[1:],
            placement.base_length_bytes,
        )
        try:
            reply, _ = await self._pool.call(
                chain[0],
                WRITE,
                request,
                payload=piece.data,
                timeout_s=pipeline_timeout_s(len(chain) - 1) + CLIENT_TIMEOUT_MARGIN_S,
            )
            self._accept(reply, placement)
            if piece in self._unacked:
                self._unacked.remove(piece)
        except RpcError as error:
            self._note_failure(self._failure_of(error, placement))
        except PipelineFailed as failure:
            self._note_failure(failure)
        finally:
            self._in_flight.remove(piece)
            piece.done.set()
            self._window.release()

    def _accept(self, reply: PipelineReply, placement: ChunkPlacement) -> None:
        """Check a pipeline reply: every member, none restarted since we first heard it."""
        members = tuple(member.address for member in reply.members)
        if members != placement.replicas:
            raise PipelineFailed(
                placement.chunk_id,
                placement.version,
                (),
                errno.EPROTO,
                f"reply names members {members}, not {placement.replicas}",
            )
        restarted = []
        for member in reply.members:
            known = self._incarnations.setdefault(member.address, member.incarnation)
            if known != member.incarnation:
                restarted.append(member.address)
        if restarted:
            raise PipelineFailed(
                placement.chunk_id,
                placement.version,
                tuple(restarted),
                errno.ECONNRESET,
                "restarted since the write began (unsynced writes may be lost)",
            )
        self.acknowledged = True
        self.length_bytes = max(self.length_bytes, reply.length_bytes)

    def _failure_of(self, error: RpcError, placement: ChunkPlacement) -> PipelineFailed:
        members = failed_members(error)
        if members is None:
            members = () if error.code in _REQUEST_ERRORS else (placement.replicas[0],)
        return PipelineFailed(
            placement.chunk_id, placement.version, members, error.code, failure_reason(error)
        )

    def _note_failure(self, failure: PipelineFailed) -> None:
        self._failure = failure if self._failure is None else self._failure.merged(failure)

    async def _drain(self) -> None:
        while self._in_flight:
            await self._in_flight[0].done.wait()

    async def _raise_failure_if_any(self) -> None:
        if self._failure is None:
            await trio.lowlevel.checkpoint()
            return
        await self._drain()
        failure = self._failure
        invariant(failure is not None, "failure vanished while draining")
        assert failure is not None
        raise failure

    async def flush(self) -> None:
        """Wait until every piece is acknowledged by the whole chain (or raise)."""
        await self._drain()
        await self._raise_failure_if_any()

    async def sync(self) -> int:
        """Flush, then fsync every replica along the chain; return the chunk's length."""
        await self.flush()
        placement = self.placement
        reply = await self._chain_call(
            SYNC,
            SyncRequest(
                placement.chunk_id,
                placement.version,
                placement.base_version,
                placement.compressed,
                placement.token,
                placement.replicas[1:],
                placement.base_length_bytes,
            ),
        )
        self.length_bytes = reply.length_bytes
        return reply.length_bytes

    async def truncate(self, length_bytes: int) -> int:
        """Flush, then set the replicas' length along the chain (durable after sync)."""
        await self.flush()
        placement = self.placement
        reply = await self._chain_call(
            TRUNCATE,
            TruncateRequest(
                placement.chunk_id,
                placement.version,
                placement.base_version,
                length_bytes,
                placement.compressed,
                placement.token,
                placement.replicas[1:],
                placement.base_length_bytes,
            ),
        )
        self.length_bytes = reply.length_bytes
        return reply.length_bytes

    async def _chain_call(
        self, method: schema.Method[Req, PipelineReply], request: Req
    ) -> PipelineReply:
        placement = self.placement
        try:
            reply, _ = await self._pool.call(
                placement.replicas[0],
                method,
                request,
                timeout_s=pipeline_timeout_s(len(placement.replicas) - 1) + CLIENT_TIMEOUT_MARGIN_S,
            )
        except RpcError as error:
            raise self._failure_of(error, placement) from None
        self._accept(reply, placement)
        return reply

    async def retarget(self, placement: ChunkPlacement) -> None:
        """Go on with a new placement after a failure: re-send every piece the old chain
        did not acknowledge, in order.

        The placement is a new version of the chunk on the survivors; or, while nothing
        was ever acknowledged (:attr:`acknowledged`), a new chunk altogether.  Once
        something was acknowledged the survivors hold it past the committed length, so
        their new version keeps every byte (``base_length_bytes`` is not sent)."""
        await self._drain()
        invariant(
            placement.chunk_id == self.placement.chunk_id
            or (not self.acknowledged and placement.base_version is None),
            "retarget to another chunk after the chain acknowledged data",
        )
        if self.acknowledged:
            placement = replace(placement, base_length_bytes=None)
        self.placement = placement
        self._failure = None
        self._incarnations = {
            address: incarnation
            for address, incarnation in self._incarnations.items()
            if address in placement.replicas
        }
        pending = sorted(self._unacked, key=lambda piece: piece.offset)
        self._unacked = []
        for piece in pending:
            await self._launch(_Piece(piece.offset, piece.data))


# ---------------------------------------------------------------- reading


@dataclass
class _Prefetch:
    start: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    data: Payload | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


class ChunkReader:
    """Reads one chunk version from the best replica, with failover and read-ahead.

    ``end_bytes``, when known (the chunk size, or where the file ends inside the chunk),
    is where read-ahead stops: no piece is fetched past it."""

    def __init__(
        self,
        pool: DataserverPool,
        placement: ChunkPlacement,
        *,
        on_corrupt: CorruptionReport | None = None,
        readahead_bytes: int = READAHEAD_BYTES_DEFAULT,
        end_bytes: int | None = None,
    ) -> None:
        self._pool = pool
        self.placement = placement
        self._on_corrupt = on_corrupt
        self._readahead_bytes = readahead_bytes
        self._end_bytes = end_bytes
        self._next_offset = 0
        self._ahead: list[_Prefetch] = []
        self._bad: set[str] = set()
        self._preferred: str | None = None
        self.bytes_from: dict[str, int] = {}

    async def read(self, offset: int, length: int) -> Payload:
        """Up to ``length`` bytes at ``offset``: fewer at the replica's end, none past it.

        A read inside one received piece is a read-only view of it, not a copy (the
        piece's buffer is not reused while the view lives); one that spans pieces is
        joined into bytes.  Raises :class:`ReplicasUnavailable` when no replica can
        serve a piece."""
        if offset < 0 or length < 0:
            raise ValueError(f"read of {length} bytes at {offset}")
        sequential = offset == self._next_offset
        if not sequential:
            self._ahead.clear()
        parts = await self._read_cached(offset, length)
        data = parts[0].toreadonly() if len(parts) == 1 else b"".join(parts)
        self._next_offset = offset + len(data)
        if sequential and len(data) == length:
            self._extend_readahead(self._next_offset + self._readahead_bytes)
        return data

    async def _read_cached(self, offset: int, length: int) -> list[memoryview]:
        end = offset + length
        parts: list[memoryview] = []
        position = offset
        self._ahead = [segment for segment in self._ahead if segment.end > offset]
        for segment in list(self._ahead):
            if position >= end or segment.start > position:
                break
            await segment.done.wait()
            if segment.data is None:
                self._ahead.clear()
                break
            piece = memoryview(segment.data)[position - segment.start : end - segment.start]
            parts.append(piece)
            position += len(piece)
            if segment.start + len(segment.data) < segment.end:
                return parts  # the replica ends inside this segment
        if position < end:
            parts.extend(await self._fetch(position, end - position))
        return parts

    def start_readahead(self, offset: int, length_bytes: int | None = None) -> None:
        """Read ahead ``length_bytes`` (at most the read-ahead window, which is also the
        default) from ``offset``, where a sequential reader will come next.  Called again
        for the same ``offset`` it only widens what is under way, up to the window."""
        if offset != self._next_offset:
            self._ahead.clear()
            self._next_offset = offset
        wanted = self._readahead_bytes if length_bytes is None else length_bytes
        self._extend_readahead(offset + min(wanted, self._readahead_bytes))

    def _extend_readahead(self, until: int) -> None:
        """Launch pieces from the end of what is under way up to ``until`` (and no further
        than ``end_bytes``); pieces start at multiples of the piece size, as reads do."""
        if self._end_bytes is not None:
            until = min(until, self._end_bytes)
        covered = self._ahead[-1].end if self._ahead else self._next_offset
        while covered < until:
            piece_end = (covered // READ_PIECE_BYTES + 1) * READ_PIECE_BYTES
            if self._end_bytes is not None:
                piece_end = min(piece_end, self._end_bytes)
            segment = _Prefetch(covered, piece_end - covered)
            self._ahead.append(segment)
            self._pool.nursery.start_soon(self._prefetch, segment)
            covered = segment.end

    async def _prefetch(self, segment: _Prefetch) -> None:
        try:
            segment.data = await self._read_piece(segment.start, segment.length)
        except ChunkIoError:
            segment.data = None
        finally:
            segment.done.set()

    async def _fetch(self, offset: int, length: int) -> list[memoryview]:
        """Read ``[offset, offset + length)`` in pieces, several at once; stop at the end."""
        starts = list(range(offset, offset + length, READ_PIECE_BYTES))
        results: dict[int, Payload] = {}
        slots = trio.Semaphore(READS_IN_FLIGHT_MAX)
        errors: list[ChunkIoError] = []

        async def one(start: int) -> None:
            async with slots:
                if errors:
                    return
                size = min(READ_PIECE_BYTES, offset + length - start)
                try:
                    results[start] = await self._read_piece(start, size)
                except ChunkIoError as error:
                    errors.append(error)

        if len(starts) == 1:
            return [memoryview(await self._read_piece(offset, length))]
        async with trio.open_nursery() as nursery:
            for start in starts:
                nursery.start_soon(one, start)
        if errors:
            raise errors[0]
        parts: list[memoryview] = []
        for start in starts:
            piece = results[start]
            parts.append(memoryview(piece))
            if len(piece) < min(READ_PIECE_BYTES, offset + length - start):
                break
        return parts

    async def _read_piece(self, offset: int, length: int) -> Payload:
        placement = self.placement
        local, suspect = await self._read_local(offset, length)
        if local is not None:
            return local
        request = ReadRequest(
            placement.chunk_id, placement.version, offset, length, placement.token
        )
        errors: dict[str, RpcError] = {}
        order = self._pool.read_order([a for a in placement.replicas if a not in self._bad])
        order = self._stick(order)
        if suspect in order:
            # Its dataserver verifies what failed here: a corrupt replica is then reported
            # and marked bad, a race with a writer reads well.
            order = [suspect] + [address for address in order if address != suspect]
        order += [a for a in placement.replicas if a in self._bad]
        for address in order:
            try:
                reply, payload = await self._pool.call(
                    address, READ, request, timeout_s=READ_TIMEOUT_S
                )
            except RpcError as error:
                errors[address] = error
                await self._replica_failed(address, error)
                continue
            invariant(isinstance(reply, ReadReply), "read reply of the wrong type")
            data = b"" if payload is None else payload
            if isinstance(data, memoryview):
                data = data.tobytes()
            self.bytes_from[address] = self.bytes_from.get(address, 0) + len(data)
            return data
        raise ReplicasUnavailable(placement.chunk_id, errors)

    async def _read_local(self, offset: int, length: int) -> tuple[Payload | None, str | None]:
        """(the piece from the file of a replica on this host, if there is one and it
        reads well; else the replica whose file did not read well, if any).  A writer's
        placement (a write token) is never read locally, as the replica it is writing has
        changes its file's index does not show yet."""
        placement = self.placement
        local = self._pool.local
        if local is None or placement.token.mode != AccessMode.READ:
            return None, None
        for address in placement.replicas:
            if address in self._bad:
                continue
            try:
                data = await local.read(
                    address, placement.chunk_id, placement.version, placement.token, offset, length
                )
            except LocalReadFailed:
                return None, address
            if data is not None:
                self.bytes_from[address] = self.bytes_from.get(address, 0) + len(data)
                return data, None
        return None, None

    def _stick(self, order: list[str]) -> list[str]:
        """Keep one replica for this reader while it is not much busier than the best:
        a replica read sequentially gets the disk's read-ahead (as HDFS reads a block
        from one datanode); a busier one hands the next pieces to the others."""
        if not order:
            return order
        preferred = self._preferred
        if preferred not in order:
            self._preferred = order[0]
            return order
        best_load = self._pool.stats(order[0]).in_flight
        if self._pool.stats(preferred).in_flight > best_load + STICKY_IN_FLIGHT_SLACK:
            return order
        return [preferred] + [address for address in order if address != preferred]

    async def _replica_failed(self, address: str, error: RpcError) -> None:
        placement = self.placement
        log.warning("chunk %#x: replica %s failed a read: %s", placement.chunk_id, address, error)
        if error.code != TOKEN_REFUSED:
            self._bad.add(address)
        if error.code == CHECKSUM_MISMATCH and self._on_corrupt is not None:
            await self._on_corrupt(placement.chunk_id, placement.version, address, error.message)


# ---------------------------------------------------------------- a file of chunks


class ChunkAllocator(Protocol):
    """What :class:`PlacedFile` needs from the metaserver (a stand-in in tests)."""

    async def allocate(self, index: int, exclude: tuple[str, ...] = ()) -> ChunkPlacement:
        """A new chunk (``base_version`` None) for chunk number ``index`` of the file,
        placed on dataservers not in ``exclude``."""

    async def open_for_write(self, index: int, current: ChunkPlacement) -> ChunkPlacement:
        """A new version of an existing chunk, derived from ``current.version``."""

    async def renew(
        self, index: int, current: ChunkPlacement, failed: tuple[str, ...]
    ) -> ChunkPlacement:
        """A new version derived from ``current.version`` on the replicas not in ``failed``."""


class PlacedFile:
    """A file as a list of chunk placements: the data path of one file, for tests and
    benchmarks (the namespace-backed file of the mount builds on the same classes).

    Writes go to per-chunk :class:`ChunkWriter` s (opened on first write, each with a new
    version), recovering from pipeline failures through ``allocator.renew``; :meth:`sync`
    makes everything durable and returns the placements to commit.  Reads zero-fill holes
    and stop at ``length_bytes``.
    """

    def __init__(
        self,
        pool: DataserverPool,
        chunk_size_bytes: int,
        allocator: ChunkAllocator,
        placements: dict[int, ChunkPlacement] | None = None,
        *,
        length_bytes: int = 0,
        on_corrupt: CorruptionReport | None = None,
        readahead_bytes: int = READAHEAD_BYTES_DEFAULT,
    ) -> None:
        self._pool = pool
        self.chunk_size_bytes = chunk_size_bytes
        self._allocator = allocator
        self.placements: dict[int, ChunkPlacement] = dict(placements or {})
        self.length_bytes = length_bytes
        self._on_corrupt = on_corrupt
        self._readahead_bytes = readahead_bytes
        self._writers: dict[int, ChunkWriter] = {}
        self._readers: dict[int, ChunkReader] = {}
        self._next_read_offset = 0
        self.failures: list[PipelineFailed] = []

    async def _writer(self, index: int) -> ChunkWriter:
        writer = self._writers.get(index)
        if writer is None:
            current = self.placements.get(index)
            if current is None:
                placement = await self._allocator.allocate(index)
            else:
                placement = await self._allocator.open_for_write(index, current)
            writer = ChunkWriter(self._pool, placement)
            self._writers[index] = writer
            self.placements[index] = placement
            self._readers.pop(index, None)
        return writer

    async def _recovering(
        self, index: int, operation: Callable[[ChunkWriter], Awaitable[object]]
    ) -> None:
        writer = await self._writer(index)
        for _attempt in range(RETARGETS_MAX):
            try:
                await operation(writer)
                return
            except PipelineFailed as failure:
                self.failures.append(failure)
                fresh = not writer.acknowledged and writer.placement.base_version is None
                survivors = survivors_of(writer.placement, failure.failed)
                if not survivors and not fresh:
                    raise
                log.info("chunk %d: %s; going on", index, failure)
                if fresh:
                    placement = await self._allocator.allocate(index, failure.failed)
                else:
                    placement = await self._allocator.renew(index, writer.placement, failure.failed)
                self.placements[index] = placement
                await writer.retarget(placement)
        raise ChunkIoError(errno.EIO, f"chunk {index}: pipeline kept failing")

    async def write(self, offset: int, data: Payload) -> None:
        view = memoryview(data).cast("B")
        position = 0
        while position < len(view):
            start = offset + position
            index = start // self.chunk_size_bytes
            chunk_offset = start - index * self.chunk_size_bytes
            size = min(len(view) - position, self.chunk_size_bytes - chunk_offset)
            piece = view[position : position + size]
            await self._recovering(index, partial(_write_to, offset=chunk_offset, data=piece))
            position += size
        self.length_bytes = max(self.length_bytes, offset + len(view))

    async def flush(self) -> None:
        """Wait until every write so far is acknowledged by its whole chain (not durable)."""
        for index in sorted(self._writers):
            await self._recovering(index, lambda w: w.flush())

    async def truncate(self, length_bytes: int) -> None:
        """Shrink or extend: chunks past the end are dropped, the last one is cut."""
        last = (length_bytes - 1) // self.chunk_size_bytes if length_bytes else -1
        for index in [i for i in self.placements if i > last]:
            del self.placements[index]
            self._writers.pop(index, None)
            self._readers.pop(index, None)
        if length_bytes < self.length_bytes and last in self.placements:
            cut = length_bytes - last * self.chunk_size_bytes
            await self._recovering(last, lambda w: w.truncate(cut))
        self.length_bytes = length_bytes

    async def sync(self) -> dict[int, ChunkPlacement]:
        """Make every write durable on every replica; the placements to commit.

        Chunks are synced concurrently, at most :data:`SYNCS_IN_FLIGHT_MAX` at once, so the
        replicas' fsyncs overlap instead of queueing chunk after chunk."""
        slots = trio.Semaphore(SYNCS_IN_FLIGHT_MAX)

        async def sync_one(index: int) -> None:
            async with slots:
                await self._recovering(index, lambda w: w.sync())

        try:
            async with trio.open_nursery() as nursery:
                for index in sorted(self._writers):
                    nursery.start_soon(sync_one, index)
        except BaseExceptionGroup as group:
            raise_single(group)
        for index, writer in self._writers.items():
            self.placements[index] = writer.placement
        self._writers.clear()
        self._readers.clear()
        return dict(self.placements)

    def _reader(self, index: int) -> ChunkReader:
        placement = self.placements[index]
        reader = self._readers.get(index)
        if reader is None or reader.placement != placement:
            reader = ChunkReader(
                self._pool,
                placement,
                on_corrupt=self._on_corrupt,
                readahead_bytes=self._readahead_bytes,
                end_bytes=min(
                    self.chunk_size_bytes, self.length_bytes - index * self.chunk_size_bytes
                ),
            )
            self._readers[index] = reader
        return reader

    async def read(self, offset: int, length: int) -> Payload:
        """Bytes at ``offset`` (a view, as :meth:`ChunkReader.read` gives): holes read as
        zeros, nothing past ``length_bytes``.

        A sequential reader's read-ahead window runs on into the next chunk, so the next
        chunk's replicas are already sending when the reader gets there."""
        end = min(offset + length, self.length_bytes)
        sequential = offset == self._next_read_offset
        parts: list[Payload] = []
        position = offset
        while position < end:
            index = position // self.chunk_size_bytes
            chunk_offset = position - index * self.chunk_size_bytes
            size = min(end - position, self.chunk_size_bytes - chunk_offset)
            data: Payload = b""
            if index in self.placements:
                data = await self._reader(index).read(chunk_offset, size)
            parts.append(data)
            if len(data) < size:
                parts.append(bytes(size - len(data)))
            position += size
        self._next_read_offset = end
        if sequential and end < self.length_bytes:
            self._read_ahead_into_next_chunk(end)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead_into_next_chunk(self, position: int) -> None:
        """Start the next chunk's read-ahead once ``position`` is within a window of it."""
        spill = readahead_spill(position, self.chunk_size_bytes, self._readahead_bytes)
        if spill is None:
            return
        following, length_bytes = spill
        if following in self.placements and following * self.chunk_size_bytes < self.length_bytes:
            self._reader(following).start_readahead(0, length_bytes)


def readahead_spill(
    position: int, chunk_size_bytes: int, readahead_bytes: int
) -> tuple[int, int] | None:
    """The part of a sequential reader's read-ahead window at ``position`` that runs on
    into the next chunk: ``(that chunk's index, bytes to read ahead from its start)``, or
    None while the window ends inside the current chunk.  The one rule for both
    :class:`PlacedFile` and the FUSE file client."""
    following = position // chunk_size_bytes + 1
    left_in_chunk_bytes = following * chunk_size_bytes - position
    if left_in_chunk_bytes >= readahead_bytes:
        return None
    return following, readahead_bytes - left_in_chunk_bytes


async def _write_to(writer: ChunkWriter, *, offset: int, data: Payload) -> None:
    await writer.write(offset, data)


def survivors_of(placement: ChunkPlacement, failed: Sequence[str]) -> tuple[str, ...]:
    """The replicas of ``placement`` that are not in ``failed``, in pipeline order."""
    return tuple(address for address in placement.replicas if address not in failed)
