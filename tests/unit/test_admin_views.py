"""The cluster manager's admin views (:mod:`metaserver.cluster_admin`), without a network.

The replica map is played by the core's own script driver
(:class:`tests.unit.test_cluster_manager_state.Script`); the views are pure functions of
it: the health matrix and repair work, a decommission's drain, a file chunk's replicas,
the balancer's move refusals, and the repair rate.
"""

from __future__ import annotations

import errno

from metaserver.cluster_admin import (
    RATE_WINDOW_S_MIN,
    HealthTally,
    RepairRate,
    chunk_health,
    chunk_status,
    drain_remaining,
    move_refusal,
    replica_counts,
    stored_replica,
)
from metaserver.cluster_state import ClusterCounters, ServerState
from tests.unit.test_cluster_manager_state import (
    DEAD_AFTER_S,
    MIB,
    V1,
    V2,
    A,
    B,
    C,
    D,
    Script,
    X,
    Y,
    Z,
    token,
)
from wire.cluster_admin_ops import MatrixCell
from wire.namespace_ops import ChunkInfo


def scripted(holders: dict[object, list[object]], goal: int = 3) -> Script:
    """A script out of safe mode where ``holders`` maps each chunk to its servers (V1)."""
    script = Script([A, B, C, D])
    for chunk, servers in holders.items():
        for ds in servers:
            script.store(ds, chunk, V1)  # type: ignore[arg-type]
    for ds in (A, B, C, D):
        script.full_report(ds)
    script.advance(5.0)
    script.scan({chunk: (V1, MIB, goal) for chunk in holders})  # type: ignore[misc]
    return script


def tally(script: Script) -> HealthTally:
    result = HealthTally()
    for chunk, ref in script.state.refs.items():
        result.add(script.state, chunk, ref)
    return result


def test_the_matrix_counts_replicas_toward_goals_and_readable_ones_apart() -> None:
    script = scripted({X: [A, B, C], Y: [A, B], Z: [A, B, C]})
    script.state.set_admin_state(C, ServerState.DECOMMISSIONING)
    result = tally(script)
    # X and Z: C no longer counts but is still read from; Y lacks one replica anyway.
    assert HealthTally.cells(result.counted) == (MatrixCell(3, 2, 3),)
    assert HealthTally.cells(result.readable) == (MatrixCell(3, 2, 1), MatrixCell(3, 3, 2))
    assert result.replicas_wanted == 3 and result.bytes_wanted == 3 * MIB
    script.state.set_admin_state(C, ServerState.MAINTENANCE)
    result = tally(script)
    assert HealthTally.cells(result.counted) == (MatrixCell(3, 2, 1), MatrixCell(3, 3, 2))
    assert HealthTally.cells(result.readable) == (MatrixCell(3, 2, 3),)
    assert result.replicas_wanted == 1


def test_missing_chunks_are_not_repair_work_and_written_chunks_are_left_out() -> None:
    script = scripted({X: [A], Y: [B, C, D]})
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D):
        script.heartbeat(ds)
    script.state.check_liveness(script.now)
    result = tally(script)
    assert HealthTally.cells(result.counted) == (MatrixCell(3, 0, 1), MatrixCell(3, 3, 1))
    assert result.replicas_wanted == 0, "a chunk with no readable replica cannot be copied"
    script.state.grant_write(Y, V2, MIB, 3, [], script.now, opened_ns=script.wall_ns())
    assert HealthTally.cells(tally(script).counted) == (MatrixCell(3, 0, 1),)


def test_a_drain_counts_the_chunks_that_still_lack_their_goal_elsewhere() -> None:
    script = scripted({X: [A, B, C, D], Y: [A, B, C], Z: [B, C, D]})
    script.state.set_admin_state(A, ServerState.DECOMMISSIONING)
    assert drain_remaining(script.state, A) == (1, MIB)  # Y only: X has B, C, D
    script.store(D, Y, V1)
    script.full_report(D)
    assert drain_remaining(script.state, A) == (0, 0)


def test_a_chunk_status_lists_every_replica_with_what_it_counts_for() -> None:
    script = scripted({X: [A, B, C]})
    script.store(D, X, V1, corrupt=True)
    script.full_report(D)
    status = chunk_status(script.state, ChunkInfo(0, X, V1, MIB), 3, token)
    assert status.health == "healthy" and status.counted == 3 and status.readable == 3
    by_server = {r.dataserver_id: r for r in status.replicas}
    assert by_server[D].corrupt and not by_server[D].counted
    assert all(by_server[ds].counted and not by_server[ds].stale for ds in (A, B, C))
    assert status.token == token(X, V1)
    # The file's goal (not the last scan's) judges the health.
    assert chunk_status(script.state, ChunkInfo(0, X, V1, MIB), 4, token).health == (
        "under-replicated"
    )
    assert replica_counts(script.state, X, V1) == (3, 3)


def test_moves_are_refused_for_the_chunks_the_balancer_must_leave_alone() -> None:
    script = scripted({X: [A, B, C], Y: [A, B]})
    assert move_refusal(script.state, X, V1, A) is None
    assert stored_replica(script.state, X, A).movable
    code, reason = move_refusal(script.state, Y, V1, A) or (0, "")
    assert code == errno.EBUSY and "below its goal" in reason
    assert not stored_replica(script.state, Y, A).movable
    assert (move_refusal(script.state, X, V2, A) or (0,))[0] == errno.ESTALE
    assert (move_refusal(script.state, X, V1, D) or (0,))[0] == errno.EINVAL
    assert script.state.hold_trims(X, script.now + 30)
    assert "being moved" in (move_refusal(script.state, X, V1, A) or (0, ""))[1]


def counters(epoch: int, copied: int, *, busy: bool) -> ClusterCounters:
    return ClusterCounters(
        epoch,
        False,
        4,
        0,
        0,
        0,
        10,
        10,
        int(busy),
        0,
        0,
        0,
        0,
        int(busy),
        0,
        0,
        0,
        copied,
        0,
        0,
        0,
        1,
    )


def test_the_repair_rate_is_measured_within_the_current_episode() -> None:
    rate = RepairRate()
    for second in range(5):
        rate.sample(float(second), counters(1, 1000, busy=False))
    rate.sample(5.0, counters(1, 1000, busy=True))
    assert rate.rate_bytes_s() == (0.0, 0.0), f"no rate under {RATE_WINDOW_S_MIN} s"
    rate.sample(6.0, counters(1, 3000, busy=True))
    assert rate.rate_bytes_s() == (1000.0, 2.0)  # from the last idle sample, not before
    rate.sample(8.0, counters(1, 7000, busy=True))
    assert rate.rate_bytes_s() == (1500.0, 4.0)
    tally = HealthTally(bytes_wanted=8000, replicas_wanted=8)
    progress = rate.progress(counters(1, 7000, busy=True), tally, cap_bytes_s=1e6)
    assert progress.episode_bytes_copied == 6000
    assert progress.eta_s == 8000 / 1500
    # A new reign starts from nothing: the rate is unknown, the ETA uses the cap.
    fresh = rate.progress(counters(2, 0, busy=True), tally, cap_bytes_s=1000.0)
    assert fresh.rate_bytes_s == 0.0 and fresh.eta_s == 8.0 and fresh.episode_bytes_copied == 0
    idle = rate.progress(counters(1, 7000, busy=False), HealthTally(), cap_bytes_s=1e6)
    assert idle.eta_s is None


def test_chunk_health_names() -> None:
    assert chunk_health(writing=True, counted=0, readable=0, goal=3) == "writing"
    assert chunk_health(writing=False, counted=0, readable=0, goal=3) == "missing"
    assert chunk_health(writing=False, counted=2, readable=3, goal=3) == "under-replicated"
    assert chunk_health(writing=False, counted=4, readable=4, goal=3) == "over-replicated"
    assert chunk_health(writing=False, counted=3, readable=2, goal=3) == "healthy"
