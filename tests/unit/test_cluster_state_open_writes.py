"""Open versions in the cluster manager's pure model: a version the namespace holds open
for write is never copied, not even by a new leader; once no token for it is accepted any
more it is recovered from one replica under a new version and brought back to its goal."""

from __future__ import annotations

import random

from metaserver.cluster_state import ChunkRef, ClusterState, Recovery
from wire.cluster_ops import ReplicateChunk
from wire.ids import ChunkId, ChunkVersion

from .test_cluster_manager_state import (
    DEAD_AFTER_S,
    MIB,
    OPEN_MAX_S,
    V1,
    V2,
    A,
    B,
    C,
    D,
    E,
    Script,
    X,
)

V3 = ChunkVersion(3)


def copies(commands: dict[object, list[object]]) -> list[ReplicateChunk]:
    return [c for sent in commands.values() for c in sent if isinstance(c, ReplicateChunk)]


def open_on_three_with_one_dead() -> tuple[Script, int]:
    """X at V2 open for write on A, B, C (B holds the most), and A has died."""
    script = Script([A, B, C, D, E])
    for ds, length in ((A, MIB), (B, 2 * MIB), (C, MIB)):
        script.store(ds, X, V2, length)
        script.full_report(ds)
    opened_ns = script.wall_ns()
    script.advance(6)  # past the grace period
    script.scan({X: (V2, MIB, 3)}, {X: opened_ns})
    script.plan()
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D, E):
        script.heartbeat(ds)
    assert script.state.check_liveness(script.now) == [A]
    return script, opened_ns


def recoveries(script: Script) -> list[Recovery]:
    return script.state.recoveries(script.now, script.wall_ns())


def test_an_open_version_is_never_copied_however_under_replicated() -> None:
    script, _ = open_on_three_with_one_dead()
    for _ in range(5):
        assert copies(script.round([B, C, D, E])) == []
    assert sorted(script.holders(X).values()) == [V2, V2, V2]


def test_a_new_leader_knows_open_versions_from_its_first_scan() -> None:
    script, opened_ns = open_on_three_with_one_dead()
    # The next reign starts empty; the namespace scan says X is open.
    script.state = ClusterState(
        script.state.options,
        epoch=8,
        started_s=script.now,
        rng=random.Random(2),
        read_token=script.state._read_token,  # noqa: SLF001 (same token source)
        admin_modes=(),
    )
    for ds in (B, C, D, E):
        script.join(ds)
    script.advance(10)
    script.scan({X: (V2, MIB, 3)}, {X: opened_ns})
    for _ in range(3):
        assert copies(script.round([B, C, D, E])) == []
    assert script.state.is_open(X)


def test_an_open_version_is_recovered_only_once_no_token_is_accepted() -> None:
    script, opened_ns = open_on_three_with_one_dead()
    script.advance(OPEN_MAX_S - (script.wall_ns() - opened_ns) / 1e9 - 1)
    assert recoveries(script) == []
    script.advance(2)
    (recovery,) = recoveries(script)
    # From the longest live replica of the open version itself.
    assert recovery == Recovery(X, V2, opened_ns, B, V2)
    assert recoveries(script) == []  # under way


def test_recovery_fences_one_replica_and_brings_the_new_version_to_its_goal() -> None:
    script, opened_ns = open_on_three_with_one_dead()
    script.advance(OPEN_MAX_S)
    (recovery,) = recoveries(script)
    state = script.state
    state.recovery_started(recovery, script.wall_ns())
    assert copies(script.round([B, C, D, E])) == []  # recovering: still open
    script.store(B, X, V3, 2 * MIB)  # the fencing sync renamed B's replica
    state.recovery_fenced(recovery, 2 * MIB, script.now)
    state.recovery_done(recovery, committed=True, now_s=script.now)
    assert not state.is_open(X)
    for _ in range(4):
        script.round([B, C, D, E])
    live = {ds: v for ds, v in script.holders(X).items() if ds != A}
    assert sorted(live.values()) == [V3, V3, V3] and B in live
    assert all(
        script.stored[ds][X].length_bytes == 2 * MIB for ds in live
    )  # copies of the survivor


def test_a_recovery_left_unfinished_by_an_earlier_reign_is_taken_up_at_once() -> None:
    script = Script([A, B, C, D])
    for ds in (A, B, C):
        script.store(ds, X, V2)
        script.full_report(ds)
    script.advance(10)
    recovering_ns = script.wall_ns() - 1
    script.state.install_scan({X: ChunkRef(V2, MIB, 3, recovering_ns, True)}, script.now)
    (recovery,) = recoveries(script)
    assert (recovery.version, recovery.opened_ns, recovery.base) == (V2, recovering_ns, V2)


def test_a_missing_open_chunk_waits_and_an_empty_one_needs_no_source() -> None:
    script = Script([A, B, C, D])
    script.store(A, X, V1)
    script.full_report(A)
    script.advance(10)
    opened_ns = script.wall_ns()
    empty = ChunkId(0x99)
    script.scan({X: (V2, MIB, 3), empty: (V1, 0, 3)}, {X: opened_ns, empty: opened_ns})
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D):
        script.heartbeat(ds)
    script.state.check_liveness(script.now)
    script.advance(OPEN_MAX_S)
    # X has committed data only on the dead A: nothing to recover from yet.
    assert recoveries(script) == [Recovery(empty, V1, opened_ns, None, None)]


def test_a_failed_recovery_is_tried_again_later() -> None:
    script, _ = open_on_three_with_one_dead()
    script.advance(OPEN_MAX_S)
    (recovery,) = recoveries(script)
    script.state.recovery_done(recovery, committed=False, now_s=script.now)
    assert recoveries(script) == []
    script.advance(10)
    assert [r.chunk for r in recoveries(script)] == [X]
