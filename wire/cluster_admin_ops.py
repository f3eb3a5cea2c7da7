"""The admin RPCs of the cluster manager: what ``paxfs admin`` asks the metaserver leader.

The leader's cluster manager keeps the dataserver registry and the replica map as soft
state of its reign (see :mod:`wire.cluster_ops`), so these methods are served by the
leader only; a follower answers ``RpcError(NOT_LEADER, leader address)``: call them
through :meth:`fuse_client.meta_client.MetaClient.call`.  A leader young enough to be
in *safe mode* (reports still arriving, no namespace scan installed yet) answers the
read-only methods with ``safe_mode`` set, because its view may still be incomplete, and
refuses moves with EAGAIN (the client retries).

Methods:

* :data:`CLUSTER_HEALTH` -- counters, the chunk-health matrix (goal x replicas, as
  MooseFS shows it) and the repair queue's progress.
* :data:`LIST_DATASERVERS` -- one page of dataservers in id order.
* :data:`SET_DATASERVER_STATE` -- decommission, maintenance, or back to normal (unlike
  the rest, durable: the mode goes through the replicated log before the answer, so a
  new leader keeps it; see :mod:`tools.admin_servers`).
* :data:`FILE_CHUNKS` -- one page of a file's chunks with every known replica and its
  health, and a read token per chunk (``fsck``, ``fileinfo``).
* :data:`LIST_REPLICAS` -- one page of a dataserver's replicas with their holders (the
  balancer's input).
* :data:`MOVE_BEGIN` / :data:`MOVE_COMMIT` -- one balancer move.  The tool asks the
  target to copy the replica (``data.replicate``), verifies it, then commits: the leader
  records the target's replica and queues the delete of the source's only while the
  chunk keeps its goal of counted replicas without it, so an interrupted balancer never
  leaves a chunk below its goal.

Dataserver states as reported (:attr:`DataserverReport.state`) are the strings of
:data:`SERVER_STATES`; chunk health (:attr:`ChunkStatus.health`) those of
:data:`CHUNK_HEALTHS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from wire.ids import ChunkId, ChunkVersion, DataserverId, InodeId
from wire.schema import Method, message
from wire.tokens import ChunkToken

DATASERVER_PAGE_MAX = 500
"""Dataservers in one :data:`LIST_DATASERVERS` page (about 60 KiB)."""
FILE_CHUNKS_PAGE_MAX = 256
"""Chunks in one :data:`FILE_CHUNKS` page."""
REPLICAS_LISTED_MAX = 32
"""Replicas listed per chunk in a :data:`FILE_CHUNKS` page (the goal is at most 16;
more are stale or orphaned copies, counted in :attr:`ChunkStatus.replicas_unlisted`)."""
REPLICA_PAGE_MAX = 1000
"""Replicas in one :data:`LIST_REPLICAS` page."""
MATRIX_REPLICAS_MAX = 17
"""Replica counts at or above this share the last column of the matrix."""

SERVER_STATES = ("live", "dead", "decommissioning", "maintenance")
CHUNK_HEALTHS = ("healthy", "under-replicated", "over-replicated", "missing", "writing")
"""``writing``: opened for write a moment ago; replicas are in flux and left alone."""


class DataserverMode(IntEnum):
    """What an admin sets on a dataserver."""

    NORMAL = 0
    """Back to normal: live (or dead, if it is silent)."""
    DECOMMISSION = 1
    """Drain: never written to, still read from; its replicas do not count toward goals,
    so every chunk on it is copied elsewhere."""
    MAINTENANCE = 2
    """A planned restart: neither read nor written, but its replicas count toward goals,
    so its silence causes no re-replication."""


# ---------------------------------------------------------------- health and repair


@message("cadmin.health_request")
@dataclass(frozen=True)
class ClusterHealthRequest:
    pass


@message("cadmin.matrix_cell")
@dataclass(frozen=True)
class MatrixCell:
    """``chunks`` referenced chunks with goal ``goal`` have ``replicas`` good replicas of
    their current version (capped at :data:`MATRIX_REPLICAS_MAX`)."""

    goal: int
    replicas: int
    chunks: int


@message("cadmin.repair")
@dataclass(frozen=True)
class RepairProgress:
    """The re-replication queue and how fast it drains.

    ``replicas_wanted`` / ``bytes_wanted``: copies (and their bytes) still needed to bring
    every repairable chunk (one with a readable good replica) to its goal.
    ``episode_bytes_copied``: copied since the current repair began (the cluster was last
    seen with nothing to repair), for a progress bar.  ``rate_bytes_s``: copy rate seen
    over the last ``rate_window_s`` (0 when unknown); ``eta_s``: time to finish at that
    rate (or at the cap while no rate is known); None when there is nothing to repair.
    """

    queued_chunks: int
    copies_in_flight: int
    copies_done: int
    copies_failed: int
    bytes_copied: int
    replicas_wanted: int
    bytes_wanted: int
    episode_bytes_copied: int
    rate_bytes_s: float
    rate_window_s: float
    rate_cap_bytes_s: float
    eta_s: float | None


@message("cadmin.health")
@dataclass(frozen=True)
class ClusterHealthReply:
    """The leader's view of the cluster's health.

    ``matrix``: replicas that count toward goals (live and in-maintenance servers);
    ``matrix_readable``: replicas clients can read now (live and decommissioning
    servers).  Chunks being written are left out of both (``writes_in_flux``).
    """

    epoch: int
    safe_mode: bool
    scans_completed: int
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
    writes_in_flux: int
    deletion_queue: int
    deletes_sent: int
    matrix: tuple[MatrixCell, ...]
    matrix_readable: tuple[MatrixCell, ...]
    repair: RepairProgress


# ---------------------------------------------------------------- dataservers


@message("cadmin.list_dataservers")
@dataclass(frozen=True)
class ListDataserversRequest:
    """Dataservers with an id above ``after``, at most ``limit`` (clamped to
    :data:`DATASERVER_PAGE_MAX`)."""

    after: DataserverId = DataserverId(0)
    limit: int = DATASERVER_PAGE_MAX


@message("cadmin.dataserver")
@dataclass(frozen=True)
class DataserverReport:
    """One dataserver as the leader knows it.

    ``silent_ms``: since its last heartbeat.  For a decommissioning server,
    ``drain_chunks`` / ``drain_bytes`` are the chunks with a good current replica on it
    that still lack their goal of counted replicas elsewhere; ``decommissioned`` is set
    once there are none (outside safe mode): it may then be switched off.
    """

    dataserver_id: DataserverId
    address: str
    state: str
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    replicas: int
    silent_ms: int
    active_reads: int
    active_writes: int
    commands_queued: int
    copies_in: int
    copies_out: int
    drain_chunks: int
    drain_bytes: int
    decommissioned: bool


@message("cadmin.dataserver_page")
@dataclass(frozen=True)
class DataserverPage:
    safe_mode: bool
    dataservers: tuple[DataserverReport, ...]
    more: bool


@message("cadmin.set_dataserver_state")
@dataclass(frozen=True)
class SetDataserverStateRequest:
    """ENOENT when the leader knows no such dataserver."""

    dataserver_id: DataserverId
    mode: DataserverMode


# ---------------------------------------------------------------- files


@message("cadmin.file_chunks")
@dataclass(frozen=True)
class FileChunksRequest:
    """Chunks of a regular file from ``first_index`` on, at most ``limit`` (clamped to
    :data:`FILE_CHUNKS_PAGE_MAX`); namespace errors as ``GetChunks`` (ENOENT, EISDIR...)."""

    inode: InodeId
    first_index: int = 0
    limit: int = FILE_CHUNKS_PAGE_MAX


@message("cadmin.replica_health")
@dataclass(frozen=True)
class ReplicaHealth:
    """One stored replica of a chunk.

    ``stale``: another version than the current one (an older one is garbage; a newer
    one was never committed); ``counted``: it counts toward the goal; ``deleting``: a
    delete of it is queued.
    """

    dataserver_id: DataserverId
    address: str
    server_state: str
    version: ChunkVersion
    length_bytes: int
    corrupt: bool
    stale: bool
    counted: bool
    deleting: bool


@message("cadmin.chunk_status")
@dataclass(frozen=True)
class ChunkStatus:
    """One chunk of a file: the namespace's view (``version``, ``length``) and the
    replicas'.  ``current_version`` is what good replicas hold (older than ``version``
    while a write opened but nothing reached a dataserver yet); ``token`` is a read token
    for it; ``copying_to`` names dataservers a copy is under way to."""

    index: int
    chunk: ChunkId
    version: ChunkVersion
    current_version: ChunkVersion
    length: int
    goal: int
    health: str
    counted: int
    readable: int
    replicas: tuple[ReplicaHealth, ...]
    replicas_unlisted: int
    copying_to: tuple[str, ...]
    token: ChunkToken


@message("cadmin.file_chunks_reply")
@dataclass(frozen=True)
class FileChunksReply:
    """``goal`` is the file's goal in the namespace (what the cluster converges to)."""

    safe_mode: bool
    size: int
    chunk_size: int
    goal: int
    chunks: tuple[ChunkStatus, ...]
    more: bool


# ---------------------------------------------------------------- balancing


@message("cadmin.list_replicas")
@dataclass(frozen=True)
class ListReplicasRequest:
    """Replicas on ``dataserver_id`` of chunks with an id above ``after``, in chunk id
    order, at most ``limit`` (clamped to :data:`REPLICA_PAGE_MAX`)."""

    dataserver_id: DataserverId
    after: ChunkId = ChunkId(0)
    limit: int = REPLICA_PAGE_MAX


@message("cadmin.stored_replica")
@dataclass(frozen=True)
class StoredReplica:
    """One replica on the listed dataserver.  ``movable``: a good replica of the current
    version of a referenced, healthy chunk that is neither being written, copied nor
    deleted (the balancer may move it); ``holders``: every dataserver storing any version
    of the chunk."""

    chunk: ChunkId
    version: ChunkVersion
    length_bytes: int
    goal: int
    movable: bool
    holders: tuple[DataserverId, ...]


@message("cadmin.replica_page")
@dataclass(frozen=True)
class ReplicaPage:
    safe_mode: bool
    replicas: tuple[StoredReplica, ...]
    more: bool


@message("cadmin.move")
@dataclass(frozen=True)
class MoveRequest:
    """Move the replica of ``(chunk, version)`` from ``source`` to ``target``.

    :data:`MOVE_BEGIN` checks it (EAGAIN in safe mode; ENOENT for an unknown server or
    chunk; ESTALE when ``version`` is not current; EBUSY while the chunk is written,
    copied or deleted; EINVAL when the target is not live, already stores the chunk, or
    the source has no good replica of it).
    """

    chunk: ChunkId
    version: ChunkVersion
    source: DataserverId
    target: DataserverId


@message("cadmin.move_ticket")
@dataclass(frozen=True)
class MoveTicket:
    """What the tool needs for the copy: addresses, the replica's length, a read token."""

    source_address: str
    target_address: str
    length_bytes: int
    token: ChunkToken


@message("cadmin.move_commit")
@dataclass(frozen=True)
class MoveCommitRequest:
    """The target holds a verified copy of ``length_bytes``: switch the location."""

    move: MoveRequest
    length_bytes: int


@message("cadmin.move_result")
@dataclass(frozen=True)
class MoveResult:
    """``source_released``: the source's delete is queued (it goes with its next
    heartbeat); otherwise ``reason`` says why the source keeps its replica (the extra
    copy is then trimmed like any over-replication)."""

    source_released: bool
    reason: str


CLUSTER_HEALTH = Method("cadmin.cluster_health", ClusterHealthRequest, ClusterHealthReply)
LIST_DATASERVERS = Method("cadmin.list_dataservers", ListDataserversRequest, DataserverPage)
SET_DATASERVER_STATE = Method(
    "cadmin.set_dataserver_state", SetDataserverStateRequest, DataserverReport
)
FILE_CHUNKS = Method("cadmin.file_chunks", FileChunksRequest, FileChunksReply)
LIST_REPLICAS = Method("cadmin.list_replicas", ListReplicasRequest, ReplicaPage)
MOVE_BEGIN = Method("cadmin.move_begin", MoveRequest, MoveTicket)
MOVE_COMMIT = Method("cadmin.move_commit", MoveCommitRequest, MoveResult)
