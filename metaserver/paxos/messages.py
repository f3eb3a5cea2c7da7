"""Messages between replicas. Every one names its ``sender``.

The owner must check that ``sender`` matches the authenticated peer of the connection
it arrived on. Every message here is a frozen dataclass of plain fields; register
``ALL_MESSAGE_TYPES`` with the wire codec.

Replies that depend on durable state (``Promise``, ``Accepted``) are only ever handed
out in a Ready whose records make that state durable first.
"""

from __future__ import annotations

from dataclasses import dataclass

from metaserver.paxos.types import Ballot, Entry, NodeId, Slot, SnapshotMeta


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """Pre-vote: "would you support an election?" Changes no state at the receiver.

    Sent before phase 1 so that a replica cut off from a healthy leader cannot raise
    ballots and depose that leader when it comes back (leader stickiness).
    """

    sender: NodeId
    probe_id: int
    commit_index: Slot


@dataclass(frozen=True, slots=True)
class ProbeReply:
    sender: NodeId
    probe_id: int
    granted: bool
    promised: Ballot


@dataclass(frozen=True, slots=True)
class Prepare:
    """Phase 1a for every slot from ``from_slot`` on (the whole open suffix)."""

    sender: NodeId
    ballot: Ballot
    from_slot: Slot


@dataclass(frozen=True, slots=True)
class AcceptedSlot:
    """One acceptor's vote in a slot, as reported in a promise."""

    slot: Slot
    ballot: Ballot
    entry: Entry


@dataclass(frozen=True, slots=True)
class Promise:
    """Phase 1b: promise ``ballot`` and report accepted slots from ``from_slot`` on.

    Slots at or below ``commit_index`` are chosen and known to the sender, so they are
    not reported; a candidate behind that index catches up from the sender first.
    When ``more_from`` is set the report continues in another page: ask with a
    ``Prepare`` of the same ballot from that slot.
    """

    sender: NodeId
    ballot: Ballot
    from_slot: Slot
    commit_index: Slot
    accepted: tuple[AcceptedSlot, ...]
    more_from: Slot | None


@dataclass(frozen=True, slots=True)
class Nack:
    """Refusal of ``rejected`` because the sender has promised the higher ``promised``."""

    sender: NodeId
    rejected: Ballot
    promised: Ballot


@dataclass(frozen=True, slots=True)
class Accept:
    """Phase 2a for the contiguous slots ``first_slot ..``, plus the leader's commit news.

    ``commit_index`` / ``commit_base``: every slot in ``[commit_base, commit_index]`` is
    chosen *at this ballot*, so an acceptor whose vote there carries this ballot holds
    the chosen value; anything else it must fetch.
    """

    sender: NodeId
    ballot: Ballot
    first_slot: Slot
    entries: tuple[Entry, ...]
    commit_index: Slot
    commit_base: Slot


@dataclass(frozen=True, slots=True)
class Accepted:
    """Phase 2b: the sender durably accepted ``ballot`` in ``first_slot..last_slot``."""

    sender: NodeId
    ballot: Ballot
    first_slot: Slot
    last_slot: Slot
    commit_index: Slot


@dataclass(frozen=True, slots=True)
class Commit:
    """Commit news alone (same meaning as the fields of :class:`Accept`)."""

    sender: NodeId
    ballot: Ballot
    commit_index: Slot
    commit_base: Slot


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Leader liveness, commit news, and the round that confirms reads and leases."""

    sender: NodeId
    ballot: Ballot
    seq: int
    commit_index: Slot
    commit_base: Slot


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """The sender had promised nothing above ``ballot`` when it answered ``seq``."""

    sender: NodeId
    ballot: Ballot
    seq: int
    commit_index: Slot


@dataclass(frozen=True, slots=True)
class CatchupRequest:
    """Ask for chosen values from ``from_slot`` on (or a snapshot when ``has_config`` is
    false: a brand-new replica knows no membership yet)."""

    sender: NodeId
    from_slot: Slot
    has_config: bool


@dataclass(frozen=True, slots=True)
class ChosenValue:
    """A chosen value with a ballot at which it was proposed."""

    ballot: Ballot
    entry: Entry


@dataclass(frozen=True, slots=True)
class CatchupReply:
    """Chosen values for ``first_slot, first_slot + 1, ...``; empty when none are known."""

    sender: NodeId
    first_slot: Slot
    values: tuple[ChosenValue, ...]
    commit_index: Slot


@dataclass(frozen=True, slots=True)
class SnapshotOffer:
    """The slots asked for were compacted: fetch this snapshot instead."""

    sender: NodeId
    meta: SnapshotMeta
    size_bytes: int


@dataclass(frozen=True, slots=True)
class SnapshotChunkRequest:
    sender: NodeId
    index: Slot
    offset: int


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Bytes ``offset .. offset + len(data)`` of the snapshot at ``meta.index``."""

    sender: NodeId
    meta: SnapshotMeta
    offset: int
    data: bytes
    size_bytes: int


Message = (
    ProbeRequest
    | ProbeReply
    | Prepare
    | Promise
    | Nack
    | Accept
    | Accepted
    | Commit
    | Heartbeat
    | HeartbeatAck
    | CatchupRequest
    | CatchupReply
    | SnapshotOffer
    | SnapshotChunkRequest
    | SnapshotChunk
)

ALL_MESSAGE_TYPES: tuple[type, ...] = (
    ProbeRequest,
    ProbeReply,
    Prepare,
    Promise,
    Nack,
    Accept,
    Accepted,
    Commit,
    Heartbeat,
    HeartbeatAck,
    CatchupRequest,
    CatchupReply,
    SnapshotOffer,
    SnapshotChunkRequest,
    SnapshotChunk,
)
