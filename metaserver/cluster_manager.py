"""The metaserver leader's cluster manager: dataservers, replica locations, placement, healing.

Leader only, soft state.  The decisions live in the pure core
(:class:`metaserver.cluster_state.ClusterState`, whose module docstring gives the rules);
this module is its trio shell:

* **Handlers** of :mod:`wire.cluster_ops` (dataservers: register, full reports,
  heartbeats carrying commands back, corrupt replicas) and of :mod:`wire.data_ops`
  (clients: open for write, locate, bad replicas, space).  A follower answers every one
  with ``RpcError(NOT_LEADER, leader address)``.
* **Reigns.**  Whenever this replica becomes leader anew (``replica.leader_epoch``
  moved), a fresh ``ClusterState`` starts empty, in safe mode; its epoch, sent to
  dataservers, is derived from the leader's ballot, so it differs between any two reigns
  of the group and every dataserver re-registers and sends a full report.
* **Dataserver modes are durable.**  Decommission and maintenance live in the
  namespace's replicated table (``SetDataserverMode`` through the log, answered once
  committed); every reign installs that table (after a linearizable read) at once and
  again every tick, so a new leader carries on a drain and keeps a dataserver in
  maintenance from being re-replicated.
* **Background tasks while leader**: a tick (dead dataservers, re-examination of changed
  chunks, copies within ``[metaserver] replication_rate_mib_s``), namespace scans (the
  chunk view: version, length and goal of every referenced chunk), and the drain of the
  namespace's deletion queue (``GetDeletions`` → deletes in heartbeat replies →
  ``AckDeletions`` through the log).
* **Open versions** (cluster-state rules 5 and 8): write tokens live
  ``[metaserver] chunk_token_lifetime_s`` from the open of their version (its log
  command's time), so once that plus twice ``clock_skew_s`` has passed no dataserver
  accepts one; a version still open then is recovered (``RecoverChunk``, a fencing sync
  on one replica, ``CommitRecovery``) by a background task.
* **Top-up copies** for write chains: an existing chunk whose live holders are fewer
  than its goal gets the base version copied to new servers (``data.replicate``) before
  the chain is handed out, when the base is small enough to copy within the call.

:func:`cluster_manager_services` returns the hook that
:func:`metaserver.server.serve_metaserver` takes as ``extra_services``.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from metaserver.client_service import reply_or_raise
from metaserver.cluster_state import (
    COLLECTING_REPORTS,
    ChunkRef,
    ClusterCounters,
    ClusterState,
    DataserverStatus,
    Recovery,
    RequestRefused,
    StateOptions,
    UnknownDataserver,
)
from metaserver.peers import peer_name
from metaserver.replica import Replica
from wire.cluster_admin_ops import DataserverMode
from wire.cluster_ops import (
    FULL_REPORT,
    HEARTBEAT,
    REGISTER,
    REPORT_CORRUPT,
    Ack,
    CorruptReplicaRequest,
    FullReportReply,
    FullReportRequest,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterReply,
    RegisterRequest,
)
from wire.config import Config, ConfigError
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
from wire.dataserver_ops import (
    CHUNK_INFO,
    PIPELINE_MEMBERS_MAX,
    REPLICATE,
    SYNC,
    ChunkInfoRequest,
    PeerConnections,
    ReplicateRequest,
    SyncRequest,
)
from wire.errors import RpcError
from wire.ids import ChunkId, ChunkVersion, DataserverId, InodeId
from wire.invariant import invariant
from wire.namespace_ops import (
    CHUNK_PAGE_MAX,
    ROOT_CREDENTIALS,
    AckDeletions,
    ChunkListReply,
    ChunkReply,
    ChunkScanReply,
    ClientCommand,
    CommitRecovery,
    DataserverModeEntry,
    DataserverModesReply,
    DeletionsReply,
    GetChunks,
    GetDataserverModes,
    GetDeletions,
    OpenChunk,
    RecoverChunk,
    ScanChunks,
    SetDataserverMode,
    SystemCommand,
)
from wire.rpc import CallContext, Handlers
from wire.tokens import (
    CLOCK_SKEW_S,
    TOKEN_LIFETIME_S,
    AccessMode,
    ChunkToken,
    accepted_until_s,
    sign_token,
)

log = logging.getLogger("metaserver.cluster")

MIB = 1024 * 1024
SCAN_INTERVAL_S_MIN = 0.25
SCAN_INTERVAL_S_MAX = 30.0
TICK_S_MIN = 0.05
TICK_S_MAX = 1.0
PLAN_SHARE_OF_TICK = 0.2
"""Share of each tick that planning (re-examining chunks) may take before yielding until
the next tick, so a scan of a huge namespace never starves client requests."""
SCAN_IDLE_FACTOR = 9
"""A namespace scan is followed by at least this many times its duration of idleness,
so scans take at most a tenth of the leader's time."""
TOPUP_BYTES_MAX = 64 * MIB
"""Largest base version copied to a new server while an open for write waits."""
TOPUP_TIMEOUT_S = 2.0
"""A top-up copy not done by then is left out of the chain (re-replication follows)."""
PROBE_TIMEOUT_S = 1.0
"""A chain member that does not say within this which version it holds is left out."""
EXCLUDE_MAX = PIPELINE_MEMBERS_MAX * 4
"""Addresses one open for write may exclude."""
FENCE_TIMEOUT_S = 10.0
"""A recovery's sync on its chosen replica not answered by then fails (retried later);
also the life of the write token that sync carries."""

ExtraServices = Callable[[Replica, Handlers, trio.Nursery], None]


@dataclass(frozen=True)
class ClusterManagerOptions:
    """Timing of the cluster manager (see :meth:`from_config` for the defaults' origin)."""

    dead_after_s: float = 30.0
    """Heartbeat silence after which a dataserver is dead."""
    grace_s: float = 30.0
    """Safe mode after becoming leader: reports arrive, nothing is deleted or copied."""
    token_lifetime_s: float = TOKEN_LIFETIME_S
    """Life of the write tokens this leader signs (from the open of the version)."""
    clock_skew_s: float = CLOCK_SKEW_S
    """How far apart the cluster's wall clocks may be."""
    scan_interval_s: float = 7.5
    """Pause between two namespace scans (and the minimum age of garbage)."""
    tick_s: float = 1.0
    """Period of liveness checks, planning, and deletion-queue drains."""
    copy_rate_bytes_s: float = 200 * MIB
    """Cap on re-replication traffic."""

    @classmethod
    def from_config(cls, config: Config) -> ClusterManagerOptions:
        """Timing follows ``[metaserver] dataserver_dead_after_s``: the grace period
        equals it (a dataserver has then had its chance to report), scans run four times
        per period, ticks ten times (bounded).  Tokens follow ``chunk_token_lifetime_s``
        and ``clock_skew_s``."""
        settings = config.metaserver
        dead_after_s = settings.dataserver_dead_after_s
        rate_mib_s = settings.replication_rate_mib_s
        if dead_after_s <= 0:
            raise ConfigError(f"{config.source}: [metaserver] dataserver_dead_after_s must be > 0")
        if rate_mib_s <= 0:
            raise ConfigError(f"{config.source}: [metaserver] replication_rate_mib_s must be > 0")
        if settings.chunk_token_lifetime_s <= 0:
            raise ConfigError(f"{config.source}: [metaserver] chunk_token_lifetime_s must be > 0")
        if settings.clock_skew_s < 0:
            raise ConfigError(f"{config.source}: [metaserver] clock_skew_s must be >= 0")
        return cls(
            dead_after_s=dead_after_s,
            grace_s=dead_after_s,
            token_lifetime_s=settings.chunk_token_lifetime_s,
            clock_skew_s=settings.clock_skew_s,
            scan_interval_s=min(SCAN_INTERVAL_S_MAX, max(SCAN_INTERVAL_S_MIN, dead_after_s / 4)),
            tick_s=min(TICK_S_MAX, max(TICK_S_MIN, dead_after_s / 10)),
            copy_rate_bytes_s=rate_mib_s * MIB,
        )


class ClusterManager:
    """The cluster manager of one metaserver replica (active while it leads)."""

    def __init__(
        self,
        replica: Replica,
        key: bytes,
        options: ClusterManagerOptions,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._replica = replica
        self._key = key
        self._options = options
        self._rng = rng or random.Random()
        self._state: ClusterState | None = None
        self._reign: int | None = None
        self._peers: PeerConnections | None = None
        self._last_summary: tuple[int, ...] = ()
        self._reign_began = trio.Event()
        self._installed_modes: tuple[ClusterState | None, tuple[DataserverModeEntry, ...]] = (
            None,
            (),
        )

    # ------------------------------------------------------------------ public API

    def register_handlers(self, handlers: Handlers) -> None:
        """Serve the cluster protocol and the client data-path calls."""
        handlers.register(REGISTER, self._handle_register)
        handlers.register(HEARTBEAT, self._handle_heartbeat)
        handlers.register(FULL_REPORT, self._handle_full_report)
        handlers.register(REPORT_CORRUPT, self._handle_report_corrupt)
        handlers.register(OPEN_FOR_WRITE, self._handle_open_for_write)
        handlers.register(LOCATE, self._handle_locate)
        handlers.register(REPORT_BAD_REPLICA, self._handle_report_bad_replica)
        handlers.register(SPACE, self._handle_space)

    async def run(self) -> None:
        """The background tasks; run until cancelled (they idle while not leader)."""
        async with trio.open_nursery() as nursery:
            self._peers = PeerConnections(
                self._key, nursery, name=peer_name(self._replica.node.node_id)
            )
            nursery.start_soon(self._each_tick, "planning", self._plan)
            nursery.start_soon(self._scan_loop)
            nursery.start_soon(self._each_tick, "draining deletions", self._drain_deletions)
            nursery.start_soon(self._modes_loop)
            nursery.start_soon(self._each_tick, "recovering open chunks", self._recover_due)

    def counters(self) -> ClusterCounters | None:
        """The health counters of the current reign (None when not leader)."""
        state = self._state_if_leader()
        return None if state is None else state.counters(trio.current_time())

    def dataservers(self) -> list[DataserverStatus] | None:
        """Every registered dataserver of the current reign (None when not leader)."""
        state = self._state_if_leader()
        return None if state is None else state.dataservers(trio.current_time())

    async def set_admin_mode(self, dataserver: DataserverId, mode: DataserverMode) -> None:
        """Decommission a dataserver, put it in maintenance, or make it normal again:
        through the log, so that every later reign keeps it; returns once committed and
        installed in this reign.  ENOENT for a dataserver neither registered in this reign
        nor in the mode table."""
        state = self._current()
        rows = {row.dataserver: row for row in self._mode_rows()}
        if dataserver in state.servers:
            address = state.servers[dataserver].address
        elif dataserver in rows:
            address = rows[dataserver].address
        else:
            raise RpcError(errno.ENOENT, f"dataserver {dataserver:#x} is not registered")
        command = SystemCommand(time.time_ns(), SetDataserverMode(dataserver, mode, address))
        reply_or_raise(await self._replica.submit(command))
        log.info("dataserver %016x: mode %s committed", dataserver, mode.name.lower())
        await self._install_modes(self._current())

    def state(self) -> ClusterState:
        """The soft state of the current reign, for the admin handlers of
        :mod:`metaserver.cluster_admin` (raises ``NOT_LEADER`` on a follower)."""
        return self._current()

    # ------------------------------------------------------------------ reigns

    def _current(self) -> ClusterState:
        """The state of this reign; raises NOT_LEADER on a follower."""
        replica = self._replica
        if not replica.is_leader:
            self._state = None
            raise replica.not_leader()
        if self._state is None or self._reign != replica.leader_epoch:
            self._reign = replica.leader_epoch
            self._state = ClusterState(
                StateOptions(
                    dead_after_s=self._options.dead_after_s,
                    grace_s=self._options.grace_s,
                    open_max_s=accepted_until_s(
                        0.0, self._options.token_lifetime_s, self._options.clock_skew_s
                    ),
                    copy_rate_bytes_s=self._options.copy_rate_bytes_s,
                    chunk_size_bytes=replica.namespace.config.chunk_size_bytes,
                ),
                epoch=self._wire_epoch(),
                started_s=trio.current_time(),
                rng=self._rng,
                read_token=self._read_token,
                admin_modes=None,
            )
            self._reign_began.set()
            log.info(
                "leading the cluster (epoch %#x); safe mode for %.1f s",
                self._state.epoch,
                self._options.grace_s,
            )
        return self._state

    def _state_if_leader(self) -> ClusterState | None:
        try:
            return self._current()
        except RpcError:
            return None

    def _wire_epoch(self) -> int:
        """Unique per reign in the whole group: the leader's ballot (round, node)."""
        ballot = self._replica.node.status().leader_ballot
        if ballot is None:
            return self._replica.leader_epoch
        invariant(0 <= ballot.node < 1 << 32, f"node id {ballot.node} does not fit an epoch")
        return (ballot.round << 32) | ballot.node

    def _read_token(self, chunk: ChunkId, version: ChunkVersion) -> ChunkToken:
        return sign_token(self._key, chunk, version, AccessMode.READ, time.time())

    # ------------------------------------------------------------------ dataservers

    async def _handle_register(
        self, request: RegisterRequest, _context: CallContext
    ) -> RegisterReply:
        state = self._current()
        try:
            state.register(request, trio.current_time())
        except RequestRefused as error:
            raise RpcError(error.code, error.message) from None
        log.info(
            "dataserver %016x registered from %s (%d bytes available)",
            request.dataserver_id,
            request.address,
            request.space.available_bytes,
        )
        return RegisterReply(state.epoch)

    async def _handle_heartbeat(
        self, request: HeartbeatRequest, _context: CallContext
    ) -> HeartbeatReply:
        state = self._current()
        try:
            commands = state.heartbeat(request, trio.current_time())
        except UnknownDataserver as error:
            raise RpcError(errno.ENOENT, str(error)) from None
        except RequestRefused as error:
            raise RpcError(error.code, error.message) from None
        return HeartbeatReply(state.epoch, commands)

    async def _handle_full_report(
        self, request: FullReportRequest, _context: CallContext
    ) -> FullReportReply:
        state = self._current()
        try:
            state.full_report(request, trio.current_time())
        except UnknownDataserver as error:
            raise RpcError(errno.ENOENT, str(error)) from None
        except RequestRefused as error:
            raise RpcError(error.code, error.message) from None
        if request.final:
            log.info(
                "dataserver %016x: full report of %d replicas",
                request.dataserver_id,
                len(state.servers[request.dataserver_id].chunks),
            )
        return FullReportReply(state.epoch)

    async def _handle_report_corrupt(
        self, request: CorruptReplicaRequest, context: CallContext
    ) -> Ack:
        state = self._current()
        # The holder's own finding is authoritative; anyone else's is a client's report.
        holder = request.dataserver_id != 0 and context.connection.peer_name == (
            f"dataserver-{request.dataserver_id:016x}"
        )
        marked = state.report_corrupt(
            request.chunk_id,
            request.version,
            request.dataserver_id or None,
            request.dataserver_address,
            authoritative=holder,
        )
        log.warning(
            "chunk %#x v%d on %s reported corrupt by %s (%s)%s",
            request.chunk_id,
            request.version,
            request.dataserver_address,
            request.reporter[:64],
            request.reason[:200],
            "" if marked else "; not marked",
        )
        return Ack()

    # ------------------------------------------------------------------ clients

    async def _handle_open_for_write(
        self, request: OpenForWrite, _context: CallContext
    ) -> WritableChunk:
        op = request.call.op
        if type(op) is not OpenChunk:
            raise RpcError(errno.EPROTO, f"{type(op).__name__} cannot travel as open_for_write")
        if len(request.exclude) > EXCLUDE_MAX:
            raise RpcError(errno.EINVAL, f"more than {EXCLUDE_MAX} excluded dataservers")
        self._current()
        command = ClientCommand(time.time_ns(), request.call)
        reply = reply_or_raise(await self._replica.submit(command))
        invariant(isinstance(reply, ChunkReply), f"OpenChunk answered {type(reply).__name__}")
        opened_ns = self._opened_ns(op, reply, command.time_ns)
        state = self._current()
        excluded = [state.dataserver_id(address) for address in request.exclude]
        if reply.version > 1:
            previous = ChunkVersion(reply.version - 1)
            unsure = [
                ds for ds in state.unconfirmed_members(reply.chunk, previous) if ds not in excluded
            ]
            if unsure:
                await self._probe(state, reply.chunk, previous, unsure)
                state = self._current()
        try:
            plan = state.grant_write(
                reply.chunk,
                reply.version,
                reply.length,
                reply.goal,
                [ds for ds in excluded if ds is not None],
                trio.current_time(),
                opened_ns=opened_ns,
            )
        except RequestRefused as error:
            raise RpcError(error.code, error.message) from None
        chain = plan.chain
        if plan.topups and plan.base is not None and plan.base_length_bytes <= TOPUP_BYTES_MAX:
            chain = await self._top_up(state, reply.chunk, plan.base, plan.topups, chain)
        if not chain:
            log.warning("chunk %#x v%d: no dataserver to write to", reply.chunk, reply.version)
        token = sign_token(
            self._key,
            reply.chunk,
            reply.version,
            AccessMode.WRITE,
            opened_ns / 1e9,
            lifetime_s=self._options.token_lifetime_s,
            clock_skew_s=self._options.clock_skew_s,
        )
        return WritableChunk(
            op.index,
            reply.chunk,
            reply.version,
            plan.base,
            reply.length,
            reply.goal,
            reply.compress,
            tuple(state.address(ds) for ds in chain),
            token,
        )

    def _opened_ns(self, op: OpenChunk, reply: ChunkReply, command_ns: int) -> int:
        """When the namespace opened the version ``reply`` names: a write token's life is
        counted from then, so that the leader knows when none is accepted any more (a
        retried open gets the first open's reply, and its time).  The command's own time
        when the version is no longer open (nobody can commit it then)."""
        page = self._replica.namespace.query(ScanChunks(op.inode, op.index, 1), ROOT_CREDENTIALS)
        if isinstance(page, ChunkScanReply):
            for entry in page.entries:
                if (
                    entry.chunk == reply.chunk
                    and entry.version == reply.version
                    and entry.opened_ns is not None
                ):
                    return min(entry.opened_ns, command_ns)
        return command_ns

    async def _probe(
        self,
        state: ClusterState,
        chunk: ChunkId,
        version: ChunkVersion,
        members: list[DataserverId],
    ) -> None:
        """Ask ``members`` whether they hold ``version`` of ``chunk`` (``data.info``)."""
        peers = self._peers
        if peers is None:
            return
        token = self._read_token(chunk, version)
        found: dict[DataserverId, int | None] = {}

        async def probe(ds: DataserverId) -> None:
            try:
                reply, _ = await peers.call(
                    state.address(ds),
                    CHUNK_INFO,
                    ChunkInfoRequest(chunk, version, token),
                    timeout_s=PROBE_TIMEOUT_S,
                )
            except RpcError:
                found[ds] = None
                return
            found[ds] = reply.length_bytes

        async with trio.open_nursery() as nursery:
            for ds in members:
                nursery.start_soon(probe, ds)
        if self._state is state:
            for ds, length in found.items():
                state.probed(chunk, version, ds, length, trio.current_time())

    async def _top_up(
        self,
        state: ClusterState,
        chunk: ChunkId,
        base: ChunkVersion,
        topups: tuple[tuple[DataserverId, DataserverId], ...],
        chain: tuple[DataserverId, ...],
    ) -> tuple[DataserverId, ...]:
        """Copy the base version to new servers so they can join the chain."""
        peers = self._peers
        if peers is None:
            return chain
        token = self._read_token(chunk, base)
        landed: list[tuple[DataserverId, int]] = []

        async def copy(target: DataserverId, source: DataserverId) -> None:
            try:
                reply, _ = await peers.call(
                    state.address(target),
                    REPLICATE,
                    ReplicateRequest(chunk, base, state.address(source), token),
                    timeout_s=TOPUP_TIMEOUT_S,
                )
            except RpcError as error:
                log.info("chunk %#x: top-up copy to %s failed: %s", chunk, target, error)
                return
            landed.append((target, reply.length_bytes))

        async with trio.open_nursery() as nursery:
            for target, source in topups:
                nursery.start_soon(copy, target, source)
        if self._state is not state or chunk not in state.grants:
            return chain
        for target, length in landed:
            chain = state.topup_done(chunk, base, target, length, trio.current_time())
        return chain

    async def _handle_locate(self, request: Locate, _context: CallContext) -> Located:
        op = request.call.op
        if type(op) is not GetChunks:
            raise RpcError(errno.EPROTO, f"{type(op).__name__} cannot travel as locate")
        self._current()
        await self._replica.confirm_read()
        reply = reply_or_raise(self._replica.namespace.query(op, request.call.credentials))
        invariant(isinstance(reply, ChunkListReply), f"GetChunks answered {type(reply).__name__}")
        state = self._current()
        young = state.safe_mode(trio.current_time())
        located = []
        for info in reply.chunks:
            version, holders = state.locate(info.chunk, info.version)
            if not holders and young:
                raise RpcError(errno.EAGAIN, COLLECTING_REPORTS)
            located.append(
                LocatedChunk(
                    info.index,
                    info.chunk,
                    version,
                    info.length,
                    tuple(state.address(ds) for ds in holders),
                    self._read_token(info.chunk, version),
                )
            )
        return Located(reply.size, reply.chunk_size, tuple(located), reply.more)

    async def _handle_report_bad_replica(
        self, request: ReportBadReplica, _context: CallContext
    ) -> Reported:
        state = self._current()
        marked = state.report_corrupt(
            request.chunk, request.version, None, request.dataserver, authoritative=False
        )
        log.warning(
            "chunk %#x v%d on %s reported bad by a client (%s)%s",
            request.chunk,
            request.version,
            request.dataserver[:64],
            request.reason[:200],
            "" if marked else "; not marked (last good replica, or unknown)",
        )
        return Reported()

    async def _handle_space(self, _request: SpaceRequest, _context: CallContext) -> Space:
        capacity, used, available, live = self._current().space()
        return Space(capacity, used, available, live)

    # ------------------------------------------------------------------ background

    async def _each_tick(self, doing: str, step: Callable[[ClusterState], Awaitable[None]]) -> None:
        """Every tick while leader, ``step`` on the reign's state.  An RPC error (the reign
        ended, a peer did not answer) abandons this tick's step; any other exception is a
        bug, and starts the reign's soft state afresh."""
        while True:
            await trio.sleep(self._options.tick_s)
            state = self._state_if_leader()
            if state is None:
                continue
            try:
                await step(state)
            except RpcError as error:
                log.debug("%s abandoned: %s", doing, error)
            except Exception:
                self._lose_state(doing, state)

    async def _plan(self, state: ClusterState) -> None:
        """Dead dataservers, then re-examination of changed chunks within a share of the
        tick."""
        now_s = trio.current_time()
        for dead in state.check_liveness(now_s):
            log.warning(
                "dataserver %016x (%s) is dead: silent for %.1f s",
                dead,
                state.address(dead),
                self._options.dead_after_s,
            )
        budget_ends_s = time.monotonic() + PLAN_SHARE_OF_TICK * self._options.tick_s
        while state.plan(now_s) and time.monotonic() < budget_ends_s:
            await trio.sleep(0)
            if self._state is not state:
                break
        self._log_summary(state)

    async def _scan_loop(self) -> None:
        """Scan the namespace every ``scan_interval_s``, or less often in a namespace so
        large that a scan (and the re-examination of every chunk it causes) would take
        more than a small share of the time, or its re-examination would not keep up."""
        while True:
            state = self._state_if_leader()
            pause_s = self._options.scan_interval_s
            if state is not None:
                started_s = trio.current_time()
                try:
                    scanned = await self._scan(state)
                except RpcError as error:
                    log.debug("namespace scan abandoned: %s", error)
                    scanned = None
                except Exception:
                    self._lose_state("scanning", state)
                    scanned = None
                if scanned is not None and self._state is state:
                    state.install_scan(scanned, started_s)
                    pause_s = max(pause_s, SCAN_IDLE_FACTOR * (trio.current_time() - started_s))
            await trio.sleep(pause_s)
            # The next scan waits until the chunks the last one marked were re-examined,
            # but no longer than another pause: under steady writes, reports keep the
            # backlog from ever emptying, and only a scan tells which open versions were
            # committed since (a drain or a repair waits for that).
            backlog_wait_ends_s = trio.current_time() + pause_s
            while (
                (state := self._state_if_leader()) is not None
                and state.backlog
                and not state.safe_mode(trio.current_time())
                and trio.current_time() < backlog_wait_ends_s
            ):
                await trio.sleep(self._options.tick_s)

    async def _scan(self, state: ClusterState) -> dict[ChunkId, ChunkRef] | None:
        """Every referenced chunk of the namespace, page by page (linearizable pages);
        None when the reign ended meanwhile."""
        scanned: dict[ChunkId, ChunkRef] = {}
        inode, index = InodeId(0), 0
        while True:
            await self._replica.confirm_read()
            if self._state is not state:
                return None
            page = reply_or_raise(
                self._replica.namespace.query(
                    ScanChunks(inode, index, CHUNK_PAGE_MAX), ROOT_CREDENTIALS
                )
            )
            invariant(isinstance(page, ChunkScanReply), "ScanChunks answered another type")
            for entry in page.entries:
                scanned[entry.chunk] = ChunkRef(
                    entry.version, entry.length, entry.goal, entry.opened_ns, entry.recovering
                )
            if page.done:
                return scanned
            inode, index = page.next_inode, page.next_index
            await trio.sleep(0)

    async def _drain_deletions(self, state: ClusterState) -> None:
        """One page of the namespace's deletion queue (not in safe mode)."""
        if state.safe_mode(trio.current_time()):
            return
        await self._replica.confirm_read()
        if self._state is not state:
            return
        page = reply_or_raise(
            self._replica.namespace.query(GetDeletions(CHUNK_PAGE_MAX), ROOT_CREDENTIALS)
        )
        invariant(isinstance(page, DeletionsReply), "GetDeletions answered another type")
        state.deletion_queue = page.total
        acks = state.deletion_entries(page.entries, trio.current_time())
        if acks:
            reply_or_raise(
                await self._replica.submit(SystemCommand(time.time_ns(), AckDeletions(tuple(acks))))
            )
            log.info("acknowledged %d deleted chunks (%d queued)", len(acks), page.total)

    async def _recover_due(self, state: ClusterState) -> None:
        """Recover the open versions that are due (cluster-state rule 8)."""
        due = state.recoveries(trio.current_time(), time.time_ns())
        async with trio.open_nursery() as nursery:
            for recovery in due:
                nursery.start_soon(self._recover, state, recovery)

    async def _recover(self, state: ClusterState, recovery: Recovery) -> None:
        """Carry out one recovery: RecoverChunk, the fencing sync, CommitRecovery."""
        chunk, version = recovery.chunk, recovery.version
        fenced_version = ChunkVersion(version + 1)
        committed = False
        try:
            started = SystemCommand(
                time.time_ns(), RecoverChunk(chunk, version, recovery.opened_ns)
            )
            reply_or_raise(await self._replica.submit(started))
            if self._state is not state:
                return
            state.recovery_started(recovery, started.time_ns)
            if recovery.source is not None:
                length = await self._fence(state, recovery, fenced_version)
                if self._state is not state:
                    return
                state.recovery_fenced(recovery, length, trio.current_time())
            done = SystemCommand(
                time.time_ns(), CommitRecovery(chunk, fenced_version, started.time_ns)
            )
            reply_or_raise(await self._replica.submit(done))
            committed = True
            log.warning(
                "chunk %#x: version %d was left open by its writer; recovered as version %d%s",
                chunk,
                version,
                fenced_version,
                "" if recovery.source is None else f" from {state.address(recovery.source)}",
            )
        except RpcError as error:
            log.info("chunk %#x v%d: recovery not finished: %s", chunk, version, error)
        finally:
            if self._state is state:
                state.recovery_done(recovery, committed=committed, now_s=trio.current_time())

    async def _fence(self, state: ClusterState, recovery: Recovery, version: ChunkVersion) -> int:
        """Derive ``version`` on the recovery's source from the base it holds (a sync
        alone, so every byte it holds stays); its length."""
        peers = self._peers
        source = recovery.source
        invariant(peers is not None and source is not None, "fence without peers or source")
        assert peers is not None and source is not None
        token = sign_token(
            self._key,
            recovery.chunk,
            version,
            AccessMode.WRITE,
            time.time(),
            lifetime_s=FENCE_TIMEOUT_S,
            clock_skew_s=self._options.clock_skew_s,
        )
        request = SyncRequest(recovery.chunk, version, recovery.base, False, token, ())
        reply, _ = await peers.call(state.address(source), SYNC, request, timeout_s=FENCE_TIMEOUT_S)
        return int(reply.length_bytes)

    async def _modes_loop(self) -> None:
        """Install the mode table in each reign as soon as it begins, then every tick."""
        while True:
            with trio.move_on_after(self._options.tick_s):
                await self._reign_began.wait()
            self._reign_began = trio.Event()
            state = self._state_if_leader()
            if state is None:
                continue
            try:
                await self._install_modes(state)
            except RpcError as error:
                log.debug("dataserver modes not installed: %s", error)
            except Exception:
                self._lose_state("installing dataserver modes", state)

    def _mode_rows(self) -> tuple[DataserverModeEntry, ...]:
        """The mode table as this replica applied it."""
        reply = reply_or_raise(
            self._replica.namespace.query(GetDataserverModes(), ROOT_CREDENTIALS)
        )
        invariant(
            isinstance(reply, DataserverModesReply), "GetDataserverModes answered another type"
        )
        entries: tuple[DataserverModeEntry, ...] = reply.entries
        return entries

    async def _install_modes(self, state: ClusterState) -> None:
        """Hand ``state`` the mode table as a linearizable read sees it (when it changed)."""
        await self._replica.confirm_read()
        if self._state is not state:
            return
        rows = self._mode_rows()
        if self._installed_modes == (state, rows):
            return
        state.install_admin_modes(rows, trio.current_time())
        self._installed_modes = (state, rows)
        log.info(
            "dataserver modes: %s",
            ", ".join(f"{row.dataserver:016x} {row.mode.name.lower()}" for row in rows)
            or "all normal",
        )

    def _lose_state(self, doing: str, state: ClusterState) -> None:
        """A bug surfaced while ``doing``: log it and start the reign's soft state afresh
        (dataservers re-register and report) rather than take the metaserver down."""
        log.exception("cluster manager failed while %s; rebuilding its soft state", doing)
        if self._state is state:
            self._state = None

    def _log_summary(self, state: ClusterState) -> None:
        """One line whenever the health counts change."""
        counters = state.counters(trio.current_time())
        summary = (
            counters.dataservers_live,
            counters.dataservers_dead,
            counters.under_replicated,
            counters.over_replicated,
            counters.missing,
            counters.corrupt_replicas,
            counters.copies_in_flight,
        )
        if summary == self._last_summary:
            return
        self._last_summary = summary
        log.info(
            "cluster: %d live / %d dead dataservers; chunks: %d under-replicated, "
            "%d over-replicated, %d missing, %d corrupt replicas; %d copies in flight "
            "(%d done, %d bytes)%s",
            *summary,
            counters.copies_done,
            counters.bytes_copied,
            " [safe mode]" if counters.safe_mode else "",
        )


def cluster_manager_services(
    config: Config, started: Callable[[ClusterManager], None] | None = None
) -> ExtraServices:
    """The hook for :func:`metaserver.server.serve_metaserver`: registers the handlers
    and starts the background tasks of a :class:`ClusterManager` for ``config``.

    ``started`` receives the manager once it exists (for admin handlers that report its
    :meth:`~ClusterManager.counters` and :meth:`~ClusterManager.dataservers`)."""
    key = config.cluster_key()
    options = ClusterManagerOptions.from_config(config)

    def install(replica: Replica, handlers: Handlers, nursery: trio.Nursery) -> None:
        manager = ClusterManager(replica, key, options)
        manager.register_handlers(handlers)
        nursery.start_soon(manager.run)
        if started is not None:
            started(manager)

    return install
