"""The in-memory log and the membership history over slots."""

from __future__ import annotations

from metaserver.paxos._log import ConfigHistory, LogSlot, SlotLog
from metaserver.paxos.types import (
    NOOP_ENTRY,
    Ballot,
    ConfigEpoch,
    Membership,
    NodeId,
    Slot,
)

B1, B2 = Ballot(1, NodeId(1)), Ballot(2, NodeId(2))
THREE = Membership(voters=(NodeId(1), NodeId(2), NodeId(3)))
FOUR = Membership(voters=(NodeId(1), NodeId(2), NodeId(3), NodeId(4)))


def test_a_vote_of_a_lower_ballot_never_replaces_a_higher_one() -> None:
    log = SlotLog(Slot(1))
    assert log.put_if_not_older(Slot(3), LogSlot(B2, NOOP_ENTRY))
    assert not log.put_if_not_older(Slot(3), LogSlot(B1, NOOP_ENTRY))
    assert log.get(3) == LogSlot(B2, NOOP_ENTRY)


def test_discarding_forgets_slots_and_raises_the_floor() -> None:
    log = SlotLog(Slot(1))
    for slot in range(1, 8):
        log.put(Slot(slot), LogSlot(B1, NOOP_ENTRY))
    log.discard_through(4)
    assert [s for s, _ in log.items_from(0)] == [5, 6, 7]
    assert log.first_slot == 5 and len(log) == 3
    assert not log.put_if_not_older(Slot(2), LogSlot(B2, NOOP_ENTRY))


def test_iteration_skips_holes_and_handles_sparse_logs() -> None:
    log = SlotLog(Slot(1))
    log.put(Slot(2), LogSlot(B1, NOOP_ENTRY))
    log.put(Slot(1_000_000), LogSlot(B1, NOOP_ENTRY))
    assert [s for s, _ in log.items_from(1)] == [2, 1_000_000]
    assert [s for s, _ in log.items_from(3)] == [1_000_000]


def test_a_membership_governs_from_its_effective_slot() -> None:
    history = ConfigHistory((ConfigEpoch(Slot(0), Slot(1), THREE),))
    assert history.relevant(9) == [THREE]
    history.add(Slot(10), FOUR, window_slots=4)  # chosen, so the commit index is >= 10
    assert history.for_slot(13) == THREE
    assert history.for_slot(14) == FOUR
    assert history.relevant(10) == [THREE, FOUR]
    assert history.pending(12) is not None and history.pending(13) is None
    assert history.relevant(13) == [FOUR]


def test_snapshot_metadata_keeps_only_what_governs_later_slots() -> None:
    history = ConfigHistory((ConfigEpoch(Slot(0), Slot(1), THREE),))
    history.add(Slot(10), FOUR, window_slots=4)
    early = history.meta_for(Slot(9))
    assert [e.membership for e in early.configs] == [THREE]
    middle = history.meta_for(Slot(11))
    assert [e.membership for e in middle.configs] == [THREE, FOUR]
    late = history.meta_for(Slot(20))
    assert [e.membership for e in late.configs] == [FOUR]
    restored = ConfigHistory(middle.configs)
    assert restored.for_slot(12) == THREE and restored.for_slot(14) == FOUR
    history.prune_through(Slot(20))
    assert history.relevant(20) == [FOUR]
