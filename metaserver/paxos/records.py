"""Records the owner appends to its durable log, in the order they are handed out.

Replaying them in order (after the latest snapshot) rebuilds the acceptor state. Every
record is idempotent and monotone: replaying one twice, or replaying an older record
after a newer one, changes nothing, which lets the owner rewrite its log with
:meth:`PaxosNode.compacted_records` without coordinating with in-flight Readies.
"""

from __future__ import annotations

from dataclasses import dataclass

from metaserver.paxos.messages import ChosenValue
from metaserver.paxos.types import Ballot, Entry, Slot


@dataclass(frozen=True, slots=True)
class PromiseRecord:
    """The highest ballot this replica promised or used; never decreases."""

    ballot: Ballot


@dataclass(frozen=True, slots=True)
class AcceptedRecord:
    """Votes for ``ballot`` in the slots ``first_slot, first_slot + 1, ...``.

    Also implies a promise of ``ballot``. On replay a vote replaces an older one only
    if its ballot is at least as high.
    """

    ballot: Ballot
    first_slot: Slot
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class ChosenRecord:
    """Chosen values learned from a peer for ``first_slot, first_slot + 1, ...``."""

    first_slot: Slot
    values: tuple[ChosenValue, ...]


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """Every slot up to ``commit_index`` holds its chosen value in the records above."""

    commit_index: Slot


Record = PromiseRecord | AcceptedRecord | ChosenRecord | CommitRecord

ALL_RECORD_TYPES: tuple[type, ...] = (PromiseRecord, AcceptedRecord, ChosenRecord, CommitRecord)
