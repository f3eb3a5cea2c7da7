"""The cluster manager's soft state and decisions, with no I/O (the sans-IO core).

Rules of this file:

1. **Pure.**  No trio, no clock, no sockets: time arrives as ``now_s`` (the shell's
   monotonic clock, in seconds), randomness as the ``random.Random`` given at
   construction, chunk access tokens from the ``read_token`` function given at
   construction.  The shell (:mod:`metaserver.cluster_manager`) feeds it registrations,
   reports, namespace scans and deletion-queue pages, and carries out what it decides.
2. **Soft state, one reign.**  One :class:`ClusterState` lives for one leader's reign and
   is rebuilt from registrations and full reports after every leader change (like HDFS
   block locations).  Nothing here is written to the Paxos log; the one durable input,
   the admins' dataserver modes, is handed in from the namespace's replicated table
   (:meth:`ClusterState.install_admin_modes`), and a dataserver in that table is known to
   the reign (in its mode) before it registers.
3. **Safe mode first.**  Until ``grace_s`` after the reign began, one complete namespace
   scan has been installed *and* the dataserver modes have been installed, nothing is
   deleted and nothing is copied: a new leader does not act on a map that reports have
   not filled yet.
4. **Never the last good replica.**  A replica of a referenced chunk is deleted only when
   a good (current-version, not corrupt) replica of that chunk is readable elsewhere;
   over-replication trims never go below the goal; a client's bad-replica report cannot
   mark the last good replica corrupt.  Replicas on dead dataservers are never counted as
   good but are remembered, so a chunk with no live good replica is *missing*, not lost.
5. **Open versions are never copied.**  A chunk whose current version the namespace
   holds open for write (opened, not committed since: :attr:`ChunkRef.opened_ns`, from
   the scan, or from this reign's own grant) is not copied, trimmed or cleaned: a copy
   taken while a writer may still write would be a replica of the right version with
   the wrong bytes.  A new leader knows open versions from its first scan.
8. **Open versions are recovered, not waited for forever.**  Once no dataserver accepts
   a token for an open version any more (``open_max_s`` after the open, by the wall
   clock: the token lifetime plus twice the clock skew), :meth:`ClusterState.recoveries`
   names one readable replica of it (or of the version it derives from).  The shell
   moves the chunk to a new *recovering* version through the log (``RecoverChunk``; no
   client ever gets a token for it), derives that version on the chosen replica (the
   old writer is fenced off it), and closes it (``CommitRecovery``); the other replicas,
   now stale, are deleted while the survivor is copied to the goal.  A recovering
   version left by an attempt that did not finish is recovered again at once, under a
   newer version, so no version is ever derived on two replicas.
6. **Bounded.**  Command queues, report batches, copies per server and the work of one
   :meth:`ClusterState.plan` call all have named limits.
7. **Maintenance outlives the reign.**  A dataserver in maintenance that has not sent a
   full report in this reign (it is down for its maintenance) may hold any chunk: each
   chunk with a readable good replica is presumed to have one replica on each such
   server, up to its goal, so its silence causes no re-replication after a leader
   change either.  The presumption ends with its full report or with its mode.
"""

from __future__ import annotations

import enum
import errno
import heapq
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from metaserver.placement import Candidate, choose_targets
from wire.address import parse_address
from wire.cluster_admin_ops import DataserverMode
from wire.cluster_ops import (
    HEARTBEAT_COMMANDS_MAX,
    DeleteReplica,
    FullReportRequest,
    HeartbeatRequest,
    RegisterRequest,
    ReplicaReport,
    ReplicateChunk,
    Space,
)
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.invariant import invariant
from wire.namespace_ops import DataserverModeEntry, DeletedChunk
from wire.tokens import CLOCK_SKEW_S, TOKEN_LIFETIME_S, ChunkToken

DATASERVERS_MAX = 10_000
"""Registered dataservers (live or dead) one leader keeps; more are refused (EUSERS)."""
SERVER_COMMANDS_MAX = 10 * HEARTBEAT_COMMANDS_MAX
"""Commands queued for one dataserver; the planner queues nothing more beyond it."""
FULL_REPORT_REPLICAS_MAX = 10_000_000
"""Replicas one full report may list (10 M replicas of 64 MiB is 640 TB)."""
COPIES_PER_TARGET_MAX = 8
"""Copies one dataserver receives at once (it runs 4 and queues the rest)."""
COPIES_PER_SOURCE_MAX = 8
"""Copies one dataserver serves as the source at once."""
COPY_TIMEOUT_BASE_S = 20.0
COPY_TIMEOUT_RATE_BYTES_S = 10 * 1024 * 1024
"""A copy not reported within base + length / rate of its delivery is presumed failed."""
COPY_AVOID_S = 60.0
"""A target whose copy of a chunk failed is not chosen again for that chunk for this long."""
RECONCILES_PER_PLAN_MAX = 20_000
"""Chunks one :meth:`ClusterState.plan` call re-examines; the rest wait for the next."""
COPY_STARTS_PER_PLAN_MAX = 1_000
"""Queued chunks one :meth:`ClusterState.plan` call tries to start copies for."""
DELETION_ENTRIES_TRACKED_MAX = 4 * 4096
"""Deletion-queue entries whose first sighting is remembered (a few pages' worth)."""
TRIM_HOLDS_MAX = 10_000
"""Chunks whose over-replication trims are held at once (balancer moves under way)."""
RECOVERIES_IN_FLIGHT_MAX = 64
"""Open versions being recovered at once (each costs a sync on one dataserver and one
log command)."""
RECOVERY_RETRY_S = 5.0
"""A recovery that failed (or was not reported done) is tried again after this long."""
COLLECTING_REPORTS = "a new metaserver leader is collecting chunk reports; retry"
"""Why a request that needs the replica map is refused (EAGAIN) in safe mode."""


class ServerState(enum.Enum):
    """How the leader treats a dataserver.

    ``LIVE``: heartbeating; placement target, read source, counts toward goals.
    ``DEAD``: silent for ``dead_after_s``; its replicas are remembered but not counted.
    ``DECOMMISSIONING`` (set by an admin): still read from and copied from, never written
    to, and its replicas do not count, so its chunks are copied elsewhere.
    ``MAINTENANCE`` (set by an admin): neither read nor written, but its replicas count
    toward goals (no mass re-replication while it is down for a short while).
    """

    LIVE = "live"
    DEAD = "dead"
    DECOMMISSIONING = "decommissioning"
    MAINTENANCE = "maintenance"


READABLE_STATES = frozenset({ServerState.LIVE, ServerState.DECOMMISSIONING})
COUNTED_STATES = frozenset({ServerState.LIVE, ServerState.MAINTENANCE})
ADMIN_STATES = frozenset({ServerState.DECOMMISSIONING, ServerState.MAINTENANCE})
ADMIN_STATE_OF_MODE: dict[DataserverMode, ServerState | None] = {
    DataserverMode.NORMAL: None,
    DataserverMode.DECOMMISSION: ServerState.DECOMMISSIONING,
    DataserverMode.MAINTENANCE: ServerState.MAINTENANCE,
}
UNREGISTERED_INCARNATION = -1
"""The incarnation of a dataserver known only from the mode table (none is negative)."""


class ChunkHealth(enum.Enum):
    UNDER_REPLICATED = "under-replicated"
    OVER_REPLICATED = "over-replicated"
    MISSING = "missing"
    ORPHAN = "orphan"


class UnknownDataserver(Exception):
    """No registration of this dataserver (or of this incarnation) in this reign."""


class RequestRefused(Exception):
    """A cluster request this state cannot accept; ``code`` is an errno for the reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StateOptions:
    """Timing and limits of one reign (the shell derives them from the configuration)."""

    dead_after_s: float = 30.0
    grace_s: float = 30.0
    open_max_s: float = TOKEN_LIFETIME_S + 2 * CLOCK_SKEW_S
    """Wall-clock time after an open for write when no token for that version is accepted
    any more (:func:`wire.tokens.accepted_until_s`): an open version is recovered then."""
    copy_rate_bytes_s: float = 200 * 1024 * 1024
    chunk_size_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        invariant(self.dead_after_s > 0, "dead_after_s must be positive")
        invariant(self.grace_s >= 0 and self.open_max_s > 0, "negative grace or open time")
        invariant(self.copy_rate_bytes_s > 0, "copy rate must be positive")
        invariant(self.chunk_size_bytes > 0, "chunk size must be positive")


@dataclass(frozen=True)
class Replica:
    """What one dataserver reported of one chunk."""

    version: ChunkVersion
    length_bytes: int
    corrupt: bool


@dataclass(frozen=True)
class ChunkRef:
    """A chunk the namespace references: its current version, committed length, goal,
    and (``opened_ns``, wall-clock ns) when that version was opened for write and is not
    committed yet; None for a committed version."""

    version: ChunkVersion
    length_bytes: int
    goal: int
    opened_ns: int | None = None
    recovering: bool = False


@dataclass(frozen=True)
class Recovery:
    """Recover the open ``version`` of ``chunk`` (opened at ``opened_ns``): move it to
    ``version + 1`` (``RecoverChunk``), derive that on ``source`` from the ``base`` it
    holds (a sync with a write token for the new version), then ``CommitRecovery``.
    ``source`` is None when no replica of a chunk without committed data is known: the
    two commands alone are enough."""

    chunk: ChunkId
    version: ChunkVersion
    opened_ns: int
    source: DataserverId | None
    base: ChunkVersion | None


@dataclass(frozen=True)
class WriteGrant:
    """A chunk version handed to a writer: ``chain`` holds it (or will, once written)."""

    version: ChunkVersion
    base: ChunkVersion | None
    chain: tuple[DataserverId, ...]
    ref: ChunkRef
    granted_s: float


@dataclass(frozen=True)
class WritePlan:
    """The answer to an open for write: the chain, the version it derives from, and
    copies of that base version to make first (``(target, source)`` pairs) so that new
    servers can join the chain."""

    chain: tuple[DataserverId, ...]
    base: ChunkVersion | None
    base_length_bytes: int
    topups: tuple[tuple[DataserverId, DataserverId], ...]


@dataclass
class CopyJob:
    """A replica copy ordered from ``source`` to ``target``."""

    chunk: ChunkId
    version: ChunkVersion
    source: DataserverId
    target: DataserverId
    length_bytes: int
    deadline_s: float
    delivered: bool = False


@dataclass(frozen=True)
class _CopyOrder:
    """A queued copy; becomes a :class:`ReplicateChunk` (with a fresh token) on delivery."""

    chunk: ChunkId
    version: ChunkVersion
    source: DataserverId


@dataclass
class _PendingReport:
    report_id: int
    next_batch: int
    replicas: list[ReplicaReport]


@dataclass
class ServerRecord:
    """One dataserver, as this reign knows it: registered, or (``registered`` False)
    known only from the mode table, with the address the table remembers."""

    dataserver_id: DataserverId
    address: str
    incarnation: int
    space: Space
    last_heard_s: float
    active_writes: int = 0
    active_reads: int = 0
    alive: bool = True
    admin_state: ServerState | None = None
    chunks: set[ChunkId] = field(default_factory=set)
    commands: deque[DeleteReplica | _CopyOrder] = field(default_factory=deque)
    delivered_deletes: list[tuple[ChunkId, ChunkVersion]] = field(default_factory=list)
    heartbeats: int = 0
    full_reports: int = 0
    placed_bytes: int = 0
    placed_writes: int = 0
    copies_in: int = 0
    copies_out: int = 0
    pending_report: _PendingReport | None = None
    registered: bool = True

    @property
    def state(self) -> ServerState:
        if self.admin_state is ServerState.MAINTENANCE:
            return ServerState.MAINTENANCE
        if not self.alive:
            return ServerState.DEAD
        return self.admin_state or ServerState.LIVE

    @property
    def load(self) -> int:
        return self.active_reads + self.active_writes + self.copies_in + self.copies_out

    def available_bytes(self) -> int:
        return max(0, self.space.available_bytes - self.placed_bytes)


@dataclass(frozen=True)
class DataserverStatus:
    """One dataserver for the admin report."""

    dataserver_id: DataserverId
    address: str
    state: ServerState
    space: Space
    active_writes: int
    active_reads: int
    silent_s: float
    replicas: int
    commands_queued: int
    copies_in: int
    copies_out: int


@dataclass(frozen=True)
class ClusterCounters:
    """The leader's view of the cluster's health, for the admin report and the tests."""

    epoch: int
    safe_mode: bool
    dataservers_live: int
    dataservers_dead: int
    dataservers_decommissioning: int
    dataservers_maintenance: int
    chunks_referenced: int
    chunks_with_replicas: int
    under_replicated: int
    over_replicated: int
    missing: int
    orphans: int
    corrupt_replicas: int
    replication_queue: int
    copies_in_flight: int
    copies_done: int
    copies_failed: int
    bytes_copied: int
    deletes_sent: int
    deletion_queue: int
    writes_in_flux: int
    scans_completed: int


ReadToken = Callable[[ChunkId, ChunkVersion], ChunkToken]


class ClusterState:
    """Registry, replica map, health and work queues of one reign (see the module rules)."""

    def __init__(
        self,
        options: StateOptions,
        *,
        epoch: int,
        started_s: float,
        rng: random.Random,
        read_token: ReadToken,
        admin_modes: Iterable[DataserverModeEntry] | None,
    ) -> None:
        """``admin_modes``: the namespace's dataserver-mode table, or None while it has not
        been read yet (the reign stays in safe mode until :meth:`install_admin_modes`)."""
        self.options = options
        self.epoch = epoch
        self.started_s = started_s
        self._rng = rng
        self._read_token = read_token
        self.servers: dict[DataserverId, ServerRecord] = {}
        self._by_address: dict[str, DataserverId] = {}
        self.replicas: dict[ChunkId, dict[DataserverId, Replica]] = {}
        self._first_seen_s: dict[ChunkId, float] = {}
        self.refs: dict[ChunkId, ChunkRef] = {}
        self.open_refs: dict[ChunkId, int] = {}
        """The referenced chunks whose version is open for write, with the open's time."""
        self._recovering: dict[ChunkId, float] = {}
        self.scan_started_s: float | None = None
        self.scans_completed = 0
        self.grants: dict[ChunkId, WriteGrant] = {}
        self.copies: dict[ChunkId, list[CopyJob]] = {}
        self._copy_failures: dict[tuple[ChunkId, DataserverId], float] = {}
        self._deleting: dict[tuple[ChunkId, DataserverId], ChunkVersion] = {}
        self._trim_holds: dict[ChunkId, float] = {}
        self._deletion_first_seen_s: dict[tuple[ChunkId, ChunkVersion], float] = {}
        self._health: dict[ChunkId, ChunkHealth] = {}
        self._health_counts: Counter[ChunkHealth] = Counter()
        self._corrupt_replicas = 0
        self._under: dict[ChunkId, int] = {}
        self._under_heap: list[tuple[int, ChunkId]] = []
        self._unschedulable: dict[ChunkId, int] = {}
        self._dirty: dict[ChunkId, None] = {}
        self._tokens_bytes = float(self._burst_bytes())
        self._tokens_at_s = started_s
        self.copies_done = 0
        self.copies_failed = 0
        self.bytes_copied = 0
        self.deletes_sent = 0
        self.deletion_queue = 0
        self.admin_modes_installed = False
        self._held_for_maintenance: dict[ChunkId, None] = {}
        self._maintenance_unreported = 0
        if admin_modes is not None:
            self.install_admin_modes(admin_modes, started_s)

    # ------------------------------------------------------------------ registry

    def register(self, request: RegisterRequest, now_s: float) -> None:
        """A dataserver (re)starts a session with this leader; a full report follows."""
        ds = request.dataserver_id
        if ds <= 0:
            raise RequestRefused(errno.EINVAL, f"dataserver id {ds} is not positive")
        _check_address(request.address)
        record = self.servers.get(ds)
        if record is None:
            if len(self.servers) >= DATASERVERS_MAX:
                raise RequestRefused(errno.EUSERS, f"{DATASERVERS_MAX} dataservers registered")
            record = ServerRecord(ds, request.address, request.incarnation, request.space, now_s)
            self.servers[ds] = record
        else:
            record.registered = True
            self._reset_session(record, restarted=record.incarnation != request.incarnation)
            record.incarnation = request.incarnation
            record.space = request.space
            record.last_heard_s = now_s
            record.alive = True
        self._claim_address(record, request.address)
        self._dirty_all(record.chunks)
        self._release_unschedulable()

    def heartbeat(
        self, request: HeartbeatRequest, now_s: float
    ) -> tuple[DeleteReplica | ReplicateChunk, ...]:
        """Apply a heartbeat and its incremental report; return the commands to send.

        Raises :class:`UnknownDataserver` when this dataserver (this incarnation) has not
        registered in this reign: it must register and send a full report.
        """
        record = self.servers.get(request.dataserver_id)
        if record is None or record.incarnation != request.incarnation:
            raise UnknownDataserver(f"dataserver {request.dataserver_id:#x} is not registered")
        _check_address(request.address)
        if not record.alive:
            record.alive = True
            self._dirty_all(record.chunks)
            self._release_unschedulable()
        self._claim_address(record, request.address)
        record.last_heard_s = now_s
        record.space = request.space
        record.active_writes = max(0, request.active_writes)
        record.active_reads = max(0, request.active_reads)
        record.placed_bytes = 0
        record.placed_writes = 0
        record.heartbeats += 1
        ds = record.dataserver_id
        for key in request.removed:
            stored = self.replicas.get(key.chunk_id, {}).get(ds)
            if stored is not None and stored.version == key.version:
                self._drop_replica(key.chunk_id, ds)
        for report in request.added:
            self._set_replica(report.chunk_id, ds, _replica_of(report), now_s)
        # The dataserver carries out a reply's commands before its next heartbeat, so a
        # delete still listed now was a no-op there: that replica is not stored.
        for chunk, version in record.delivered_deletes:
            stored = self.replicas.get(chunk, {}).get(ds)
            if stored is not None and stored.version == version:
                self._drop_replica(chunk, ds)
            self._deleting.pop((chunk, ds), None)
        record.delivered_deletes.clear()
        return self._deliver(record, now_s)

    def full_report(self, request: FullReportRequest, now_s: float) -> None:
        """One batch of a full report; the final batch replaces this server's replicas."""
        record = self.servers.get(request.dataserver_id)
        if record is None or not record.registered:
            raise UnknownDataserver(f"dataserver {request.dataserver_id:#x} is not registered")
        if request.batch_index == 0:
            record.pending_report = _PendingReport(request.report_id, 0, [])
        pending = record.pending_report
        if (
            pending is None
            or pending.report_id != request.report_id
            or pending.next_batch != request.batch_index
        ):
            record.pending_report = None
            raise RequestRefused(
                errno.EINVAL,
                f"full report {request.report_id:#x} batch {request.batch_index} out of order",
            )
        if len(pending.replicas) + len(request.replicas) > FULL_REPORT_REPLICAS_MAX:
            record.pending_report = None
            raise RequestRefused(
                errno.E2BIG, f"full report longer than {FULL_REPORT_REPLICAS_MAX} replicas"
            )
        pending.replicas.extend(request.replicas)
        pending.next_batch += 1
        record.last_heard_s = now_s
        if not request.final:
            return
        record.pending_report = None
        record.full_reports += 1
        reported = {r.chunk_id: r for r in pending.replicas}
        ds = record.dataserver_id
        for chunk in list(record.chunks):
            if chunk not in reported:
                self._drop_replica(chunk, ds)
        for chunk, report in reported.items():
            self._set_replica(chunk, ds, _replica_of(report), now_s)
        if record.admin_state is ServerState.MAINTENANCE and record.full_reports == 1:
            self._release_held_for_maintenance()

    def report_corrupt(
        self,
        chunk: ChunkId,
        version: ChunkVersion,
        dataserver: DataserverId | None,
        address: str,
        *,
        authoritative: bool,
    ) -> bool:
        """Mark one replica corrupt; True if it is now marked.

        ``authoritative`` reports come from the dataserver that holds the replica (it
        verified the checksums itself).  A client's report is taken only while another
        good readable replica of that version remains, so that no client can make a
        chunk unreadable.
        """
        if dataserver is None or dataserver not in self.servers:
            dataserver = self._by_address.get(address)
        if dataserver is None:
            return False
        stored = self.replicas.get(chunk, {}).get(dataserver)
        if stored is None or stored.version != version:
            return False
        if stored.corrupt:
            return True
        if not authoritative:
            if not [ds for ds in self._good_readable(chunk, version) if ds != dataserver]:
                return False
        self.replicas[chunk][dataserver] = replace(stored, corrupt=True)
        self._corrupt_replicas += 1
        self._dirty[chunk] = None
        return True

    def set_admin_state(self, dataserver: DataserverId, state: ServerState | None) -> None:
        """Decommission a dataserver, put it in maintenance, or (None) back to normal.

        The shell sets states only through :meth:`install_admin_modes` (the replicated
        table is the truth); this is its step for one known dataserver."""
        invariant(state is None or state in ADMIN_STATES, f"{state} is not an admin state")
        record = self.servers.get(dataserver)
        if record is None:
            raise UnknownDataserver(f"dataserver {dataserver:#x} is not registered")
        if record.admin_state is ServerState.MAINTENANCE or state is ServerState.MAINTENANCE:
            self._release_held_for_maintenance()
        record.admin_state = state
        self._dirty_all(record.chunks)
        self._release_unschedulable()

    def install_admin_modes(self, entries: Iterable[DataserverModeEntry], now_s: float) -> None:
        """The namespace's dataserver-mode table becomes this reign's admin states.

        A dataserver without a row is normal; one with a row that has not registered in
        this reign is known from now on, in its mode (rule 7), as not heard from since
        ``now_s`` (so it is dead ``dead_after_s`` later, like any silent dataserver, or at
        once if its row goes first).  Idempotent: installing the same table changes
        nothing.
        """
        wanted = {entry.dataserver: entry for entry in entries}
        for ds, record in self.servers.items():
            entry = wanted.get(ds)
            state = None if entry is None else ADMIN_STATE_OF_MODE[entry.mode]
            if record.admin_state is not state:
                self.set_admin_state(ds, state)
            if not record.registered and state is None:
                record.alive = False
        for ds, entry in wanted.items():
            if ds in self.servers:
                continue
            state = ADMIN_STATE_OF_MODE[entry.mode]
            invariant(state is not None, f"a mode row of {ds:#x} says normal")
            record = ServerRecord(
                ds,
                entry.address,
                UNREGISTERED_INCARNATION,
                Space(0, 0, 0, 0),
                now_s,
                admin_state=state,
                registered=False,
            )
            self.servers[ds] = record
            if state is ServerState.MAINTENANCE:
                self._release_held_for_maintenance()
        self.admin_modes_installed = True

    def _release_held_for_maintenance(self) -> None:
        """The set of silent servers in maintenance changed: re-examine the chunks whose
        copies rule 7 held back."""
        self._dirty_all(self._held_for_maintenance)
        self._held_for_maintenance.clear()

    def check_liveness(self, now_s: float) -> list[DataserverId]:
        """Mark dataservers silent for ``dead_after_s`` dead; return the newly dead."""
        dead = []
        for record in self.servers.values():
            if record.alive and now_s - record.last_heard_s > self.options.dead_after_s:
                record.alive = False
                self._reset_session(record, restarted=True)
                dead.append(record.dataserver_id)
        return dead

    def dataserver_id(self, address: str) -> DataserverId | None:
        return self._by_address.get(address)

    def address(self, dataserver: DataserverId) -> str:
        return self.servers[dataserver].address

    def state_of(self, dataserver: DataserverId) -> ServerState:
        record = self.servers.get(dataserver)
        return ServerState.DEAD if record is None else record.state

    # ------------------------------------------------------------------ the data path

    def grant_write(
        self,
        chunk: ChunkId,
        version: ChunkVersion,
        length_bytes: int,
        goal: int,
        exclude: Iterable[DataserverId],
        now_s: float,
        *,
        opened_ns: int,
    ) -> WritePlan:
        """The chain for a chunk version the namespace just opened for writing (at
        ``opened_ns``, the open command's time: the version is open from then on).

        A new chunk (version 1) goes to ``goal`` servers chosen by placement.  An
        existing chunk is written on the live holders of the version it derives from
        (minus ``exclude``), topped up by copies of that version to new servers when
        there are too few.  Raises :class:`RequestRefused`: EIO when the chunk has data
        but no live replica to derive from; EAGAIN instead (retry) when no dataserver
        or no holder is known yet because the reign is in safe mode, reports arriving.
        """
        invariant(version >= 1 and goal >= 1, f"bad grant v{version} goal {goal}")
        excluded = set(exclude)
        ref = ChunkRef(version, length_bytes, goal, opened_ns)
        previous = self.grants.get(chunk)
        if previous is not None and previous.version == version:
            # A retried open (the namespace answered it from its session table).
            chain = tuple(
                ds
                for ds in previous.chain
                if ds not in excluded and self.state_of(ds) is ServerState.LIVE
            )
            self.grants[chunk] = replace(previous, chain=chain, granted_s=now_s)
            return WritePlan(chain, previous.base, 0, ())
        known = self.refs.get(chunk)
        if (
            known is None
            or known.version < version
            or (known.version == version and known.opened_ns is not None)
        ):
            self._set_ref(chunk, ref)
        base: ChunkVersion | None = None
        base_length = 0
        topups: tuple[tuple[DataserverId, DataserverId], ...] = ()
        holding = set(self.replicas.get(chunk, {}))
        if version > 1:
            base = self._effective_version(chunk, ChunkVersion(version - 1))
            holders = [
                ds
                for ds in self._good_readable(chunk, base)
                if ds not in excluded and self.state_of(ds) is ServerState.LIVE
            ]
            if holders:
                holders.sort(key=lambda ds: (self.servers[ds].active_writes, self._rng.random()))
                chain = tuple(holders[:goal])
                base_length = max(
                    (
                        stored.length_bytes
                        for stored in self.replicas.get(chunk, {}).values()
                        if stored.version == base
                    ),
                    default=length_bytes,
                )
                sources = chain
                current = {
                    ds
                    for ds, stored in self.replicas.get(chunk, {}).items()
                    if stored.version >= base
                }
                # A server with an older copy may take one: a copy replaces it.
                targets = self._choose(
                    goal - len(chain), base_length, excluded | current | set(chain)
                )
                topups = tuple(
                    (target, sources[position % len(sources)])
                    for position, target in enumerate(targets)
                )
            elif self.safe_mode(now_s):
                raise RequestRefused(errno.EAGAIN, COLLECTING_REPORTS)
            elif length_bytes == 0:
                # Nothing was ever committed: start afresh on servers holding no copy.
                base = None
                chain = tuple(self._choose(goal, self.options.chunk_size_bytes, excluded | holding))
            else:
                raise RequestRefused(
                    errno.EIO,
                    f"chunk {chunk:#x}: no live replica of version {base} to write from",
                )
        else:
            chain = tuple(self._choose(goal, self.options.chunk_size_bytes, excluded | holding))
        if not chain and self.safe_mode(now_s):
            raise RequestRefused(errno.EAGAIN, COLLECTING_REPORTS)
        self.grants[chunk] = WriteGrant(version, base, chain, ref, now_s)
        for ds in chain:
            record = self.servers[ds]
            record.placed_bytes += self.options.chunk_size_bytes
            record.placed_writes += 1
        self._dirty[chunk] = None
        return WritePlan(chain, base, base_length, topups)

    def unconfirmed_members(self, chunk: ChunkId, version: ChunkVersion) -> list[DataserverId]:
        """Members of the fresh grant of ``version`` that have not reported holding it.

        A chain member turns its replica into the granted version only when the first
        write reaches it; after a pipeline failure some never got there.  The shell asks
        these members (``data.info``) before the next version is derived from this one.
        """
        grant = self.grants.get(chunk)
        if grant is None or grant.version != version:
            return []
        reported = self.replicas.get(chunk, {})
        return [
            ds
            for ds in grant.chain
            if (stored := reported.get(ds)) is None or stored.version != version
        ]

    def probed(
        self,
        chunk: ChunkId,
        version: ChunkVersion,
        dataserver: DataserverId,
        length_bytes: int | None,
        now_s: float,
    ) -> None:
        """What a probe of ``dataserver`` found: ``version`` with ``length_bytes``, or
        (None) not that version, so it leaves the grant's presumed holders."""
        if length_bytes is not None:
            if dataserver in self.servers:
                self._set_replica(chunk, dataserver, Replica(version, length_bytes, False), now_s)
            return
        grant = self.grants.get(chunk)
        if grant is not None and grant.version == version and dataserver in grant.chain:
            chain = tuple(ds for ds in grant.chain if ds != dataserver)
            self.grants[chunk] = replace(grant, chain=chain)

    def topup_done(
        self,
        chunk: ChunkId,
        version: ChunkVersion,
        target: DataserverId,
        length_bytes: int,
        now_s: float,
    ) -> tuple[DataserverId, ...]:
        """A top-up copy of the base landed on ``target``: it joins the grant's chain."""
        grant = self.grants.get(chunk)
        invariant(grant is not None, f"top-up of chunk {chunk:#x} without a grant")
        assert grant is not None
        if target in self.servers and self.state_of(target) is ServerState.LIVE:
            self._set_replica(chunk, target, Replica(version, length_bytes, False), now_s)
            if target not in grant.chain:
                grant = replace(grant, chain=grant.chain + (target,))
                self.grants[chunk] = grant
                self.servers[target].placed_writes += 1
        self.bytes_copied += length_bytes
        return grant.chain

    def locate(
        self, chunk: ChunkId, version: ChunkVersion
    ) -> tuple[ChunkVersion, tuple[DataserverId, ...]]:
        """The version to read and its readable good replicas, least loaded first.

        That is ``version`` itself, unless no dataserver has reported it (a write was
        opened but no byte has reached a dataserver yet, or never will): then the newest
        older version with a readable good replica, which holds the committed content.
        """
        effective = self._effective_version(chunk, version)
        holders = self._good_readable(chunk, effective)
        grant = self.grants.get(chunk)
        if not holders and grant is not None and grant.version == version:
            # Written and synced a moment ago, not reported yet: the chain has it.
            effective = version
            holders = [ds for ds in grant.chain if self.state_of(ds) in READABLE_STATES]
        holders.sort(key=lambda ds: (self.servers[ds].load, self._rng.random()))
        return effective, tuple(holders)

    def space(self) -> tuple[int, int, int, int]:
        """(capacity, used, available bytes, live dataservers) over live dataservers."""
        capacity = used = available = live = 0
        for record in self.servers.values():
            if record.state is ServerState.LIVE:
                live += 1
                capacity += record.space.capacity_bytes
                used += record.space.used_bytes
                available += record.space.available_bytes
        return capacity, used, available, live

    # ------------------------------------------------------------------ admin tools

    def current_version(self, chunk: ChunkId) -> ChunkVersion | None:
        """The version whose replicas hold a referenced chunk's committed data: the
        namespace's version, or an older one while nobody reported the newer (see
        :meth:`_effective_version`); None for a chunk no file references."""
        ref = self.refs.get(chunk)
        return None if ref is None else self._effective_version(chunk, ref.version)

    def is_deleting(self, chunk: ChunkId, dataserver: DataserverId, version: ChunkVersion) -> bool:
        """True while a delete of that replica is queued or awaits its confirmation."""
        return self._deleting.get((chunk, dataserver)) == version

    def hold_trims(self, chunk: ChunkId, until_s: float) -> bool:
        """Leave ``chunk``'s over-replication alone until ``until_s`` (or the next
        :meth:`release_replica`): a balancer move is under way, and its release, after
        the copy is verified, picks which replica goes.  False when too many are held."""
        if chunk not in self._trim_holds and len(self._trim_holds) >= TRIM_HOLDS_MAX:
            return False
        self._trim_holds[chunk] = until_s
        return True

    def trims_held(self, chunk: ChunkId) -> bool:
        return chunk in self._trim_holds

    def held_for_maintenance(self, chunk: ChunkId) -> bool:
        """True while rule 7 presumes the replicas ``chunk`` lacks are on a silent server
        in maintenance, so no copy of it is planned (as of its last re-examination)."""
        return chunk in self._held_for_maintenance

    def release_replica(
        self, chunk: ChunkId, version: ChunkVersion, dataserver: DataserverId, now_s: float
    ) -> str | None:
        """Queue the delete of ``dataserver``'s good replica of ``chunk`` at ``version``,
        which an admin tool (the balancer) copied elsewhere; None when queued, else why not.

        Refused in safe mode, for a chunk being written, and whenever the chunk would keep
        fewer than its goal of counted good replicas without it (rule 4; replicas already
        being deleted do not count).  Ends the chunk's :meth:`hold_trims` either way.
        """
        if self._trim_holds.pop(chunk, None) is not None:
            self._dirty[chunk] = None
        ref = self.refs.get(chunk)
        if self.safe_mode(now_s):
            return COLLECTING_REPORTS
        if ref is None:
            return "no file references the chunk"
        if self.is_open(chunk):
            return "the chunk is being written"
        if self._effective_version(chunk, ref.version) != version:
            return f"version {version} is no longer the current one"
        stored = self.replicas.get(chunk, {}).get(dataserver)
        if stored is None or stored.version != version or stored.corrupt:
            return "no good replica of that version is known there"
        others = [
            ds
            for ds, held in self.replicas[chunk].items()
            if ds != dataserver
            and held.version == version
            and not held.corrupt
            and self.state_of(ds) in COUNTED_STATES
            and self._deleting.get((chunk, ds)) != version
        ]
        if len(others) < ref.goal:
            return f"{len(others)} other counted replicas would be left, goal {ref.goal}"
        if len(self.servers[dataserver].commands) >= SERVER_COMMANDS_MAX:
            return "the dataserver's command queue is full"
        self._delete(dataserver, chunk, version)
        self._dirty[chunk] = None
        return None

    # ------------------------------------------------------------------ open versions

    def is_open(self, chunk: ChunkId) -> bool:
        """True while the chunk's current version is open for write (rule 5)."""
        return chunk in self.open_refs

    def _set_ref(self, chunk: ChunkId, ref: ChunkRef) -> None:
        self.refs[chunk] = ref
        if ref.opened_ns is None:
            self.open_refs.pop(chunk, None)
        else:
            self.open_refs[chunk] = ref.opened_ns
        self._dirty[chunk] = None

    def _forget_ref(self, chunk: ChunkId) -> None:
        del self.refs[chunk]
        self.open_refs.pop(chunk, None)
        self.grants.pop(chunk, None)
        self._dirty[chunk] = None

    def recoveries(self, now_s: float, wall_ns: int) -> list[Recovery]:
        """Open versions to recover now (rule 8), at most RECOVERIES_IN_FLIGHT_MAX under
        way; each stays under way until :meth:`recovery_done` or RECOVERY_RETRY_S.

        Due: a client's open older than ``open_max_s`` at ``wall_ns``; a recovering
        version at once (an attempt of an earlier reign, or one that failed).  The source
        is the longest readable good replica of the version readers get
        (:meth:`_effective_version`): it holds every committed byte and, when it holds
        the open version itself, every write acknowledged at it.  A chunk with committed
        data but no readable replica waits (it is missing).
        """
        if self.safe_mode(now_s):
            return []
        for chunk in [c for c, until_s in self._recovering.items() if until_s <= now_s]:
            del self._recovering[chunk]
        due_ns = wall_ns - int(self.options.open_max_s * 1e9)
        found: list[Recovery] = []
        for chunk, opened_ns in self.open_refs.items():
            if len(self._recovering) >= RECOVERIES_IN_FLIGHT_MAX:
                break
            ref = self.refs[chunk]
            if chunk in self._recovering or (opened_ns > due_ns and not ref.recovering):
                continue
            effective = self._effective_version(chunk, ref.version)
            sources = self._good_readable(chunk, effective)
            if sources:
                holders = self.replicas[chunk]
                source = max(
                    sources, key=lambda ds: (holders[ds].length_bytes, -self.servers[ds].load, ds)
                )
                recovery = Recovery(chunk, ref.version, opened_ns, source, effective)
            elif ref.length_bytes == 0 and not self.replicas.get(chunk):
                recovery = Recovery(chunk, ref.version, opened_ns, None, None)
            else:
                continue
            self._recovering[chunk] = now_s + RECOVERY_RETRY_S
            found.append(recovery)
        return found

    def recovery_started(self, recovery: Recovery, opened_ns: int) -> None:
        """The log moved the chunk to ``version + 1``, recovering since ``opened_ns``."""
        ref = self.refs.get(recovery.chunk)
        if ref is not None and ref.version == recovery.version:
            version = ChunkVersion(ref.version + 1)
            recovering = ChunkRef(version, ref.length_bytes, ref.goal, opened_ns, True)
            self._set_ref(recovery.chunk, recovering)
        grant = self.grants.get(recovery.chunk)
        if grant is not None and grant.version <= recovery.version:
            del self.grants[recovery.chunk]

    def recovery_fenced(self, recovery: Recovery, length_bytes: int, now_s: float) -> None:
        """The source of ``recovery`` now holds ``version + 1`` with ``length_bytes``."""
        source = recovery.source
        invariant(source is not None, "a recovery without a source was fenced")
        assert source is not None
        if source in self.servers:
            replica = Replica(ChunkVersion(recovery.version + 1), length_bytes, False)
            self._set_replica(recovery.chunk, source, replica, now_s)

    def recovery_done(self, recovery: Recovery, *, committed: bool, now_s: float) -> None:
        """The log closed the recovered version (``committed``), or the attempt failed
        or lost a race with a writer: tried again after RECOVERY_RETRY_S if the chunk is
        still open then."""
        chunk = recovery.chunk
        if not committed:
            self._recovering[chunk] = now_s + RECOVERY_RETRY_S
            return
        self._recovering.pop(chunk, None)
        ref = self.refs.get(chunk)
        if ref is not None and ref.version == recovery.version + 1 and ref.recovering:
            self._set_ref(chunk, ChunkRef(ref.version, ref.length_bytes, ref.goal))

    # ------------------------------------------------------------------ namespace input

    @property
    def backlog(self) -> int:
        """Chunks waiting to be re-examined by :meth:`plan`."""
        return len(self._dirty)

    def safe_mode(self, now_s: float) -> bool:
        """True while the reign is too young to delete or copy anything (rule 3)."""
        return (
            now_s < self.started_s + self.options.grace_s
            or self.scan_started_s is None
            or not self.admin_modes_installed
        )

    def install_scan(self, scanned: dict[ChunkId, ChunkRef], started_s: float) -> None:
        """A complete namespace scan that started at ``started_s`` becomes the chunk view.

        Chunks opened for write since it started keep the newer version their grant
        knows.  A grant ends once the view has its version committed (or gone).  Every
        chunk is re-examined.
        """
        merged = dict(scanned)
        for chunk, grant in list(self.grants.items()):
            seen = merged.get(chunk)
            if grant.granted_s >= started_s and (seen is None or seen.version < grant.version):
                merged[chunk] = grant.ref
            elif seen is None or seen.version != grant.version or seen.opened_ns is None:
                del self.grants[chunk]
        self.refs = merged
        self.open_refs = {
            chunk: ref.opened_ns for chunk, ref in merged.items() if ref.opened_ns is not None
        }
        self.scan_started_s = started_s
        self.scans_completed += 1
        self._dirty_all(self.replicas)
        self._dirty_all(self.refs)

    def deletion_entries(self, entries: Sequence[DeletedChunk], now_s: float) -> list[DeletedChunk]:
        """Work on one page of the namespace's deletion queue; return the entries to ack.

        An entry is judged only against a scan that started after the entry was first
        seen, so the view knows whether its chunk is still referenced:

        * still referenced at a newer version: only stale replicas are garbage, and the
          per-chunk reconciliation deletes those once it is safe; acknowledged at once;
        * otherwise every replica of version <= the entry's is garbage: deletes go to
          their live holders, and the entry is acknowledged once none remains (replicas
          on dead servers are reconciled when those come back).
        """
        if self.safe_mode(now_s):
            return []
        first_seen: dict[tuple[ChunkId, ChunkVersion], float] = {}
        acks: list[DeletedChunk] = []
        for entry in entries:
            key = (entry.chunk, entry.version)
            seen_s = self._deletion_first_seen_s.get(key, now_s)
            if len(first_seen) < DELETION_ENTRIES_TRACKED_MAX:
                first_seen[key] = seen_s
            invariant(self.scan_started_s is not None, "deletions judged without a scan")
            assert self.scan_started_s is not None
            if self.scan_started_s <= seen_s:
                continue
            ref = self.refs.get(entry.chunk)
            if ref is not None and ref.version > entry.version:
                acks.append(entry)
                continue
            if ref is not None:
                self._forget_ref(entry.chunk)
            remaining = False
            for ds, stored in self.replicas.get(entry.chunk, {}).items():
                if stored.version > entry.version or self.state_of(ds) is ServerState.DEAD:
                    continue
                remaining = True
                self._delete(ds, entry.chunk, stored.version)
            if not remaining:
                acks.append(entry)
            self._dirty[entry.chunk] = None
        self._deletion_first_seen_s = first_seen
        return acks

    # ------------------------------------------------------------------ planning

    def plan(self, now_s: float) -> bool:
        """Expire stale work, re-examine changed chunks and start copies; True when work
        is left for another call (the shell yields between calls)."""
        self._expire(now_s)
        if self.safe_mode(now_s):
            return False
        self._maintenance_unreported = sum(
            1
            for record in self.servers.values()
            if record.admin_state is ServerState.MAINTENANCE and not record.full_reports
        )
        budget = RECONCILES_PER_PLAN_MAX
        while self._dirty and budget > 0:
            chunk = next(iter(self._dirty))
            del self._dirty[chunk]
            self._reconcile(chunk, now_s)
            budget -= 1
        self._start_copies(now_s)
        return bool(self._dirty)

    def _expire(self, now_s: float) -> None:
        for jobs in list(self.copies.values()):
            for job in [j for j in jobs if j.deadline_s <= now_s]:
                self._end_copy(job, failed=True, now_s=now_s)
        for key in [k for k, t in self._copy_failures.items() if now_s - t >= COPY_AVOID_S]:
            del self._copy_failures[key]
        for chunk in [c for c, until_s in self._trim_holds.items() if until_s <= now_s]:
            del self._trim_holds[chunk]
            self._dirty[chunk] = None

    def _reconcile(self, chunk: ChunkId, now_s: float) -> None:
        """Classify one chunk and queue the deletes and copies it needs (module rules)."""
        self._set_health(chunk, None)
        queued = self._under.pop(chunk, None)
        self._unschedulable.pop(chunk, None)
        self._held_for_maintenance.pop(chunk, None)
        holders = self.replicas.get(chunk, {})
        ref = self.refs.get(chunk)
        if ref is not None and ref.opened_ns is not None:
            return
        if ref is None:
            self._reconcile_unreferenced(chunk, holders)
            return
        effective = self._effective_version(chunk, ref.version)
        for job in [j for j in self.copies.get(chunk, ()) if j.version != effective]:
            self._end_copy(job, failed=False, now_s=now_s)
        readable = self._good_readable(chunk, effective)
        if not readable:
            self._set_health(chunk, ChunkHealth.MISSING)
            return
        # A replica whose delete is queued no longer counts, so that no second delete
        # (a trim decided again, a balancer's release) takes the chunk below its goal.
        counted = [
            ds
            for ds, stored in holders.items()
            if stored.version == effective
            and not stored.corrupt
            and self.state_of(ds) in COUNTED_STATES
            and self._deleting.get((chunk, ds)) != effective
        ]
        corrupt: list[DataserverId] = []
        for ds, stored in holders.items():
            if self.state_of(ds) is ServerState.DEAD or stored.version > ref.version:
                continue
            if stored.version < effective or (stored.version > effective and stored.corrupt):
                self._delete(ds, chunk, stored.version)
            elif stored.version == effective and stored.corrupt:
                corrupt.append(ds)
        copying = len(self.copies.get(chunk, ()))
        if len(counted) < ref.goal:
            self._set_health(chunk, ChunkHealth.UNDER_REPLICATED)
        presumed = min(self._maintenance_unreported, max(0, ref.goal - len(counted) - copying))
        if presumed:
            self._held_for_maintenance[chunk] = None
        if len(counted) + copying + presumed < ref.goal:
            self._under[chunk] = len(counted)
            if queued != len(counted):  # else its heap entry is still there
                heapq.heappush(self._under_heap, (len(counted), chunk))
            return
        if len(counted) >= ref.goal:
            for ds in corrupt:
                self._delete(ds, chunk, effective)
        excess = len(counted) - ref.goal
        if excess > 0 and not copying and chunk not in self._trim_holds:
            trimmable = [ds for ds in counted if self.state_of(ds) is ServerState.LIVE]
            trimmable.sort(key=lambda ds: (self.servers[ds].space.available_bytes, ds))
            for ds in trimmable[:excess]:
                self._delete(ds, chunk, effective)
            self._set_health(chunk, ChunkHealth.OVER_REPLICATED)

    def _reconcile_unreferenced(self, chunk: ChunkId, holders: dict[DataserverId, Replica]) -> None:
        """Replicas of a chunk no file references are garbage, once a scan that started
        after they were first reported has confirmed it."""
        if not holders:
            return
        first_seen_s = self._first_seen_s.get(chunk)
        if self.scan_started_s is None or first_seen_s is None:
            return
        if first_seen_s >= self.scan_started_s:
            return
        self._set_health(chunk, ChunkHealth.ORPHAN)
        for ds, stored in holders.items():
            if self.state_of(ds) is not ServerState.DEAD:
                self._delete(ds, chunk, stored.version)

    def _start_copies(self, now_s: float) -> None:
        """Start copies for queued chunks, fewest live replicas first, within the rate."""
        self._refill(now_s)
        tries = 0
        while self._under_heap and tries < COPY_STARTS_PER_PLAN_MAX and self._tokens_bytes > 0:
            count, chunk = self._under_heap[0]
            if self._under.get(chunk) != count:
                heapq.heappop(self._under_heap)
                continue
            heapq.heappop(self._under_heap)
            tries += 1
            del self._under[chunk]
            if self._start_copy(chunk, now_s):
                self._dirty[chunk] = None
            else:
                self._unschedulable[chunk] = count

    def _start_copy(self, chunk: ChunkId, now_s: float) -> bool:
        ref = self.refs[chunk]
        effective = self._effective_version(chunk, ref.version)
        holders = self.replicas.get(chunk, {})
        sources = [
            ds
            for ds in self._good_readable(chunk, effective)
            if self.servers[ds].copies_out < COPIES_PER_SOURCE_MAX
        ]
        if not sources:
            return False
        sources.sort(key=lambda ds: (self.servers[ds].load, self._rng.random()))
        source = sources[0]
        length = holders[source].length_bytes
        busy = {job.target for job in self.copies.get(chunk, ())}
        avoid = {ds for (c, ds) in self._copy_failures if c == chunk}
        targets = self._choose(1, length, set(holders) | busy | avoid, copy_target=True)
        if not targets:
            # Last resort: a live server holding a stale or corrupt copy (a copy replaces it).
            replaceable = [
                ds
                for ds, stored in holders.items()
                if (stored.version < effective or (stored.version == effective and stored.corrupt))
                and ds not in busy
                and self.state_of(ds) is ServerState.LIVE
                and self.servers[ds].copies_in < COPIES_PER_TARGET_MAX
                and len(self.servers[ds].commands) < SERVER_COMMANDS_MAX
            ]
            if not replaceable:
                return False
            targets = [replaceable[self._rng.randrange(len(replaceable))]]
        target = targets[0]
        job = CopyJob(chunk, effective, source, target, length, now_s + _copy_timeout_s(length))
        self.copies.setdefault(chunk, []).append(job)
        self.servers[target].copies_in += 1
        self.servers[source].copies_out += 1
        self.servers[target].commands.append(_CopyOrder(chunk, effective, source))
        self._tokens_bytes -= max(1, length)
        return True

    def _end_copy(self, job: CopyJob, *, failed: bool, now_s: float) -> None:
        jobs = self.copies.get(job.chunk, [])
        if job not in jobs:
            return
        jobs.remove(job)
        if not jobs:
            del self.copies[job.chunk]
        for ds, attribute in ((job.target, "copies_in"), (job.source, "copies_out")):
            record = self.servers.get(ds)
            if record is not None:
                setattr(record, attribute, max(0, getattr(record, attribute) - 1))
        if failed:
            self.copies_failed += 1
            self._copy_failures[(job.chunk, job.target)] = now_s
        self._dirty[job.chunk] = None
        self._release_unschedulable()

    def _refill(self, now_s: float) -> None:
        elapsed_s = max(0.0, now_s - self._tokens_at_s)
        self._tokens_at_s = now_s
        self._tokens_bytes = min(
            float(self._burst_bytes()),
            self._tokens_bytes + elapsed_s * self.options.copy_rate_bytes_s,
        )

    def _burst_bytes(self) -> int:
        """One second of copy traffic, and at least one chunk (a copy is never split)."""
        return max(int(self.options.copy_rate_bytes_s), self.options.chunk_size_bytes)

    def _release_unschedulable(self) -> None:
        """Capacity or topology changed: queue again the chunks no copy could start for."""
        self._dirty_all(self._unschedulable)
        self._unschedulable.clear()

    # ------------------------------------------------------------------ commands

    def _delete(self, ds: DataserverId, chunk: ChunkId, version: ChunkVersion) -> None:
        """Queue a delete of one replica (once; it is confirmed by the next heartbeat)."""
        key = (chunk, ds)
        if self._deleting.get(key) == version:
            return
        record = self.servers[ds]
        if len(record.commands) >= SERVER_COMMANDS_MAX:
            return
        self._deleting[key] = version
        record.commands.append(DeleteReplica(chunk, version))

    def _deliver(
        self, record: ServerRecord, now_s: float
    ) -> tuple[DeleteReplica | ReplicateChunk, ...]:
        """The next commands for ``record``, skipping those whose work was called off."""
        commands: list[DeleteReplica | ReplicateChunk] = []
        ds = record.dataserver_id
        while record.commands and len(commands) < HEARTBEAT_COMMANDS_MAX:
            queued = record.commands.popleft()
            if isinstance(queued, DeleteReplica):
                if self._deleting.get((queued.chunk_id, ds)) != queued.version:
                    continue
                record.delivered_deletes.append((queued.chunk_id, queued.version))
                self.deletes_sent += 1
                commands.append(queued)
                continue
            job = next(
                (
                    j
                    for j in self.copies.get(queued.chunk, ())
                    if j.target == ds and j.version == queued.version and not j.delivered
                ),
                None,
            )
            source = self.servers.get(queued.source)
            if job is None or source is None or source.state not in READABLE_STATES:
                continue
            job.delivered = True
            job.deadline_s = now_s + _copy_timeout_s(job.length_bytes)
            commands.append(
                ReplicateChunk(
                    queued.chunk,
                    queued.version,
                    source.address,
                    self._read_token(queued.chunk, queued.version),
                )
            )
        return tuple(commands)

    # ------------------------------------------------------------------ the replica map

    def _set_replica(
        self, chunk: ChunkId, ds: DataserverId, replica: Replica, now_s: float
    ) -> None:
        holders = self.replicas.setdefault(chunk, {})
        previous = holders.get(ds)
        self._corrupt_replicas += replica.corrupt - (previous is not None and previous.corrupt)
        holders[ds] = replica
        self._first_seen_s.setdefault(chunk, now_s)
        self.servers[ds].chunks.add(chunk)
        self._dirty[chunk] = None
        if replica.corrupt:
            return
        for job in list(self.copies.get(chunk, ())):
            if job.target == ds and job.version == replica.version:
                self.copies_done += 1
                self.bytes_copied += job.length_bytes
                self._end_copy(job, failed=False, now_s=now_s)

    def _drop_replica(self, chunk: ChunkId, ds: DataserverId) -> None:
        holders = self.replicas.get(chunk)
        dropped = None if holders is None else holders.pop(ds, None)
        if dropped is not None:
            self._corrupt_replicas -= dropped.corrupt
            if not holders:
                del self.replicas[chunk]
                self._first_seen_s.pop(chunk, None)
        self.servers[ds].chunks.discard(chunk)
        self._dirty[chunk] = None

    def _good_readable(self, chunk: ChunkId, version: ChunkVersion) -> list[DataserverId]:
        return [
            ds
            for ds, stored in self.replicas.get(chunk, {}).items()
            if stored.version == version
            and not stored.corrupt
            and self.state_of(ds) in READABLE_STATES
        ]

    def _effective_version(self, chunk: ChunkId, version: ChunkVersion) -> ChunkVersion:
        """``version`` if a dataserver reported holding it (in any state, live or dead);
        else the newest older version with a readable good replica; else ``version``
        (the chunk is missing).

        Only reports (and probes) count, not grants: data acknowledged at a version was
        synced on every chain member, and a sync reports the replica at once, so a
        version nobody reported holds nothing that was committed.
        """
        holders = self.replicas.get(chunk, {})
        if any(stored.version == version for stored in holders.values()):
            return version
        older = [
            stored.version
            for ds, stored in holders.items()
            if stored.version < version
            and not stored.corrupt
            and self.state_of(ds) in READABLE_STATES
        ]
        return max(older, default=version)

    def _choose(
        self,
        count: int,
        needed_bytes: int,
        exclude: set[DataserverId],
        *,
        copy_target: bool = False,
    ) -> list[DataserverId]:
        if count <= 0:
            return []
        candidates = [
            Candidate(
                record.dataserver_id,
                record.available_bytes(),
                record.active_writes + record.placed_writes + record.copies_in,
            )
            for record in self.servers.values()
            if record.state is ServerState.LIVE
            and record.dataserver_id not in exclude
            and not (
                copy_target
                and (
                    record.copies_in >= COPIES_PER_TARGET_MAX
                    or len(record.commands) >= SERVER_COMMANDS_MAX
                )
            )
        ]
        return choose_targets(candidates, count, needed_bytes, self._rng)

    def _reset_session(self, record: ServerRecord, *, restarted: bool) -> None:
        """A dataserver's session ended (it re-registers, or it died): commands not yet
        carried out are void and will be decided again.  Copies it was already making
        may still land unless the process ``restarted`` (or died)."""
        ds = record.dataserver_id
        record.commands.clear()
        record.delivered_deletes.clear()
        record.pending_report = None
        for key in [k for k in self._deleting if k[1] == ds]:
            del self._deleting[key]
        for jobs in list(self.copies.values()):
            for job in list(jobs):
                if (job.target == ds and (restarted or not job.delivered)) or (
                    job.source == ds and restarted
                ):
                    self._end_copy(job, failed=restarted, now_s=record.last_heard_s)
        self._dirty_all(record.chunks)

    def _claim_address(self, record: ServerRecord, address: str) -> None:
        """``address`` now belongs to ``record``; an older owner of it is gone."""
        owner = self._by_address.get(address)
        if owner is not None and owner != record.dataserver_id:
            other = self.servers[owner]
            if other.alive:
                other.alive = False
                self._reset_session(other, restarted=True)
        if record.address != address and self._by_address.get(record.address) == (
            record.dataserver_id
        ):
            del self._by_address[record.address]
        record.address = address
        self._by_address[address] = record.dataserver_id

    def _set_health(self, chunk: ChunkId, health: ChunkHealth | None) -> None:
        previous = self._health.pop(chunk, None)
        if previous is not None:
            self._health_counts[previous] -= 1
        if health is not None:
            self._health[chunk] = health
            self._health_counts[health] += 1

    def health(self, chunk: ChunkId) -> ChunkHealth | None:
        """How the last look at ``chunk`` classified it (None: healthy or unknown)."""
        return self._health.get(chunk)

    def _dirty_all(self, chunks: Iterable[ChunkId]) -> None:
        for chunk in chunks:
            self._dirty[chunk] = None

    # ------------------------------------------------------------------ reporting

    def counters(self, now_s: float) -> ClusterCounters:
        """Counts for the admin report (O(dataservers + copies in flight))."""
        states = [record.state for record in self.servers.values()]
        return ClusterCounters(
            epoch=self.epoch,
            safe_mode=self.safe_mode(now_s),
            dataservers_live=states.count(ServerState.LIVE),
            dataservers_dead=states.count(ServerState.DEAD),
            dataservers_decommissioning=states.count(ServerState.DECOMMISSIONING),
            dataservers_maintenance=states.count(ServerState.MAINTENANCE),
            chunks_referenced=len(self.refs),
            chunks_with_replicas=len(self.replicas),
            under_replicated=self._health_counts[ChunkHealth.UNDER_REPLICATED],
            over_replicated=self._health_counts[ChunkHealth.OVER_REPLICATED],
            missing=self._health_counts[ChunkHealth.MISSING],
            orphans=self._health_counts[ChunkHealth.ORPHAN],
            corrupt_replicas=self._corrupt_replicas,
            replication_queue=len(self._under) + len(self._unschedulable),
            copies_in_flight=sum(len(jobs) for jobs in self.copies.values()),
            copies_done=self.copies_done,
            copies_failed=self.copies_failed,
            bytes_copied=self.bytes_copied,
            deletes_sent=self.deletes_sent,
            deletion_queue=self.deletion_queue,
            writes_in_flux=len(self.open_refs),
            scans_completed=self.scans_completed,
        )

    def dataservers(self, now_s: float) -> list[DataserverStatus]:
        return [
            DataserverStatus(
                record.dataserver_id,
                record.address,
                record.state,
                record.space,
                record.active_writes,
                record.active_reads,
                max(0.0, now_s - record.last_heard_s),
                len(record.chunks),
                len(record.commands),
                record.copies_in,
                record.copies_out,
            )
            for record in sorted(self.servers.values(), key=lambda r: r.dataserver_id)
        ]


def _replica_of(report: ReplicaReport) -> Replica:
    return Replica(report.version, max(0, report.length_bytes), report.corrupt)


def _copy_timeout_s(length_bytes: int) -> float:
    return COPY_TIMEOUT_BASE_S + length_bytes / COPY_TIMEOUT_RATE_BYTES_S


def _check_address(address: str) -> None:
    try:
        parse_address(address)
    except ValueError as error:
        raise RequestRefused(errno.EINVAL, str(error)) from None
