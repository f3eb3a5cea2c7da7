"""Placement of new replicas (metaserver.placement): distinct, fitting, spread, preferring room.

Randomised tests print their seed; replay with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaserver.placement import Candidate, choose_targets
from wire.ids import DataserverId

GIB = 1 << 30


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"PAXFS_SEED={seed}")
    return random.Random(seed)


def equal_servers(count: int, available: int = 100 * GIB) -> list[Candidate]:
    return [Candidate(DataserverId(i + 1), available, 0) for i in range(count)]


def test_picks_distinct_servers_up_to_the_count(rng: random.Random) -> None:
    chosen = choose_targets(equal_servers(5), 3, GIB, rng)
    assert len(chosen) == 3
    assert len(set(chosen)) == 3


def test_a_goal_larger_than_the_cluster_takes_every_server(rng: random.Random) -> None:
    chosen = choose_targets(equal_servers(2), 5, GIB, rng)
    assert sorted(chosen) == [1, 2]


def test_servers_without_room_for_the_replica_are_never_chosen(rng: random.Random) -> None:
    candidates = [
        Candidate(DataserverId(1), GIB - 1, 0),
        Candidate(DataserverId(2), GIB, 0),
        Candidate(DataserverId(3), 0, 0),
    ]
    for _ in range(50):
        assert choose_targets(candidates, 3, GIB, rng) == [2]


def test_much_more_free_space_or_fewer_writes_wins_the_first_place(rng: random.Random) -> None:
    roomy = [*equal_servers(4, 10 * GIB), Candidate(DataserverId(9), 40 * GIB, 0)]
    idle = [Candidate(DataserverId(i + 1), 10 * GIB, 4) for i in range(4)]
    idle.append(Candidate(DataserverId(9), 10 * GIB, 0))
    for candidates in (roomy, idle):
        for _ in range(50):
            assert choose_targets(candidates, 2, GIB, rng)[0] == 9


def test_equal_servers_share_new_chunks_evenly(rng: random.Random) -> None:
    picks: Counter[int] = Counter()
    rounds = 3000
    for _ in range(rounds):
        picks.update(choose_targets(equal_servers(5), 3, GIB, rng))
    expected = rounds * 3 / 5
    for server in range(1, 6):
        assert abs(picks[server] - expected) < 0.1 * expected, picks


def test_near_equals_also_share_but_clearly_worse_servers_only_fill_in(
    rng: random.Random,
) -> None:
    candidates = [
        Candidate(DataserverId(1), 100 * GIB, 0),
        Candidate(DataserverId(2), 90 * GIB, 0),
        Candidate(DataserverId(3), 10 * GIB, 0),
    ]
    firsts: Counter[int] = Counter()
    for _ in range(1000):
        chosen = choose_targets(candidates, 2, GIB, rng)
        firsts[chosen[0]] += 1
        assert 3 not in chosen
    assert firsts[1] > 300 and firsts[2] > 300


@settings(max_examples=200, deadline=None)
@given(
    available=st.lists(st.integers(0, 4), min_size=0, max_size=8),
    writes=st.lists(st.integers(0, 5), min_size=8, max_size=8),
    count=st.integers(0, 10),
    seed=st.integers(0, 1 << 32),
)
def test_placement_contract_holds_for_any_cluster(
    available: list[int], writes: list[int], count: int, seed: int
) -> None:
    candidates = [
        Candidate(DataserverId(i + 1), units * GIB, writes[i]) for i, units in enumerate(available)
    ]
    chosen = choose_targets(candidates, count, GIB, random.Random(seed))
    fitting = {c.dataserver_id for c in candidates if c.available_bytes >= GIB}
    assert len(chosen) == len(set(chosen)) == min(count, len(fitting))
    assert set(chosen) <= fitting
