"""Safety checks of the simulation, independent of the core's own bookkeeping.

The checker watches what becomes durable on each simulated disk and what each replica
sends and applies, and keeps its own ground truth:

* ``chosen``: a value is chosen in a slot when a majority of the voters of the
  membership governing that slot (computed here from chosen membership entries, not
  asked of the core) durably voted for it at one ballot. At most one value may ever be
  chosen per slot.
* every replica applies, slot by slot, exactly the chosen value, and reaches the same
  state digest (applied prefixes identical);
* promises and votes leave a replica only once durable, a ballot is used only once
  durable, a restarted replica remembers every promise it revealed, and the promise
  on a disk never decreases;
* at most one replica holds a valid read lease at any instant of real time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metaserver.paxos import (
    Ballot,
    Entry,
    EntryKind,
    Membership,
    NodeId,
    Record,
)
from metaserver.paxos.messages import (
    Accept,
    Accepted,
    Commit,
    Heartbeat,
    Message,
    Prepare,
    Promise,
)
from metaserver.paxos.records import AcceptedRecord, ChosenRecord, PromiseRecord
from metaserver.paxos.types import ZERO_BALLOT


class SimViolation(AssertionError):
    """A safety check failed. ``check`` names the check."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"[{check}] {detail}")
        self.check = check
        self.detail = detail


@dataclass
class _SlotVotes:
    by_ballot: dict[Ballot, tuple[Entry, set[NodeId]]] = field(default_factory=dict)


class SafetyChecker:
    def __init__(
        self,
        initial_voters: tuple[NodeId, ...],
        window_slots: int,
        disabled: frozenset[str] = frozenset(),
    ) -> None:
        self._window = window_slots
        self._disabled = disabled
        self._epochs: list[tuple[int, frozenset[NodeId]]] = [(1, frozenset(initial_voters))]
        self.latest_membership = Membership(voters=tuple(sorted(initial_voters)))
        self.latest_effective_slot = 1
        self._votes: dict[int, _SlotVotes] = {}
        self.chosen: dict[int, Entry] = {}
        self._prefix = 0
        self._unresolved: set[int] = set()
        self._durable_promised: dict[NodeId, Ballot] = {}
        self._durable_log: dict[NodeId, dict[int, set[Ballot]]] = {}
        self._revealed: dict[NodeId, Ballot] = {}
        self.durable_snapshot_index: dict[NodeId, int] = {}
        self._digests: dict[int, bytes] = {}
        self.checks_run = 0

    # ------------------------------------------------------------- durability

    def on_durable(self, node: NodeId, records: tuple[Record, ...] | list[Record]) -> None:
        """``records`` of ``node`` are now on its disk."""
        log = self._durable_log.setdefault(node, {})
        promised = self._durable_promised.get(node, ZERO_BALLOT)
        for record in records:
            if isinstance(record, PromiseRecord):
                promised = max(promised, record.ballot)
            elif isinstance(record, AcceptedRecord):
                promised = max(promised, record.ballot)
                for offset, entry in enumerate(record.entries):
                    slot = record.first_slot + offset
                    log.setdefault(slot, set()).add(record.ballot)
                    self._add_vote(slot, record.ballot, entry, node)
            elif isinstance(record, ChosenRecord):
                for offset, value in enumerate(record.values):
                    log.setdefault(record.first_slot + offset, set()).add(value.ballot)
        self._durable_promised[node] = promised

    def on_disk_loaded(self, node: NodeId, records: list[Record]) -> None:
        """A restart read ``records`` back: the promise on disk must not have dropped."""
        on_disk = ZERO_BALLOT
        for record in records:
            if isinstance(record, PromiseRecord | AcceptedRecord):
                on_disk = max(on_disk, record.ballot)
        before = self._durable_promised.get(node, ZERO_BALLOT)
        self._check(
            on_disk >= before,
            "promise-on-disk-monotone",
            f"node {node}: promise on disk fell from {before} to {on_disk}",
        )
        # Unsynced records that happened to reach the platter are durable now too.
        self.on_durable(node, records)

    def on_disk_rewritten(self, node: NodeId, records: tuple[Record, ...]) -> None:
        """A compaction replaces the log: it must keep the promise."""
        self.on_disk_loaded(node, list(records))

    def on_snapshot_saved(self, node: NodeId, index: int) -> None:
        self.durable_snapshot_index[node] = index

    def on_send(self, node: NodeId, message: Message) -> None:
        """Nothing may reveal a promise, a vote or a ballot in use before it is durable."""
        promised = self._durable_promised.get(node, ZERO_BALLOT)
        if isinstance(message, Promise | Accepted) or (
            isinstance(message, Prepare | Accept | Heartbeat | Commit)
            and message.ballot.node == node
        ):
            ballot = message.ballot
            self._check(
                promised >= ballot,
                "durable-before-send",
                f"node {node} sent {type(message).__name__} of ballot {ballot} "
                f"with only {promised} durable",
            )
            if ballot > self._revealed.get(node, ZERO_BALLOT):
                self._revealed[node] = ballot
        if isinstance(message, Accepted):
            log = self._durable_log.get(node, {})
            snapshot_index = self.durable_snapshot_index.get(node, 0)
            for slot in range(message.first_slot, message.last_slot + 1):
                self._check(
                    message.ballot in log.get(slot, ()) or slot <= snapshot_index,
                    "durable-before-send",
                    f"node {node} acknowledged slot {slot} at {message.ballot} "
                    "without a durable vote",
                )

    def on_restart(self, node: NodeId, promised: Ballot) -> None:
        revealed = self._revealed.get(node, ZERO_BALLOT)
        self._check(
            promised >= revealed,
            "promise-survives-restart",
            f"node {node} restarted promising {promised} after revealing {revealed}",
        )

    # ------------------------------------------------------------- chosen values

    def _add_vote(self, slot: int, ballot: Ballot, entry: Entry, node: NodeId) -> None:
        votes = self._votes.setdefault(slot, _SlotVotes())
        known = votes.by_ballot.get(ballot)
        if known is None:
            votes.by_ballot[ballot] = (entry, {node})
        else:
            self._check(
                known[0] == entry,
                "one-value-per-ballot",
                f"slot {slot} ballot {ballot}: two values proposed",
            )
            known[1].add(node)
        self._evaluate(slot)

    def _voters_for(self, slot: int) -> frozenset[NodeId] | None:
        if slot > self._prefix + self._window:
            return None
        voters = self._epochs[0][1]
        for effective, members in self._epochs:
            if effective <= slot:
                voters = members
        return voters

    def _evaluate(self, slot: int) -> None:
        voters = self._voters_for(slot)
        if voters is None:
            self._unresolved.add(slot)
            return
        self.checks_run += 1
        needed = len(voters) // 2 + 1
        for ballot, (entry, nodes) in self._votes[slot].by_ballot.items():
            if len(nodes & voters) >= needed:
                current = self.chosen.get(slot)
                if current is None:
                    self.chosen[slot] = entry
                    self._extend_prefix()
                else:
                    self._check(
                        current == entry,
                        "one-value-chosen",
                        f"slot {slot}: {_short(current)} chosen, then {_short(entry)} "
                        f"at ballot {ballot}",
                    )

    def _extend_prefix(self) -> None:
        advanced = False
        while self._prefix + 1 in self.chosen:
            self._prefix += 1
            advanced = True
            entry = self.chosen[self._prefix]
            if entry.kind == EntryKind.MEMBERSHIP:
                assert entry.membership is not None
                self.latest_membership = entry.membership
                self.latest_effective_slot = self._prefix + self._window
                self._epochs.append(
                    (self._prefix + self._window, frozenset(entry.membership.voters))
                )
        if advanced and self._unresolved:
            for slot in sorted(s for s in self._unresolved if s <= self._prefix + self._window):
                self._unresolved.discard(slot)
                self._evaluate(slot)

    # ------------------------------------------------------------- applying

    def on_apply(self, node: NodeId, slot: int, entry: Entry, digest: bytes) -> None:
        chosen = self.chosen.get(slot)
        self._check(
            chosen is not None or "apply-only-chosen" in self._disabled,
            "apply-only-chosen",
            f"node {node} applied slot {slot} ({_short(entry)}) which no quorum chose",
        )
        self._check(
            chosen == entry,
            "apply-only-chosen",
            f"node {node} applied {_short(entry)} at slot {slot}, chosen was {_short(chosen)}",
        )
        self._check_digest(node, slot, digest)

    def on_install(self, node: NodeId, index: int, digest: bytes) -> None:
        if index > 0:
            self._check_digest(node, index, digest)

    def _check_digest(self, node: NodeId, slot: int, digest: bytes) -> None:
        known = self._digests.setdefault(slot, digest)
        self._check(
            known == digest,
            "applied-prefix-identical",
            f"node {node} state after slot {slot} differs from another replica's",
        )

    # ------------------------------------------------------------- leases

    def on_leases(self, holders: list[NodeId], now_us: int) -> None:
        self._check(
            len(holders) <= 1,
            "single-lease-holder",
            f"nodes {holders} hold valid leases at t={now_us / 1000:.3f} ms",
        )

    def _check(self, condition: bool, check: str, detail: str) -> None:
        if not condition and check not in self._disabled:
            raise SimViolation(check, detail)

    def membership_voters(self) -> frozenset[NodeId]:
        """Voters of the latest chosen membership (perhaps not yet in force)."""
        return self._epochs[-1][1]

    def governing_voters(self) -> frozenset[NodeId]:
        """Voters of the membership governing the first slot not yet chosen."""
        voters = self._voters_for(self._prefix + 1)
        assert voters is not None
        return voters


def _short(entry: Entry | None) -> str:
    if entry is None:
        return "nothing"
    if entry.kind == EntryKind.COMMANDS:
        return f"{len(entry.commands)} command(s) {entry.commands[0][:12]!r}..."
    if entry.kind == EntryKind.MEMBERSHIP:
        membership: Membership | None = entry.membership
        assert membership is not None
        return f"membership voters={membership.voters}"
    return "no-op"
