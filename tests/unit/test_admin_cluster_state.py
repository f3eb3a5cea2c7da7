"""The cluster manager core's hooks for the admin tools, driven by scripts.

``current_version``, ``is_deleting`` and ``release_replica`` (the balancer's "delete the
source" step) of :class:`metaserver.cluster_state.ClusterState`, played with the
:class:`~tests.unit.test_cluster_manager_state.Script` driver of the core's own tests.
"""

from __future__ import annotations

import pytest

from metaserver import cluster_state
from metaserver.cluster_state import ServerState
from tests.unit.test_cluster_manager_state import (
    GIB,
    MIB,
    V1,
    V2,
    A,
    B,
    C,
    D,
    E,
    Script,
    X,
    Y,
)
from wire.cluster_ops import DeleteReplica, ReplicaReport
from wire.ids import ChunkId


def moved_to(script: Script, target: object, source: object) -> None:
    """What a balancer move does before the release: the target copied X from the source
    and reported it."""
    report = ReplicaReport(X, V1, MIB, False)
    script.stored[target][X] = report  # type: ignore[index]
    script.heartbeat(target, added=[report])  # type: ignore[arg-type]
    assert source in script.holders(X)


def test_a_released_source_is_deleted_and_nothing_else_is_trimmed() -> None:
    script = Script([A, B, C, D])
    for ds in (A, B, C):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    # A, the source, has the most free space: a trim of the 4th replica would pick B.
    script.available[A] = 150 * GIB
    script.available[B] = 10 * GIB
    for ds in (A, B):
        script.heartbeat(ds)
    moved_to(script, D, A)
    assert script.state.release_replica(X, V1, A, script.now) is None
    assert script.state.is_deleting(X, A, V1)
    # The chunk has 4 replicas, one of them leaving: no other replica may be trimmed.
    for _ in range(3):
        done = script.round([A, B, C, D])
        assert all(c == DeleteReplica(X, V1) for c in done[A]), done
        assert not any(done[ds] for ds in (B, C, D)), done
    assert set(script.holders(X)) == {B, C, D}
    assert not script.state.is_deleting(X, A, V1)


def test_a_release_that_would_leave_the_chunk_below_its_goal_is_refused() -> None:
    script = Script([A, B, C, D, E])
    for ds in (A, B, C):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    reason = script.state.release_replica(X, V1, A, script.now)
    assert reason is not None and "goal 3" in reason
    moved_to(script, D, A)
    moved_to(script, E, B)
    assert script.state.release_replica(X, V1, A, script.now) is None
    assert script.state.release_replica(X, V1, B, script.now) is None
    # Two releases already leave exactly the goal: a third is refused.
    reason = script.state.release_replica(X, V1, C, script.now)
    assert reason is not None and "2 other counted replicas" in reason
    script.round([A, B, C, D, E])
    assert set(script.holders(X)) == {C, D, E}


def test_releases_are_refused_in_safe_mode_for_stale_versions_and_writes() -> None:
    script = Script([A, B, C, D])
    for ds in (A, B, C, D):
        script.store(ds, X, V1)
        script.full_report(ds)
    assert script.state.release_replica(X, V1, A, script.now) is not None  # safe mode
    script.leave_safe_mode({X: (V1, MIB, 3)})
    assert script.state.current_version(X) == V1
    assert script.state.current_version(Y) is None
    assert "no longer the current" in (script.state.release_replica(X, V2, A, script.now) or "")
    script.state.grant_write(X, V2, MIB, 3, [], script.now, opened_ns=script.wall_ns())
    assert "being written" in (script.state.release_replica(X, V1, A, script.now) or "")


def test_a_dead_or_maintenance_holder_changes_what_a_release_may_do() -> None:
    script = Script([A, B, C, D])
    for ds in (A, B, C, D):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    script.state.set_admin_state(B, ServerState.DECOMMISSIONING)
    # B does not count: releasing A would leave C and D only.
    assert script.state.release_replica(X, V1, A, script.now) is not None
    script.state.set_admin_state(B, ServerState.MAINTENANCE)
    assert script.state.release_replica(X, V1, A, script.now) is None


def test_trims_wait_while_a_move_is_under_way_and_resume_when_its_hold_expires() -> None:
    script = Script([A, B, C, D])
    for ds in (A, B, C):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    assert script.state.hold_trims(X, script.now + 30)
    moved_to(script, D, A)
    for _ in range(3):
        done = script.round([A, B, C, D])
        assert not any(done.values()), done
    assert len(script.holders(X)) == 4 and script.state.trims_held(X)
    script.advance(31)
    script.round([A, B, C, D])
    assert len(script.holders(X)) == 3 and not script.state.trims_held(X)


def test_the_number_of_held_chunks_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_state, "TRIM_HOLDS_MAX", 2)
    script = Script([A])
    assert script.state.hold_trims(X, 1.0)
    assert script.state.hold_trims(Y, 1.0)
    assert not script.state.hold_trims(ChunkId(0x99), 1.0)
    assert script.state.hold_trims(X, 2.0)  # renewing a held chunk is always possible
