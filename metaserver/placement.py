"""Where a new replica goes: the choice of dataservers for a chunk, as a pure function.

Rules (HDFS's default policy without racks, plus load):

1. Only candidates with room for the replica (``available_bytes >= needed_bytes``) are
   eligible, and each dataserver is chosen at most once.
2. A candidate's score is its free space divided by ``1 + active_writes``: more free
   space and fewer writes in progress both make it more attractive.
3. The next pick is uniform among the *near-equals* of the best remaining candidate
   (score within :data:`NEAR_EQUAL_RATIO` of it), so equal servers share new chunks
   evenly instead of the single best one taking every chunk until its next heartbeat.
4. Fewer eligible candidates than asked for: every one of them (a goal larger than the
   cluster is met as far as possible; re-replication tops it up later).

No clock, no I/O; randomness comes from the caller's ``random.Random`` (seeded in tests).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from wire.ids import DataserverId
from wire.invariant import invariant

NEAR_EQUAL_RATIO = 0.8
"""Candidates scoring at least this fraction of the best remaining score are equals."""


@dataclass(frozen=True)
class Candidate:
    """A dataserver that may receive a replica, as the leader knows it now."""

    dataserver_id: DataserverId
    available_bytes: int
    active_writes: int


def score(candidate: Candidate) -> float:
    """Higher is better: free bytes per write in progress (plus one)."""
    return candidate.available_bytes / (1 + max(0, candidate.active_writes))


def choose_targets(
    candidates: Sequence[Candidate], count: int, needed_bytes: int, rng: random.Random
) -> list[DataserverId]:
    """Up to ``count`` distinct dataservers for new replicas, best first (module rules).

    ``needed_bytes`` is the space one replica may take (the chunk size for a new chunk,
    the replica's length for a copy).
    """
    invariant(count >= 0, f"asked for {count} targets")
    pool = [c for c in candidates if c.available_bytes >= needed_bytes]
    invariant(
        len({c.dataserver_id for c in pool}) == len(pool), "a dataserver is a candidate twice"
    )
    chosen: list[DataserverId] = []
    while pool and len(chosen) < count:
        best = max(score(c) for c in pool)
        equals = [c for c in pool if score(c) >= best * NEAR_EQUAL_RATIO]
        pick = equals[rng.randrange(len(equals))]
        chosen.append(pick.dataserver_id)
        pool.remove(pick)
    return chosen
