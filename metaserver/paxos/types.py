"""Value types of the consensus core: ids, ballots, log entries, memberships, snapshots.

Every type here is a frozen dataclass over plain fields (int, bool, bytes, str, None,
``X | None``, ``tuple[X, ...]``, IntEnum, NewType) so that an owner can encode it with a
generic, type-hint-driven codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NewType

from metaserver.paxos._invariant import invariant

NodeId = NewType("NodeId", int)
"""Stable id of a replica; never reused once the replica leaves the group."""

Slot = NewType("Slot", int)
"""Position in the replicated log, starting at 1; slot 0 is the empty initial state."""

ReadId = NewType("ReadId", int)
"""Owner-chosen handle of a linearizable read request."""


@dataclass(frozen=True, order=True, slots=True)
class Ballot:
    """A proposal number ``(round, node)``: totally ordered and unique per proposer.

    Two proposers never share a ballot because the node id breaks ties, so at most one
    value is ever proposed per (slot, ballot) ("Paxos Made Simple", section 2.2).
    """

    round: int
    node: NodeId

    def __str__(self) -> str:
        return f"{self.round}.{self.node}"


ZERO_BALLOT = Ballot(0, NodeId(0))
"""Below every real ballot: the promise of an acceptor that has promised nothing."""


@dataclass(frozen=True, slots=True)
class Membership:
    """Who votes and who only listens, plus every id that has left (never to return).

    Quorums are majorities of ``voters``. ``learners`` receive the log but do not count;
    a new replica joins as a learner and is promoted once it has caught up.
    """

    voters: tuple[NodeId, ...]
    learners: tuple[NodeId, ...] = ()
    retired: tuple[NodeId, ...] = ()

    def __post_init__(self) -> None:
        invariant(len(self.voters) >= 1, "a membership needs at least one voter")
        everyone = self.voters + self.learners + self.retired
        invariant(len(set(everyone)) == len(everyone), f"node listed twice in {self}")

    @property
    def members(self) -> tuple[NodeId, ...]:
        """Voters then learners: every replica that receives the log."""
        return self.voters + self.learners


class EntryKind(IntEnum):
    """What a slot holds."""

    NOOP = 0
    COMMANDS = 1
    MEMBERSHIP = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """The value of one slot: a batch of opaque owner commands, a no-op, or a membership.

    A ``MEMBERSHIP`` entry chosen at slot ``i`` governs slots ``i + window_slots`` and
    later (the "alpha" of "Paxos Made Simple", section 3), so the leader of any slot
    always knows which quorum that slot needs.
    """

    kind: EntryKind
    commands: tuple[bytes, ...] = ()
    config: tuple[Membership, ...] = ()
    """Exactly one membership in a MEMBERSHIP entry, none otherwise. A tuple rather than
    ``Membership | None`` because ``wire.schema`` decodes an optional dataclass field as
    a tagged union unless that dataclass is a registered message."""

    def __post_init__(self) -> None:
        invariant(
            len(self.config) == (1 if self.kind == EntryKind.MEMBERSHIP else 0),
            "a membership is carried exactly by MEMBERSHIP entries",
        )
        invariant(
            not self.commands or self.kind == EntryKind.COMMANDS,
            "only COMMANDS entries carry commands",
        )

    @staticmethod
    def of_membership(membership: Membership) -> Entry:
        return Entry(EntryKind.MEMBERSHIP, config=(membership,))

    @property
    def membership(self) -> Membership | None:
        return self.config[0] if self.config else None

    def size_bytes(self) -> int:
        """Rough encoded size, used to bound batches and messages."""
        return 8 + sum(len(command) + 4 for command in self.commands)


NOOP_ENTRY = Entry(EntryKind.NOOP)


@dataclass(frozen=True, slots=True)
class ConfigEpoch:
    """A membership and the first slot it governs.

    ``entry_slot`` is the slot of the MEMBERSHIP entry that introduced it (0 for the
    initial membership); ``effective_slot`` is ``entry_slot + window_slots`` (1 for the
    initial membership).
    """

    entry_slot: Slot
    effective_slot: Slot
    membership: Membership


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """What the core needs next to the owner's snapshot bytes: the index and the configs.

    ``index`` is the last slot whose command the snapshot includes. ``configs`` are the
    epochs that govern slots after ``index`` (the one in force at ``index + 1`` and any
    introduced at or before ``index`` that take effect later). The owner stores this
    with its snapshot and hands it back on restart.
    """

    index: Slot
    configs: tuple[ConfigEpoch, ...]

    def __post_init__(self) -> None:
        invariant(len(self.configs) >= 1, "a snapshot carries at least one config")
        invariant(
            self.configs[0].effective_slot <= self.index + 1,
            "the first config of a snapshot must govern the slot after it",
        )


def initial_snapshot_meta(voters: tuple[NodeId, ...]) -> SnapshotMeta:
    """The "snapshot" every founding replica of a new group starts from: slot 0.

    The owner's state at index 0 is its empty initial state and has zero bytes.
    """
    return SnapshotMeta(
        index=Slot(0),
        configs=(ConfigEpoch(Slot(0), Slot(1), Membership(voters=tuple(sorted(voters)))),),
    )
