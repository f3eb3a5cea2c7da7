"""Durable dataserver modes in the cluster manager's core: a reign starts from the
namespace's mode table, so a drain goes on and a dataserver in maintenance is not
re-replicated after a leader change (metaserver.cluster_state, rule 7)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from metaserver.cluster_admin import HealthTally
from metaserver.cluster_state import ServerState, UnknownDataserver
from wire.cluster_admin_ops import DataserverMode
from wire.cluster_ops import ReplicateChunk
from wire.ids import DataserverId
from wire.namespace_ops import DataserverModeEntry

from .test_cluster_manager_state import (
    DEAD_AFTER_S,
    MIB,
    V1,
    A,
    B,
    C,
    D,
    Script,
    X,
    Y,
    address,
)


def row(ds: DataserverId, mode: DataserverMode) -> DataserverModeEntry:
    return DataserverModeEntry(ds, mode, 1_000, address(ds))


MAINTENANCE_A = (row(A, DataserverMode.MAINTENANCE),)


def new_reign_without_a(admin_modes: tuple[DataserverModeEntry, ...]) -> Script:
    """A reign after a leader change: A (which held X with B and C) has not come back;
    B, C and D report."""
    script = Script([B, C, D], admin_modes=admin_modes)
    for ds in (B, C):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    return script


def copies(done: Mapping[DataserverId, Sequence[object]]) -> list[object]:
    return [c for commands in done.values() for c in commands if isinstance(c, ReplicateChunk)]


def test_without_the_table_a_silent_server_s_chunks_are_re_replicated() -> None:
    script = new_reign_without_a(())
    assert copies(script.round([B, C, D]))
    assert set(script.holders(X)) == {B, C, D}


def test_a_server_in_maintenance_in_the_table_is_known_before_it_registers() -> None:
    script = new_reign_without_a(MAINTENANCE_A)
    state = script.state
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D):
        script.heartbeat(ds)
    state.check_liveness(script.now)
    for _ in range(3):
        assert not copies(script.round([B, C, D]))
    assert set(script.holders(X)) == {B, C}
    assert state.state_of(A) is ServerState.MAINTENANCE
    (status,) = [s for s in state.dataservers(script.now) if s.dataserver_id == A]
    assert status.address == address(A) and status.state is ServerState.MAINTENANCE
    assert state.counters(script.now).dataservers_maintenance == 1
    assert A not in state.locate(X, V1)[1]
    assert A not in state.grant_write(Y, V1, 0, 3, [], script.now, opened_ns=script.wall_ns()).chain
    assert state.held_for_maintenance(X)
    tally = HealthTally()
    tally.add(state, X, state.refs[X])
    assert tally.replicas_wanted == 0 and tally.counted == {(3, 2): 1}


def test_a_decommissioning_server_not_heard_from_yet_is_dead_only_after_dead_after_s() -> None:
    script = new_reign_without_a((row(A, DataserverMode.DECOMMISSION),))
    assert script.state.state_of(A) is ServerState.DECOMMISSIONING
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D):
        script.heartbeat(ds)
    assert script.state.check_liveness(script.now) == [A]
    assert script.state.state_of(A) is ServerState.DEAD


def test_the_presumption_ends_with_the_servers_full_report() -> None:
    script = new_reign_without_a(MAINTENANCE_A)
    assert not copies(script.round([B, C, D]))
    script.join(A)  # back from maintenance without X (its disk was replaced)
    assert copies(script.round([A, B, C, D]))
    assert len(script.holders(X)) == 3


def test_the_presumption_ends_when_the_mode_is_turned_off() -> None:
    script = new_reign_without_a(MAINTENANCE_A)
    assert not copies(script.round([B, C, D]))
    assert script.state.held_for_maintenance(X)
    script.state.install_admin_modes((), script.now)
    assert script.state.state_of(A) is ServerState.DEAD
    assert copies(script.round([B, C, D]))
    assert not script.state.held_for_maintenance(X)
    assert set(script.holders(X)) == {B, C, D}


def test_a_server_in_maintenance_that_reports_counts_only_what_it_holds() -> None:
    script = Script([A, B, C, D], admin_modes=MAINTENANCE_A)
    script.stored_and_reported((A, B, C), X, V1)
    script.store(B, Y, V1)
    script.full_report(B)
    script.leave_safe_mode({X: (V1, MIB, 3), Y: (V1, MIB, 2)})
    script.round([B, C, D])
    assert set(script.holders(X)) == {A, B, C}
    assert len(script.holders(Y)) == 2  # A reported and has no Y: Y is copied


def test_a_drain_goes_on_in_a_new_reign() -> None:
    script = Script([A, B, C, D], admin_modes=(row(A, DataserverMode.DECOMMISSION),))
    script.stored_and_reported((A, B, C), X, V1)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    assert script.state.state_of(A) is ServerState.DECOMMISSIONING
    script.round([A, B, C, D])
    script.round([A, B, C, D])
    assert set(script.holders(X)) == {A, B, C, D}
    assert A in script.state.locate(X, V1)[1]  # still read from while it drains


def test_the_reign_stays_in_safe_mode_until_the_table_is_installed() -> None:
    script = Script([A, B, C, D], admin_modes=None)
    for ds in (A, B):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    assert script.state.safe_mode(script.now)
    assert not copies(script.round([A, B, C, D]))
    script.state.install_admin_modes((), script.now)
    assert not script.state.safe_mode(script.now)
    assert copies(script.round([A, B, C, D]))


def test_installing_the_table_again_changes_nothing_and_rows_follow_it() -> None:
    script = new_reign_without_a(MAINTENANCE_A)
    state = script.state
    before = state.dataservers(script.now)
    state.install_admin_modes(MAINTENANCE_A, script.now)
    assert state.dataservers(script.now) == before
    state.install_admin_modes((row(B, DataserverMode.DECOMMISSION),), script.now)
    assert state.state_of(B) is ServerState.DECOMMISSIONING
    assert state.state_of(A) is ServerState.DEAD and A in state.servers  # known, silent
    with pytest.raises(UnknownDataserver):
        script.heartbeat(A)  # it must register (and report) first
    script.join(A)
    assert state.state_of(A) is ServerState.LIVE
