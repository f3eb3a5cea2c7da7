"""Multi-Paxos consensus core: pure, deterministic, no sockets, clocks, disks or randomness.

The owner (the metaserver, or the simulation in ``tests/sim``) drives a
:class:`PaxosNode` per replica: ``step`` / ``tick`` / ``propose`` / ``request_read``,
then ``ready()`` -> persist records, send messages, apply entries -> ``advance()``.
See :mod:`metaserver.paxos.ready` for the exact contract of a Ready.
"""

from metaserver.paxos._invariant import PaxosInvariantError
from metaserver.paxos.messages import ALL_MESSAGE_TYPES, Message
from metaserver.paxos.node import PaxosNode, RandomSource
from metaserver.paxos.options import PaxosOptions, ReadMode
from metaserver.paxos.ready import (
    CommittedEntry,
    GroupStatus,
    LeaderChanged,
    MembershipChange,
    MembershipChangeKind,
    MembershipCommitted,
    MembershipResult,
    Notice,
    Outbound,
    PeerStatus,
    ProposalsDropped,
    ProposeResult,
    ReadReady,
    ReadResult,
    ReadsFailed,
    Ready,
    Role,
    SnapshotInstall,
    SnapshotRead,
    StepDownReason,
    SteppedDown,
)
from metaserver.paxos.records import ALL_RECORD_TYPES, Record
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
    initial_snapshot_meta,
)

__all__ = [
    "ALL_MESSAGE_TYPES",
    "ALL_RECORD_TYPES",
    "Ballot",
    "CommittedEntry",
    "ConfigEpoch",
    "Entry",
    "EntryKind",
    "GroupStatus",
    "LeaderChanged",
    "Membership",
    "MembershipChange",
    "MembershipChangeKind",
    "MembershipCommitted",
    "MembershipResult",
    "Message",
    "NodeId",
    "Notice",
    "Outbound",
    "PaxosInvariantError",
    "PaxosNode",
    "PaxosOptions",
    "PeerStatus",
    "ProposalsDropped",
    "ProposeResult",
    "RandomSource",
    "ReadId",
    "ReadMode",
    "ReadReady",
    "ReadResult",
    "Ready",
    "ReadsFailed",
    "Record",
    "Role",
    "Slot",
    "SnapshotInstall",
    "SnapshotMeta",
    "SnapshotRead",
    "StepDownReason",
    "SteppedDown",
    "initial_snapshot_meta",
]
