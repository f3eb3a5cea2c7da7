"""The in-memory log of one replica and the history of memberships over slots."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from metaserver.paxos._invariant import invariant
from metaserver.paxos.types import Ballot, ConfigEpoch, Entry, Membership, Slot, SnapshotMeta


@dataclass(frozen=True, slots=True)
class LogSlot:
    """This replica's vote in a slot: the value and a ballot at which it was proposed.

    At or below the commit index the value is the chosen one (and ``ballot`` is some
    ballot at which that value was proposed, not necessarily the one it was chosen at).
    """

    ballot: Ballot
    entry: Entry


class SlotLog:
    """Slot -> vote, possibly with holes above the commit index.

    ``first_slot`` is the lowest slot that may be present; everything below it was
    discarded after a snapshot.
    """

    __slots__ = ("_slots", "first_slot", "last_slot")

    def __init__(self, first_slot: Slot) -> None:
        self._slots: dict[int, LogSlot] = {}
        self.first_slot = first_slot
        self.last_slot = Slot(first_slot - 1)

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, slot: int) -> LogSlot | None:
        return self._slots.get(slot)

    def put(self, slot: Slot, vote: LogSlot) -> None:
        invariant(slot >= self.first_slot, f"slot {slot} below the log start {self.first_slot}")
        self._slots[slot] = vote
        if slot > self.last_slot:
            self.last_slot = slot

    def put_if_not_older(self, slot: Slot, vote: LogSlot) -> bool:
        """Store ``vote`` unless the slot holds a vote of a higher ballot (which, by
        Paxos safety, carries the same value whenever both concern a chosen slot)."""
        if slot < self.first_slot:
            return False
        current = self._slots.get(slot)
        if current is not None and current.ballot > vote.ballot:
            return False
        self.put(slot, vote)
        return True

    def discard_through(self, slot: int) -> None:
        """Forget every slot ``<= slot``."""
        if slot < self.first_slot:
            return
        if slot - self.first_slot < len(self._slots):
            for gone in range(self.first_slot, slot + 1):
                self._slots.pop(gone, None)
        else:
            self._slots = {s: v for s, v in self._slots.items() if s > slot}
        self.first_slot = Slot(slot + 1)
        if self.last_slot < slot:
            self.last_slot = Slot(slot)

    def items_from(self, slot: int) -> Iterator[tuple[Slot, LogSlot]]:
        """Present slots ``>= slot`` in increasing order."""
        start = max(slot, self.first_slot)
        if self.last_slot - start + 1 <= 2 * len(self._slots):
            for candidate in range(start, self.last_slot + 1):
                vote = self._slots.get(candidate)
                if vote is not None:
                    yield Slot(candidate), vote
        else:
            for candidate in sorted(s for s in self._slots if s >= start):
                yield Slot(candidate), self._slots[candidate]


class ConfigHistory:
    """Which membership governs which slot, from the snapshot on.

    Only memberships chosen at or below the commit index are known, so the history can
    answer for every slot up to ``commit + window_slots`` -- exactly the slots a leader
    may propose in.
    """

    __slots__ = ("_epochs",)

    def __init__(self, epochs: tuple[ConfigEpoch, ...]) -> None:
        invariant(len(epochs) >= 1, "config history needs an epoch")
        self._epochs = list(epochs)

    def for_slot(self, slot: int) -> Membership:
        for epoch in reversed(self._epochs):
            if epoch.effective_slot <= slot:
                return epoch.membership
        raise AssertionError(f"no membership known for slot {slot}")

    def add(self, entry_slot: Slot, membership: Membership, window_slots: int) -> ConfigEpoch:
        last = self._epochs[-1]
        invariant(entry_slot > last.entry_slot, "membership entries must arrive in slot order")
        epoch = ConfigEpoch(entry_slot, Slot(entry_slot + window_slots), membership)
        self._epochs.append(epoch)
        return epoch

    def relevant(self, commit_index: int) -> list[Membership]:
        """Memberships governing ``commit_index + 1 .. commit_index + window`` (all
        known epochs that are not yet superseded at ``commit_index + 1``)."""
        last = self._epochs[-1]
        if last.effective_slot <= commit_index + 1:
            return [last.membership]  # no change pending: the one in force
        result = [self.for_slot(commit_index + 1)]
        for epoch in self._epochs:
            if epoch.effective_slot > commit_index + 1:
                result.append(epoch.membership)
        return result

    def pending(self, commit_index: int) -> ConfigEpoch | None:
        """The latest chosen epoch that does not yet govern ``commit_index + 1``."""
        last = self._epochs[-1]
        return last if last.effective_slot > commit_index + 1 else None

    def latest(self) -> ConfigEpoch:
        return self._epochs[-1]

    def meta_for(self, index: Slot) -> SnapshotMeta:
        """The configs to store with a snapshot at ``index`` (entries at or below it)."""
        known = [e for e in self._epochs if e.entry_slot <= index]
        start = 0
        for position, epoch in enumerate(known):
            if epoch.effective_slot <= index + 1:
                start = position
        return SnapshotMeta(index=index, configs=tuple(known[start:]))

    def prune_through(self, index: Slot) -> None:
        """Drop epochs superseded for every slot after ``index``."""
        while len(self._epochs) > 1 and self._epochs[1].effective_slot <= index + 1:
            self._epochs.pop(0)
