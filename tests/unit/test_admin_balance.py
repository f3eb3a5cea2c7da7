"""The balancer's planner and pacing (:mod:`tools.admin_balance`), without a cluster.

Properties run under Hypothesis with a bounded number of examples; a failing example is
printed by Hypothesis and replayed from its database (``PAXFS_SEED`` sets the seed of
the scenario generator used by the non-Hypothesis test).
"""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tools.admin_balance import (
    PLAN_BAND_SHARE,
    BalancePlan,
    BandwidthLimiter,
    Candidate,
    ServerLoad,
    candidates_of,
    plan_balance,
)
from wire.cluster_admin_ops import DataserverReport, StoredReplica
from wire.ids import ChunkId, ChunkVersion, DataserverId

MIB = 1 << 20
V1 = ChunkVersion(1)


def server(ds: int, capacity: int, used: int) -> ServerLoad:
    return ServerLoad(DataserverId(ds), f"127.0.0.1:{7000 + ds}", capacity, used)


def layout(
    placement: dict[int, list[int]], size: int, capacity: int, empty: tuple[int, ...] = ()
) -> tuple[list[ServerLoad], list[Candidate]]:
    """Servers holding the given chunks (chunk -> its holders), every replica ``size``."""
    held: dict[int, list[int]] = {}
    for chunk, holders in placement.items():
        for ds in holders:
            held.setdefault(ds, []).append(chunk)
    servers = sorted(set(held) | set(empty))
    loads = [server(ds, capacity, size * len(held.get(ds, []))) for ds in servers]
    candidates = [
        Candidate(
            ChunkId(chunk),
            V1,
            DataserverId(ds),
            size,
            size,
            frozenset(DataserverId(h) for h in placement[chunk]),
        )
        for ds in servers
        for chunk in held.get(ds, [])
    ]
    return loads, candidates


def check_plan(
    plan: BalancePlan, loads: list[ServerLoad], candidates: list[Candidate]
) -> dict[DataserverId, int]:
    """The invariants every plan keeps; returns the projected used bytes."""
    holders = {c.chunk: set(c.holders) for c in candidates}
    size = {(c.chunk, c.source): c.size_bytes for c in candidates}
    used = {s.dataserver_id: s.used_bytes for s in loads}
    capacity = {s.dataserver_id: s.capacity_bytes for s in loads}
    moved = set()
    for move in plan.moves:
        assert move.chunk not in moved, "a chunk moves at most once"
        moved.add(move.chunk)
        assert move.source in holders[move.chunk] and move.target not in holders[move.chunk]
        assert move.size_bytes == size[(move.chunk, move.source)]
        holders[move.chunk].remove(move.source)
        holders[move.chunk].add(move.target)
        used[move.source] -= move.size_bytes
        used[move.target] += move.size_bytes
        # No move pushes its source below the band or its target above it.
        low = (plan.mean_pct - plan.threshold_pct) / 100
        high = (plan.mean_pct + plan.threshold_pct) / 100
        assert used[move.source] >= low * capacity[move.source] - 1e-6
        assert used[move.target] <= high * capacity[move.target] + 1e-6
    for projection in plan.servers:
        planned = 100 * used[projection.dataserver_id] / projection.capacity_bytes
        assert abs(projection.planned_pct - planned) < 1e-9
    # A server inside the band stays inside; the outside ones never multiply.
    for projection in plan.servers:
        if projection.dataserver_id not in plan.outside_before:
            assert abs(projection.planned_pct - plan.mean_pct) <= plan.threshold_pct + 1e-9
    assert set(plan.outside_after) <= set(plan.outside_before)
    return used


def test_an_empty_server_is_filled_until_every_server_is_within_the_band() -> None:
    placement = {chunk: [1 + (chunk + i) % 4 for i in range(3)] for chunk in range(40)}
    loads, candidates = layout(placement, MIB, 100 * MIB, empty=(5,))
    plan = plan_balance(loads, candidates, threshold_pct=10)
    check_plan(plan, loads, candidates)
    assert plan.outside_before == (DataserverId(5),)
    assert plan.outside_after == ()
    assert {m.target for m in plan.moves} == {DataserverId(5)}
    # Aimed inside the band: the newcomer ends at least PLAN_BAND_SHARE of it in.
    newcomer = next(p for p in plan.servers if p.dataserver_id == 5)
    assert newcomer.planned_pct >= plan.mean_pct - PLAN_BAND_SHARE * 10
    assert plan.bytes_planned == len(plan.moves) * MIB
    assert plan == plan_balance(loads, candidates, threshold_pct=10), "deterministic"


def test_a_balanced_cluster_gets_no_moves_and_max_move_caps_the_bytes() -> None:
    placement = {chunk: [1 + chunk % 3] for chunk in range(30)}
    loads, candidates = layout(placement, MIB, 100 * MIB)
    assert plan_balance(loads, candidates, threshold_pct=1).moves == ()
    loads, candidates = layout(placement, MIB, 100 * MIB, empty=(4,))
    capped = plan_balance(loads, candidates, threshold_pct=3, max_move_bytes=3 * MIB + 5)
    assert len(capped.moves) == 3 and capped.capped_by_max_move
    assert capped.outside_after == (DataserverId(4),)


def test_no_move_goes_to_a_server_that_holds_the_chunk() -> None:
    # Every chunk is on both servers 1 and 2; 3 is empty but full-sized moves overshoot.
    placement = {chunk: [1, 2] for chunk in range(10)}
    loads, candidates = layout(placement, MIB, 20 * MIB, empty=(3,))
    plan = plan_balance(loads, candidates, threshold_pct=10)
    check_plan(plan, loads, candidates)
    assert all(m.target == 3 for m in plan.moves)


def test_replicas_too_large_for_the_band_are_left_where_they_are() -> None:
    loads, candidates = layout({1: [1]}, 50 * MIB, 100 * MIB, empty=(2,))
    plan = plan_balance(loads, candidates, threshold_pct=5)
    assert plan.moves == () and set(plan.outside_after) == {1, 2}


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[ServerLoad], list[Candidate], float, int | None]:
    count = draw(st.integers(2, 7))
    capacities = [draw(st.integers(50, 400)) * MIB for _ in range(count)]
    chunks = draw(st.integers(0, 60))
    placement: dict[int, list[int]] = {}
    sizes: dict[int, int] = {}
    for chunk in range(chunks):
        goal = draw(st.integers(1, min(3, count)))
        placement[chunk] = draw(
            st.lists(st.integers(1, count), min_size=goal, max_size=goal, unique=True)
        )
        sizes[chunk] = draw(st.integers(1, 8)) * MIB
    held: dict[int, int] = {}
    for chunk, holders in placement.items():
        for ds in holders:
            held[ds] = held.get(ds, 0) + sizes[chunk]
    loads = [
        server(ds, capacities[ds - 1], min(capacities[ds - 1], held.get(ds, 0)))
        for ds in range(1, count + 1)
    ]
    candidates = [
        Candidate(
            ChunkId(chunk),
            V1,
            DataserverId(ds),
            sizes[chunk],
            sizes[chunk],
            frozenset(DataserverId(h) for h in holders),
        )
        for chunk, holders in placement.items()
        for ds in holders
        if draw(st.booleans())
    ]
    threshold = draw(st.sampled_from([1.0, 5.0, 10.0, 20.0]))
    max_move = draw(st.one_of(st.none(), st.integers(0, 100).map(lambda n: n * MIB)))
    return loads, candidates, threshold, max_move


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_every_plan_keeps_the_invariants(
    scenario: tuple[list[ServerLoad], list[Candidate], float, int | None],
) -> None:
    loads, candidates, threshold, max_move = scenario
    plan = plan_balance(loads, candidates, threshold, max_move)
    check_plan(plan, loads, candidates)
    if max_move is not None:
        assert plan.bytes_planned <= max_move


def test_fine_grained_replicas_always_reach_the_band() -> None:
    """With many small replicas of distinct chunks, the plan always balances."""
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"PAXFS_SEED={seed}")
    rng = random.Random(seed)
    for _ in range(30):
        count = rng.randrange(2, 9)
        threshold = rng.choice([2.0, 5.0, 10.0])
        placement: dict[int, list[int]] = {}
        chunk = 0
        for ds in range(1, count + 1):
            for _ in range(rng.randrange(0, 200)):
                placement[chunk] = [ds]
                chunk += 1
        loads, candidates = layout(placement, MIB // 4, 100 * MIB)
        plan = plan_balance(loads, candidates, threshold)
        check_plan(plan, loads, candidates)
        assert plan.outside_after == (), (count, threshold, plan.servers)


def test_disk_sizes_are_estimated_from_the_servers_used_bytes_per_replica() -> None:
    report = DataserverReport(
        DataserverId(1),
        "a:1",
        "live",
        100 * MIB,
        30 * MIB,
        70 * MIB,
        10,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        False,
    )
    replicas = [
        StoredReplica(ChunkId(i), V1, 2 * MIB, 3, i % 2 == 0, (DataserverId(1),)) for i in range(10)
    ]
    found = candidates_of(report, replicas)
    assert [c.chunk for c in found] == [0, 2, 4, 6, 8]
    assert all(c.size_bytes == 3 * MIB and c.length_bytes == 2 * MIB for c in found)


def test_the_bandwidth_limiter_keeps_the_average_under_the_cap() -> None:
    limiter = BandwidthLimiter(100.0)
    now = 0.0
    starts = []
    for size in (100, 50, 200, 100):
        now += limiter.delay_s(size, now)
        starts.append(now)
    assert starts == [0.0, 1.0, 1.5, 3.5]
    # Started bytes before each start never exceed the cap times the elapsed time.
    assert all(sum((100, 50, 200, 100)[:i]) <= 100 * starts[i] for i in range(4))
    later = 10.0
    assert limiter.delay_s(100, later) == 0.0  # idle time is not saved up beyond one move
    assert BandwidthLimiter(None).delay_s(10**12, 0.0) == 0.0
