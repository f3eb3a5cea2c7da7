"""The cluster protocol: methods the metaserver leader serves, called by dataservers.

Replica locations are soft state in the leader (as HDFS block locations): rebuilt from
these reports after every leader change, never written to the Paxos log.

**Finding the leader.**  A dataserver tries the configured metaservers in turn.  A
follower answers any method here with ``RpcError(NOT_LEADER, message=leader address or
"")``; the dataserver then calls that address (or the next configured one), backing off
between rounds.

**Life of a dataserver session with a leader.**

1. :data:`REGISTER` with its stable id (a random 63-bit number the dataserver draws at its
   first start and keeps in its data directory), its address and its space.  The reply's
   ``epoch`` identifies the leader's reign (its ballot or term as an int; any change means
   a new leader).
2. :data:`FULL_REPORT`: every replica it stores, in batches of at most
   :data:`REPORT_BATCH_REPLICAS_MAX`.  When the batch marked ``final`` arrives, the
   leader replaces everything it knew of this dataserver's replicas by the union of the
   batches of that ``report_id``.
3. :data:`HEARTBEAT` every ``heartbeat_interval_s``: space, load, and the *incremental*
   report since the previous heartbeat or full report: ``removed`` replicas first, then
   ``added`` ones (an added entry is an upsert: this replica now exists with this version
   and length; a version bump is a removal of the old version plus an addition of the
   new).  The reply carries the leader's epoch and commands.  When the epoch differs from
   the one the dataserver last reported to, or a :class:`SendFullReport` command arrives,
   the dataserver sends a full report again.  A leader that does not know the dataserver
   (it has no registration for this id) answers ``RpcError(ENOENT)``; the dataserver then
   registers and sends a full report.
4. :data:`REPORT_CORRUPT` whenever a read or the scrubber finds a replica that fails its
   checksums (clients may send it too, naming the dataserver by address).

Heartbeat silence for ``[metaserver] dataserver_dead_after_s`` marks a dataserver dead.
"""

from __future__ import annotations

from dataclasses import dataclass

from wire import schema
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.tokens import ChunkToken

REPORT_BATCH_REPLICAS_MAX = 10_000
"""Replicas in one :data:`FULL_REPORT` batch (about 300 KiB of header, under the 1 MiB
frame header limit)."""
INCREMENTAL_REPLICAS_MAX = 10_000
"""Added plus removed entries in one heartbeat; the rest waits for the next one."""
HEARTBEAT_COMMANDS_MAX = 1_000
"""Commands in one heartbeat reply; the leader keeps the rest for later heartbeats."""
REASON_CHARS_MAX = 512


@schema.message("cluster.replica")
@dataclass(frozen=True)
class ReplicaReport:
    """One stored replica. ``corrupt``: it failed verification (report it, replace it)."""

    chunk_id: ChunkId
    version: ChunkVersion
    length_bytes: int
    corrupt: bool


@schema.message("cluster.replica_key")
@dataclass(frozen=True)
class ReplicaKey:
    chunk_id: ChunkId
    version: ChunkVersion


@schema.message("cluster.space")
@dataclass(frozen=True)
class Space:
    """``capacity_bytes``: the disk's size lowered to the configured cap;
    ``available_bytes``: what new replicas may still fill; ``used_bytes``: what the
    replicas occupy on disk."""

    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    replica_count: int


@schema.message("cluster.register")
@dataclass(frozen=True)
class RegisterRequest:
    """``address`` (HOST:PORT) is where clients and other dataservers reach it;
    ``incarnation`` is drawn at each process start (a change means it restarted)."""

    dataserver_id: DataserverId
    address: str
    incarnation: int
    space: Space


@schema.message("cluster.register_reply")
@dataclass(frozen=True)
class RegisterReply:
    epoch: int


@schema.message("cluster.heartbeat")
@dataclass(frozen=True)
class HeartbeatRequest:
    """Sent every ``heartbeat_interval_s``; ``active_writes`` / ``active_reads`` are the
    requests in progress now (placement prefers servers with fewer active writes)."""

    dataserver_id: DataserverId
    address: str
    incarnation: int
    space: Space
    active_writes: int
    active_reads: int
    removed: tuple[ReplicaKey, ...]
    added: tuple[ReplicaReport, ...]


@schema.message("cluster.delete_replica")
@dataclass(frozen=True)
class DeleteReplica:
    """Command: remove this replica (an old version, an over-replicated or corrupt copy).
    A no-op when that version is not stored."""

    chunk_id: ChunkId
    version: ChunkVersion


@schema.message("cluster.replicate_chunk")
@dataclass(frozen=True)
class ReplicateChunk:
    """Command: copy ``(chunk_id, version)`` from the dataserver at ``source`` (HOST:PORT),
    showing ``token`` (signed for this chunk version) to the source."""

    chunk_id: ChunkId
    version: ChunkVersion
    source: str
    token: ChunkToken


@schema.message("cluster.send_full_report")
@dataclass(frozen=True)
class SendFullReport:
    """Command: send a full chunk report now."""


Command = DeleteReplica | ReplicateChunk | SendFullReport


@schema.message("cluster.heartbeat_reply")
@dataclass(frozen=True)
class HeartbeatReply:
    """At most :data:`HEARTBEAT_COMMANDS_MAX` commands, executed in order."""

    epoch: int
    commands: tuple[Command, ...]


@schema.message("cluster.full_report")
@dataclass(frozen=True)
class FullReportRequest:
    """One batch of a full report; batches of a ``report_id`` are numbered from 0 and the
    last one has ``final`` set."""

    dataserver_id: DataserverId
    report_id: int
    batch_index: int
    final: bool
    replicas: tuple[ReplicaReport, ...]


@schema.message("cluster.full_report_reply")
@dataclass(frozen=True)
class FullReportReply:
    epoch: int


@schema.message("cluster.report_corrupt")
@dataclass(frozen=True)
class CorruptReplicaRequest:
    """The replica ``(chunk_id, version)`` on the dataserver at ``dataserver_address``
    failed verification.  ``dataserver_id`` is 0 when the reporter (a client) does not
    know it; ``reporter`` names who found it ("scrubber", "read", "client NAME");
    ``reason`` is at most :data:`REASON_CHARS_MAX` characters."""

    chunk_id: ChunkId
    version: ChunkVersion
    dataserver_id: DataserverId
    dataserver_address: str
    reporter: str
    reason: str


@schema.message("cluster.ack")
@dataclass(frozen=True)
class Ack:
    """An empty reply."""


REGISTER = schema.Method("cluster.register", RegisterRequest, RegisterReply)
HEARTBEAT = schema.Method("cluster.heartbeat", HeartbeatRequest, HeartbeatReply)
FULL_REPORT = schema.Method("cluster.full_report", FullReportRequest, FullReportReply)
REPORT_CORRUPT = schema.Method("cluster.report_corrupt", CorruptReplicaRequest, Ack)
