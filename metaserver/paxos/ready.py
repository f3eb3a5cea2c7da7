"""What a step hands back to the owner, and what the owner may ask of the core.

The Ready loop (after etcd-io/raft): after feeding the node messages, ticks and
proposals, the owner takes ``node.ready()`` and, in this order,

1. installs ``snapshot_install`` if present, durably (it replaces the state machine);
2. appends ``records`` to its log and makes them durable (one fsync for all);
3. sends ``messages`` -- never before step 2 completed, since promises and votes in
   them are only true once durable;
4. applies ``committed`` in order, then serves ``reads`` (each is safe once the state
   machine has applied its ``index``, which the entries of the same Ready guarantee);
5. performs ``snapshot_reads`` (answering each with ``node.snapshot_read_done``) and
   looks at ``notices``;
6. calls ``node.advance(ready)``; only then may it take the next Ready.

Steps may keep arriving between ``ready()`` and ``advance()``; their effects go into
the next Ready.

Three relaxations are safe and worth having (the metaserver uses all of them, and the
simulation runs about half its seeds with them: ``SimConfig.production_ordering``):

* A Ready whose only records are ``CommitRecord`` need not hold back its messages, nor
  be fsynced before ``advance()``: a commit index is a hint that shortens recovery,
  never something a peer relies on.
* ``committed`` may be applied before the fsync of the same Ready: a chosen value is
  chosen whether or not this replica's copy of it is on disk yet, and a restart
  re-learns it from the log or from its peers.
* The leader's ``Accept``, ``Commit`` and ``Heartbeat`` messages may leave before the
  fsync of their Ready: they reveal no acceptor state, and their ballot was made
  durable in an earlier Ready (the one that sent the Prepares). The leader still
  counts its own vote only in ``advance()``, so nothing is committed on the strength
  of a record that is not yet on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from metaserver.paxos.messages import Message
from metaserver.paxos.records import Record
from metaserver.paxos.types import (
    Ballot,
    ConfigEpoch,
    Entry,
    EntryKind,
    Membership,
    NodeId,
    ReadId,
    Slot,
    SnapshotMeta,
)


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message for replica ``to``; send it after the Ready's records are durable."""

    to: NodeId
    message: Message


@dataclass(frozen=True, slots=True)
class CommittedEntry:
    """A chosen slot to apply. No-op and membership slots are included so that the
    owner's applied index is simply the last ``slot`` it applied."""

    slot: Slot
    kind: EntryKind
    commands: tuple[bytes, ...]
    membership: Membership | None

    def entry(self) -> Entry:
        """The chosen value as it travelled in the log."""
        config = (self.membership,) if self.membership is not None else ()
        return Entry(self.kind, self.commands, config)


@dataclass(frozen=True, slots=True)
class SnapshotInstall:
    """Replace the state machine with this snapshot (received from a peer) and keep
    ``meta`` next to it; later committed entries follow ``meta.index``."""

    meta: SnapshotMeta
    data: bytes


@dataclass(frozen=True, slots=True)
class SnapshotRead:
    """Read ``length`` bytes at ``offset`` of the snapshot at ``index`` for peer ``to``
    and hand them to ``node.snapshot_read_done`` (``None`` if that snapshot is gone)."""

    to: NodeId
    index: Slot
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ReadReady:
    """Read ``read_id`` may be served from the state at ``index`` (or any later one)."""

    read_id: ReadId
    index: Slot


class StepDownReason(IntEnum):
    PREEMPTED = 0
    """A higher ballot was promised by someone we asked."""
    HIGHER_BALLOT = 1
    """Another leader with a higher ballot is active."""
    QUORUM_LOST = 2
    """No quorum answered for an election timeout."""
    REMOVED = 3
    """The membership no longer makes this replica a voter."""
    LAGGING = 4
    """A replica knows chosen slots this leader cannot obtain; let it lead."""
    ELECTION_FAILED = 5
    """Phase 1 did not gather a quorum in time."""


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    """The replica now follows ``leader`` (``None``: no known leader)."""

    leader: NodeId | None
    ballot: Ballot | None


@dataclass(frozen=True, slots=True)
class SteppedDown:
    """This replica stopped leading or campaigning with ``ballot``."""

    ballot: Ballot
    reason: StepDownReason


@dataclass(frozen=True, slots=True)
class ProposalsDropped:
    """Commands queued here that never got a slot; they will not be committed."""

    commands: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ReadsFailed:
    """Reads that cannot complete here (leadership lost); retry them at the leader."""

    read_ids: tuple[ReadId, ...]


@dataclass(frozen=True, slots=True)
class MembershipCommitted:
    """A membership entry was chosen at ``entry_slot``; it governs ``effective_slot`` on."""

    entry_slot: Slot
    effective_slot: Slot
    membership: Membership


Notice = LeaderChanged | SteppedDown | ProposalsDropped | ReadsFailed | MembershipCommitted


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the owner must do, in the order documented in this module."""

    records: tuple[Record, ...]
    messages: tuple[Outbound, ...]
    committed: tuple[CommittedEntry, ...]
    snapshot_install: SnapshotInstall | None
    snapshot_reads: tuple[SnapshotRead, ...]
    reads: tuple[ReadReady, ...]
    notices: tuple[Notice, ...]


class ProposeResult(IntEnum):
    OK = 0
    NOT_LEADER = 1
    QUEUE_FULL = 2
    TOO_LARGE = 3


class ReadResult(IntEnum):
    OK = 0
    NOT_LEADER = 1
    BUSY = 2


class MembershipChangeKind(IntEnum):
    ADD_LEARNER = 0
    PROMOTE = 1
    REMOVE = 2
    REPLACE = 3
    """Promote the caught-up learner ``node`` and retire the voter ``old_node`` at once."""


@dataclass(frozen=True, slots=True)
class MembershipChange:
    kind: MembershipChangeKind
    node: NodeId
    old_node: NodeId | None = None


class MembershipResult(IntEnum):
    OK = 0
    NOT_LEADER = 1
    CHANGE_IN_PROGRESS = 2
    """A previous change is not yet chosen and in force."""
    UNKNOWN_NODE = 3
    ALREADY_MEMBER = 4
    ID_RETIRED = 5
    """Node ids are never reused."""
    LEARNER_BEHIND = 6
    LAST_VOTER = 7
    INVALID = 8


class Role(IntEnum):
    FOLLOWER = 0
    PROBING = 1
    PREPARING = 2
    LEADER = 3


@dataclass(frozen=True, slots=True)
class PeerStatus:
    node: NodeId
    voter: bool
    match_index: Slot
    """Highest slot the peer is known to hold: voted at this ballot or reported chosen."""
    last_contact_ms: int | None


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """One replica's view of the group, for admin tools."""

    node_id: NodeId
    role: Role
    leader_id: NodeId | None
    promised: Ballot
    leader_ballot: Ballot | None
    commit_index: Slot
    applied_index: Slot
    snapshot_index: Slot
    log_first_slot: Slot
    log_last_slot: Slot
    membership: Membership | None
    pending_membership: ConfigEpoch | None
    """A chosen membership that does not govern the next slot yet."""
    queued_commands: int
    lease_expires_at_ms: int | None
    peers: tuple[PeerStatus, ...]
