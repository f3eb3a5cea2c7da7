"""The admin handlers of the cluster manager: the server side of :mod:`wire.cluster_admin_ops`.

Served by the leader only, from the soft state of the current reign
(:meth:`metaserver.cluster_manager.ClusterManager.state`); a follower answers NOT_LEADER.

Rules of this file:

1. **The core decides.**  Admin actions change the soft state only through the core's
   public methods (``install_admin_modes``, ``probed``, ``release_replica``), so its safety
   rules hold for them too: nothing is deleted in safe mode, and a balancer move releases
   its source only while the chunk keeps its goal of counted replicas without it.
2. **Counted as the core counts.**  A replica counts toward a goal when it is a good
   (not corrupt) replica of the chunk's current version on a live or in-maintenance
   dataserver and no delete of it is queued (:func:`replica_counts`).
3. **The leader keeps serving.**  Passes over the whole replica map yield to other tasks
   every :data:`PASS_BATCH_CHUNKS` chunks and answer EAGAIN when the reign ended
   meanwhile.

:func:`cluster_services` is the ``extra_services`` hook of
:func:`metaserver.server.serve_metaserver`: the cluster manager plus these handlers.
"""

from __future__ import annotations

import errno
import heapq
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import trio

from metaserver.client_service import reply_or_raise
from metaserver.cluster_manager import ClusterManager, ExtraServices, cluster_manager_services
from metaserver.cluster_state import (
    COUNTED_STATES,
    READABLE_STATES,
    ChunkRef,
    ClusterCounters,
    ClusterState,
    DataserverStatus,
    ReadToken,
    ServerState,
)
from metaserver.replica import Replica
from wire.cluster_admin_ops import (
    CLUSTER_HEALTH,
    DATASERVER_PAGE_MAX,
    FILE_CHUNKS,
    FILE_CHUNKS_PAGE_MAX,
    LIST_DATASERVERS,
    LIST_REPLICAS,
    MATRIX_REPLICAS_MAX,
    MOVE_BEGIN,
    MOVE_COMMIT,
    REPLICA_PAGE_MAX,
    REPLICAS_LISTED_MAX,
    SET_DATASERVER_STATE,
    ChunkStatus,
    ClusterHealthReply,
    ClusterHealthRequest,
    DataserverPage,
    DataserverReport,
    FileChunksReply,
    FileChunksRequest,
    ListDataserversRequest,
    ListReplicasRequest,
    MatrixCell,
    MoveCommitRequest,
    MoveRequest,
    MoveResult,
    MoveTicket,
    RepairProgress,
    ReplicaHealth,
    ReplicaPage,
    SetDataserverStateRequest,
    StoredReplica,
)
from wire.config import Config
from wire.errors import RpcError
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.invariant import invariant
from wire.namespace_ops import (
    ROOT_CREDENTIALS,
    AttrReply,
    ChunkInfo,
    ChunkListReply,
    GetAttr,
    GetChunks,
)
from wire.rpc import CallContext, Handlers
from wire.tokens import AccessMode, ChunkToken, sign_token

MIB = 1024 * 1024
PASS_BATCH_CHUNKS = 20_000
"""Chunks examined between two yields in a pass over the replica map."""
RATE_SAMPLE_S = 1.0
"""Period of the repair-rate sampler."""
RATE_WINDOW_S = 30.0
"""The repair rate is measured over (at most) this much recent time."""
RATE_WINDOW_S_MIN = 2.0
"""No rate is given over less (the first seconds of a repair include its burst)."""
RATE_SAMPLES_MAX = int(RATE_WINDOW_S / RATE_SAMPLE_S) + 1
MOVE_HOLD_BASE_S = 30.0
MOVE_HOLD_RATE_BYTES_S = 4 * MIB
"""A balancer move holds its chunk's trims for base + length / rate; a move not
committed by then has its extra copy trimmed like any over-replication."""

_YOUNG_LEADER = "a new metaserver leader is collecting chunk reports; retry"


# ---------------------------------------------------------------- pure views of the state


def counts_toward_goal(
    state: ClusterState, chunk: ChunkId, dataserver: DataserverId, version: ChunkVersion
) -> bool:
    """True when ``dataserver``'s replica of ``chunk`` is a good one at ``version`` on a
    counted server and no delete of it is under way (rule 2)."""
    stored = state.replicas.get(chunk, {}).get(dataserver)
    return (
        stored is not None
        and stored.version == version
        and not stored.corrupt
        and state.state_of(dataserver) in COUNTED_STATES
        and not state.is_deleting(chunk, dataserver, version)
    )


def replica_counts(state: ClusterState, chunk: ChunkId, version: ChunkVersion) -> tuple[int, int]:
    """(counted, readable) good replicas of ``chunk`` at ``version`` (rule 2)."""
    counted = readable = 0
    for ds, stored in state.replicas.get(chunk, {}).items():
        if stored.version != version or stored.corrupt:
            continue
        if state.state_of(ds) in READABLE_STATES:
            readable += 1
        if counts_toward_goal(state, chunk, ds, version):
            counted += 1
    return counted, readable


def chunk_health(*, writing: bool, counted: int, readable: int, goal: int) -> str:
    """One of :data:`wire.cluster_admin_ops.CHUNK_HEALTHS`."""
    if writing:
        return "writing"
    if readable == 0:
        return "missing"
    if counted < goal:
        return "under-replicated"
    if counted > goal:
        return "over-replicated"
    return "healthy"


@dataclass
class HealthTally:
    """The chunk-health matrices and the repair work, accumulated chunk by chunk (a chunk
    whose missing replicas are presumed on a silent server in maintenance is no repair
    work: nothing will be copied for it)."""

    counted: Counter[tuple[int, int]] = field(default_factory=Counter)
    readable: Counter[tuple[int, int]] = field(default_factory=Counter)
    replicas_wanted: int = 0
    bytes_wanted: int = 0

    def add(self, state: ClusterState, chunk: ChunkId, ref: ChunkRef) -> None:
        if state.is_open(chunk):
            return
        version = state.current_version(chunk)
        invariant(version is not None, f"chunk {chunk:#x} tallied without a reference")
        assert version is not None
        counted, readable = replica_counts(state, chunk, version)
        self.counted[(ref.goal, min(counted, MATRIX_REPLICAS_MAX))] += 1
        self.readable[(ref.goal, min(readable, MATRIX_REPLICAS_MAX))] += 1
        if readable and counted < ref.goal and not state.held_for_maintenance(chunk):
            self.replicas_wanted += ref.goal - counted
            self.bytes_wanted += (ref.goal - counted) * ref.length_bytes

    @staticmethod
    def cells(tally: Counter[tuple[int, int]]) -> tuple[MatrixCell, ...]:
        return tuple(MatrixCell(goal, replicas, n) for (goal, replicas), n in sorted(tally.items()))


def drain_remaining(state: ClusterState, dataserver: DataserverId) -> tuple[int, int]:
    """(chunks, bytes) with a good current replica on ``dataserver`` that lack their goal
    of counted replicas elsewhere: what a decommission must still copy."""
    chunks = length = 0
    for chunk in state.servers[dataserver].chunks:
        ref = state.refs.get(chunk)
        if ref is None:
            continue
        version = state.current_version(chunk)
        stored = state.replicas.get(chunk, {}).get(dataserver)
        if stored is None or stored.version != version or stored.corrupt:
            continue
        counted, _ = replica_counts(state, chunk, stored.version)
        if counts_toward_goal(state, chunk, dataserver, stored.version):
            counted -= 1  # only the copies elsewhere
        if counted < ref.goal:
            chunks += 1
            length += stored.length_bytes
    return chunks, length


def dataserver_report(
    state: ClusterState, status: DataserverStatus, now_s: float
) -> DataserverReport:
    drain_chunks = drain_bytes = 0
    if status.state is ServerState.DECOMMISSIONING:
        drain_chunks, drain_bytes = drain_remaining(state, status.dataserver_id)
    return DataserverReport(
        dataserver_id=status.dataserver_id,
        address=status.address,
        state=status.state.value,
        capacity_bytes=status.space.capacity_bytes,
        used_bytes=status.space.used_bytes,
        available_bytes=status.space.available_bytes,
        replicas=status.replicas,
        silent_ms=round(status.silent_s * 1000),
        active_reads=status.active_reads,
        active_writes=status.active_writes,
        commands_queued=status.commands_queued,
        copies_in=status.copies_in,
        copies_out=status.copies_out,
        drain_chunks=drain_chunks,
        drain_bytes=drain_bytes,
        decommissioned=status.state is ServerState.DECOMMISSIONING
        and drain_chunks == 0
        and not state.safe_mode(now_s),
    )


def chunk_status(
    state: ClusterState,
    info: ChunkInfo,
    goal: int,
    token: ReadToken,
) -> ChunkStatus:
    """One chunk of a file as the replica map knows it; ``goal`` is the file's."""
    current, _ = state.locate(info.chunk, info.version)
    counted, readable = replica_counts(state, info.chunk, current)
    holders = state.replicas.get(info.chunk, {})
    ordered = sorted(holders.items(), key=lambda item: (item[1].version != current, item[0]))
    replicas = tuple(
        ReplicaHealth(
            dataserver_id=ds,
            address=state.address(ds),
            server_state=state.state_of(ds).value,
            version=stored.version,
            length_bytes=stored.length_bytes,
            corrupt=stored.corrupt,
            stale=stored.version != current,
            counted=counts_toward_goal(state, info.chunk, ds, current),
            deleting=state.is_deleting(info.chunk, ds, stored.version),
        )
        for ds, stored in ordered[:REPLICAS_LISTED_MAX]
    )
    return ChunkStatus(
        index=info.index,
        chunk=info.chunk,
        version=info.version,
        current_version=current,
        length=info.length,
        goal=goal,
        health=chunk_health(
            writing=state.is_open(info.chunk), counted=counted, readable=readable, goal=goal
        ),
        counted=counted,
        readable=readable,
        replicas=replicas,
        replicas_unlisted=max(0, len(ordered) - REPLICAS_LISTED_MAX),
        copying_to=tuple(state.address(job.target) for job in state.copies.get(info.chunk, ())),
        token=token(info.chunk, current),
    )


def stored_replica(state: ClusterState, chunk: ChunkId, dataserver: DataserverId) -> StoredReplica:
    """One replica on ``dataserver`` for the balancer, with whether it may move."""
    stored = state.replicas[chunk][dataserver]
    ref = state.refs.get(chunk)
    holders = tuple(sorted(state.replicas[chunk]))
    return StoredReplica(
        chunk=chunk,
        version=stored.version,
        length_bytes=stored.length_bytes,
        goal=0 if ref is None else ref.goal,
        movable=ref is not None and move_refusal(state, chunk, stored.version, dataserver) is None,
        holders=holders,
    )


def move_refusal(
    state: ClusterState, chunk: ChunkId, version: ChunkVersion, source: DataserverId
) -> tuple[int, str] | None:
    """Why the replica of ``chunk`` on ``source`` may not move now, as (errno, reason);
    None when it may."""
    ref = state.refs.get(chunk)
    if ref is None:
        return errno.ENOENT, f"no file references chunk {chunk:#x}"
    current = state.current_version(chunk)
    if current != version:
        return errno.ESTALE, f"chunk {chunk:#x}: version {version} is not current ({current})"
    if state.is_open(chunk):
        return errno.EBUSY, f"chunk {chunk:#x} is being written"
    if state.copies.get(chunk):
        return errno.EBUSY, f"chunk {chunk:#x} is being copied"
    if state.trims_held(chunk):
        return errno.EBUSY, f"chunk {chunk:#x} is being moved"
    stored = state.replicas.get(chunk, {}).get(source)
    if stored is None or stored.version != version or stored.corrupt:
        return errno.EINVAL, f"dataserver {source:016x} has no good replica of chunk {chunk:#x}"
    if state.state_of(source) not in READABLE_STATES:
        return errno.EINVAL, f"dataserver {source:016x} is {state.state_of(source).value}"
    if any(
        state.is_deleting(chunk, ds, held.version) for ds, held in state.replicas[chunk].items()
    ):
        return errno.EBUSY, f"chunk {chunk:#x} has a replica being deleted"
    counted, _ = replica_counts(state, chunk, version)
    if counted < ref.goal:
        return errno.EBUSY, f"chunk {chunk:#x} is below its goal (healing comes first)"
    return None


# ---------------------------------------------------------------- the repair rate


@dataclass
class RepairRate:
    """Recent samples of the reign's copied bytes: the copy rate over (at most
    :data:`RATE_WINDOW_S` of) the current repair episode, which began when the cluster was
    last seen with nothing to repair."""

    samples: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=RATE_SAMPLES_MAX)
    )
    epoch: int | None = None
    episode_start_bytes: int = 0

    def sample(self, now_s: float, counters: ClusterCounters) -> None:
        if counters.epoch != self.epoch:
            self.samples.clear()
            self.epoch = counters.epoch
            self.episode_start_bytes = 0
        idle = (
            counters.under_replicated == 0
            and counters.replication_queue == 0
            and counters.copies_in_flight == 0
        )
        if idle:
            # The rate is measured within a repair episode: idle time would dilute it.
            self.episode_start_bytes = counters.bytes_copied
            self.samples.clear()
        self.samples.append((now_s, counters.bytes_copied))

    def rate_bytes_s(self) -> tuple[float, float]:
        """(bytes per second, over how many seconds) in the window; (0, 0) when unknown."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        (first_s, first_bytes), (last_s, last_bytes) = self.samples[0], self.samples[-1]
        window_s = last_s - first_s
        if window_s < RATE_WINDOW_S_MIN:
            return 0.0, 0.0
        return max(0, last_bytes - first_bytes) / window_s, window_s

    def progress(
        self, counters: ClusterCounters, tally: HealthTally, cap_bytes_s: float
    ) -> RepairProgress:
        rate, window_s = self.rate_bytes_s() if counters.epoch == self.epoch else (0.0, 0.0)
        episode_start = self.episode_start_bytes if counters.epoch == self.epoch else 0
        eta_s = None
        if tally.bytes_wanted > 0:
            eta_s = tally.bytes_wanted / (rate if rate > 0 else cap_bytes_s)
        return RepairProgress(
            queued_chunks=counters.replication_queue,
            copies_in_flight=counters.copies_in_flight,
            copies_done=counters.copies_done,
            copies_failed=counters.copies_failed,
            bytes_copied=counters.bytes_copied,
            replicas_wanted=tally.replicas_wanted,
            bytes_wanted=tally.bytes_wanted,
            episode_bytes_copied=max(0, counters.bytes_copied - episode_start),
            rate_bytes_s=rate,
            rate_window_s=window_s,
            rate_cap_bytes_s=cap_bytes_s,
            eta_s=eta_s,
        )


# ---------------------------------------------------------------- the handlers


class ClusterAdmin:
    """The admin handlers of one metaserver replica (they answer while it leads)."""

    def __init__(
        self,
        manager: ClusterManager,
        replica: Replica,
        key: bytes,
        *,
        copy_rate_cap_bytes_s: float,
    ) -> None:
        self._manager = manager
        self._replica = replica
        self._key = key
        self._cap_bytes_s = copy_rate_cap_bytes_s
        self._rate = RepairRate()

    def register_handlers(self, handlers: Handlers) -> None:
        handlers.register(CLUSTER_HEALTH, self._handle_health)
        handlers.register(LIST_DATASERVERS, self._handle_list_dataservers)
        handlers.register(SET_DATASERVER_STATE, self._handle_set_state)
        handlers.register(FILE_CHUNKS, self._handle_file_chunks)
        handlers.register(LIST_REPLICAS, self._handle_list_replicas)
        handlers.register(MOVE_BEGIN, self._handle_move_begin)
        handlers.register(MOVE_COMMIT, self._handle_move_commit)

    async def run(self) -> None:
        """Sample the repair rate until cancelled (idle while not leader)."""
        while True:
            await trio.sleep(RATE_SAMPLE_S)
            counters = self._manager.counters()
            if counters is not None:
                self._rate.sample(trio.current_time(), counters)

    def _read_token(self, chunk: ChunkId, version: ChunkVersion) -> ChunkToken:
        return sign_token(self._key, chunk, version, AccessMode.READ, time.time())

    async def _handle_health(
        self, _request: ClusterHealthRequest, _context: CallContext
    ) -> ClusterHealthReply:
        state = self._manager.state()
        tally = HealthTally()
        chunks = list(state.refs)
        for start in range(0, len(chunks), PASS_BATCH_CHUNKS):
            if start:
                await trio.sleep(0)
                if self._manager.state() is not state:
                    raise RpcError(errno.EAGAIN, "the leader's reign ended during the pass")
            for chunk in chunks[start : start + PASS_BATCH_CHUNKS]:
                ref = state.refs.get(chunk)
                if ref is not None:
                    tally.add(state, chunk, ref)
        now_s = trio.current_time()
        counters = state.counters(now_s)
        return ClusterHealthReply(
            epoch=counters.epoch,
            safe_mode=counters.safe_mode,
            scans_completed=counters.scans_completed,
            dataservers_live=counters.dataservers_live,
            dataservers_dead=counters.dataservers_dead,
            dataservers_decommissioning=counters.dataservers_decommissioning,
            dataservers_maintenance=counters.dataservers_maintenance,
            chunks_referenced=counters.chunks_referenced,
            chunks_with_replicas=counters.chunks_with_replicas,
            under_replicated=counters.under_replicated,
            over_replicated=counters.over_replicated,
            missing=counters.missing,
            orphans=counters.orphans,
            corrupt_replicas=counters.corrupt_replicas,
            writes_in_flux=counters.writes_in_flux,
            deletion_queue=counters.deletion_queue,
            deletes_sent=counters.deletes_sent,
            matrix=HealthTally.cells(tally.counted),
            matrix_readable=HealthTally.cells(tally.readable),
            repair=self._rate.progress(counters, tally, self._cap_bytes_s),
        )

    async def _handle_list_dataservers(
        self, request: ListDataserversRequest, _context: CallContext
    ) -> DataserverPage:
        state = self._manager.state()
        now_s = trio.current_time()
        limit = max(1, min(request.limit, DATASERVER_PAGE_MAX))
        statuses = [s for s in state.dataservers(now_s) if s.dataserver_id > request.after]
        reports = []
        for status in statuses[:limit]:
            reports.append(dataserver_report(state, status, now_s))
            await trio.sleep(0)
            if self._manager.state() is not state:
                raise RpcError(errno.EAGAIN, "the leader's reign ended during the listing")
        return DataserverPage(state.safe_mode(now_s), tuple(reports), len(statuses) > limit)

    async def _handle_set_state(
        self, request: SetDataserverStateRequest, _context: CallContext
    ) -> DataserverReport:
        await self._manager.set_admin_mode(request.dataserver_id, request.mode)
        state = self._manager.state()
        now_s = trio.current_time()
        status = next(
            s for s in state.dataservers(now_s) if s.dataserver_id == request.dataserver_id
        )
        return dataserver_report(state, status, now_s)

    async def _handle_file_chunks(
        self, request: FileChunksRequest, _context: CallContext
    ) -> FileChunksReply:
        self._manager.state()
        await self._replica.confirm_read()
        limit = max(1, min(request.limit, FILE_CHUNKS_PAGE_MAX))
        namespace = self._replica.namespace
        page = reply_or_raise(
            namespace.query(GetChunks(request.inode, request.first_index, limit), ROOT_CREDENTIALS)
        )
        invariant(isinstance(page, ChunkListReply), f"GetChunks answered {type(page).__name__}")
        attr = reply_or_raise(namespace.query(GetAttr(request.inode), ROOT_CREDENTIALS))
        invariant(isinstance(attr, AttrReply), f"GetAttr answered {type(attr).__name__}")
        state = self._manager.state()
        goal = attr.attr.goal
        chunks = tuple(chunk_status(state, info, goal, self._read_token) for info in page.chunks)
        return FileChunksReply(
            safe_mode=state.safe_mode(trio.current_time()),
            size=page.size,
            chunk_size=page.chunk_size,
            goal=goal,
            chunks=chunks,
            more=page.more,
        )

    async def _handle_list_replicas(
        self, request: ListReplicasRequest, _context: CallContext
    ) -> ReplicaPage:
        state = self._manager.state()
        record = state.servers.get(request.dataserver_id)
        if record is None:
            raise RpcError(errno.ENOENT, f"no dataserver {request.dataserver_id:016x}")
        limit = max(1, min(request.limit, REPLICA_PAGE_MAX))
        chunks = heapq.nsmallest(limit + 1, (c for c in record.chunks if c > request.after))
        replicas = tuple(
            stored_replica(state, chunk, request.dataserver_id) for chunk in chunks[:limit]
        )
        return ReplicaPage(state.safe_mode(trio.current_time()), replicas, len(chunks) > limit)

    def _known_servers(self, state: ClusterState, move: MoveRequest) -> float:
        """The time now; EAGAIN in safe mode, ENOENT for an unknown dataserver."""
        now_s = trio.current_time()
        if state.safe_mode(now_s):
            raise RpcError(errno.EAGAIN, _YOUNG_LEADER)
        for ds in (move.source, move.target):
            if ds not in state.servers:
                raise RpcError(errno.ENOENT, f"no dataserver {ds:016x}")
        return now_s

    async def _handle_move_begin(self, request: MoveRequest, _context: CallContext) -> MoveTicket:
        state = self._manager.state()
        now_s = self._known_servers(state, request)
        if request.source == request.target:
            raise RpcError(errno.EINVAL, "the source and the target are the same dataserver")
        refusal = move_refusal(state, request.chunk, request.version, request.source)
        if refusal is not None:
            raise RpcError(*refusal)
        target_state = state.state_of(request.target)
        if target_state is not ServerState.LIVE:
            raise RpcError(
                errno.EINVAL, f"dataserver {request.target:016x} is {target_state.value}"
            )
        if request.target in state.replicas[request.chunk]:
            raise RpcError(
                errno.EINVAL,
                f"dataserver {request.target:016x} already stores chunk {request.chunk:#x}",
            )
        length = state.replicas[request.chunk][request.source].length_bytes
        hold_s = MOVE_HOLD_BASE_S + length / MOVE_HOLD_RATE_BYTES_S
        if not state.hold_trims(request.chunk, now_s + hold_s):
            raise RpcError(errno.EBUSY, "too many moves under way; retry")
        return MoveTicket(
            state.address(request.source),
            state.address(request.target),
            length,
            self._read_token(request.chunk, request.version),
        )

    async def _handle_move_commit(
        self, request: MoveCommitRequest, _context: CallContext
    ) -> MoveResult:
        state = self._manager.state()
        move = request.move
        now_s = self._known_servers(state, move)
        held = state.replicas.get(move.chunk, {}).get(move.target)
        if (
            state.current_version(move.chunk) == move.version
            and not state.is_open(move.chunk)
            and (held is None or held.version < move.version)
        ):
            state.probed(move.chunk, move.version, move.target, request.length_bytes, now_s)
        reason = state.release_replica(move.chunk, move.version, move.source, now_s)
        return MoveResult(reason is None, reason or "")


def cluster_services(config: Config) -> ExtraServices:
    """The hook for :func:`metaserver.server.serve_metaserver`: the cluster manager of
    :func:`~metaserver.cluster_manager.cluster_manager_services` and its admin handlers."""
    key = config.cluster_key()
    cap_bytes_s = config.metaserver.replication_rate_mib_s * MIB

    def install(replica: Replica, handlers: Handlers, nursery: trio.Nursery) -> None:
        managers: list[ClusterManager] = []
        cluster_manager_services(config, started=managers.append)(replica, handlers, nursery)
        invariant(len(managers) == 1, "the cluster manager did not start")
        admin = ClusterAdmin(managers[0], replica, key, copy_rate_cap_bytes_s=cap_bytes_s)
        admin.register_handlers(handlers)
        nursery.start_soon(admin.run)

    return install
