"""The cluster manager's pure core (metaserver.cluster_state), driven by scripts.

Each test plays dataservers (registrations, reports, heartbeats) and the namespace (scans,
deletion-queue pages) against one :class:`ClusterState`, with time as a plain number, and
checks the commands that come back in heartbeat replies.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterable

import pytest

from metaserver import cluster_state
from metaserver.cluster_state import (
    COPY_TIMEOUT_BASE_S,
    ChunkRef,
    ClusterState,
    RequestRefused,
    ServerState,
    StateOptions,
    UnknownDataserver,
)
from wire.cluster_ops import (
    HEARTBEAT_COMMANDS_MAX,
    DeleteReplica,
    FullReportRequest,
    HeartbeatRequest,
    RegisterRequest,
    ReplicaKey,
    ReplicaReport,
    ReplicateChunk,
    Space,
)
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.namespace_ops import DataserverModeEntry, DeletedChunk
from wire.tokens import AccessMode, ChunkToken

MIB = 1 << 20
GIB = 1 << 30
DEAD_AFTER_S = 10.0
GRACE_S = 5.0
OPEN_MAX_S = 40.0
A, B, C, D, E = (DataserverId(i) for i in range(1, 6))
X, Y, Z = ChunkId(0x10), ChunkId(0x20), ChunkId(0x30)
V1, V2, V3 = ChunkVersion(1), ChunkVersion(2), ChunkVersion(3)


def token(chunk: ChunkId, version: ChunkVersion) -> ChunkToken:
    return ChunkToken(chunk, version, AccessMode.READ, 0.0, b"signed")


def address(ds: DataserverId) -> str:
    return f"127.0.0.1:{7000 + ds}"


class Script:
    """One reign of the cluster manager and the dataservers around it."""

    def __init__(
        self,
        servers: Iterable[DataserverId] = (A, B, C, D),
        *,
        rate_bytes_s: float = 1e12,
        chunk_size_bytes: int = 64 * MIB,
        seed: int = 1,
        admin_modes: Iterable[DataserverModeEntry] | None = (),
    ) -> None:
        self.now = 100.0
        self.state = ClusterState(
            StateOptions(
                dead_after_s=DEAD_AFTER_S,
                grace_s=GRACE_S,
                open_max_s=OPEN_MAX_S,
                copy_rate_bytes_s=rate_bytes_s,
                chunk_size_bytes=chunk_size_bytes,
            ),
            epoch=7,
            started_s=self.now,
            rng=random.Random(seed),
            read_token=token,
            admin_modes=admin_modes,
        )
        self.available: dict[DataserverId, int] = {}
        self.stored: dict[DataserverId, dict[ChunkId, ReplicaReport]] = {}
        for ds in servers:
            self.join(ds)

    # ---- dataservers --------------------------------------------------------------

    def join(self, ds: DataserverId, available: int = 100 * GIB, incarnation: int = 1) -> None:
        self.available[ds] = available
        self.stored.setdefault(ds, {})
        self.state.register(RegisterRequest(ds, address(ds), incarnation, self.space(ds)), self.now)
        self.full_report(ds)

    def space(self, ds: DataserverId) -> Space:
        available = self.available.get(ds, 100 * GIB)
        return Space(200 * GIB, 200 * GIB - available, available, 0)

    def store(
        self,
        ds: DataserverId,
        chunk: ChunkId,
        version: ChunkVersion,
        length: int = MIB,
        corrupt: bool = False,
    ) -> None:
        self.stored[ds][chunk] = ReplicaReport(chunk, version, length, corrupt)

    def full_report(self, ds: DataserverId) -> None:
        self.state.full_report(
            FullReportRequest(ds, 1, 0, True, tuple(self.stored[ds].values())), self.now
        )

    def stored_and_reported(
        self, servers: Iterable[DataserverId], chunk: ChunkId, version: ChunkVersion
    ) -> None:
        """Each of ``servers`` stores ``chunk`` at ``version`` and sends its full report."""
        for ds in servers:
            self.store(ds, chunk, version)
            self.full_report(ds)

    def heartbeat(
        self,
        ds: DataserverId,
        *,
        added: Iterable[ReplicaReport] = (),
        removed: Iterable[ReplicaKey] = (),
        incarnation: int = 1,
    ) -> tuple[DeleteReplica | ReplicateChunk, ...]:
        return self.state.heartbeat(
            HeartbeatRequest(
                ds,
                address(ds),
                incarnation,
                self.space(ds),
                0,
                0,
                tuple(removed),
                tuple(added),
            ),
            self.now,
        )

    def carry_out(self, ds: DataserverId) -> list[DeleteReplica | ReplicateChunk]:
        """A heartbeat; then do what it says the way a dataserver does, and report it on
        the next heartbeat (copies succeed from any source that stores the version)."""
        commands = list(self.heartbeat(ds))
        removed: list[ReplicaKey] = []
        added: list[ReplicaReport] = []
        for command in commands:
            if isinstance(command, DeleteReplica):
                held = self.stored[ds].get(command.chunk_id)
                if held is not None and held.version == command.version:
                    del self.stored[ds][command.chunk_id]
                    removed.append(ReplicaKey(command.chunk_id, command.version))
            else:
                held = self.stored[ds].get(command.chunk_id)
                # A dataserver refuses to replace a newer version; none should be asked to.
                assert held is None or held.version <= command.version, (ds, command)
                source = self.by_address(command.source)
                original = self.stored[source][command.chunk_id]
                assert original.version == command.version and not original.corrupt
                copy = ReplicaReport(
                    command.chunk_id, command.version, original.length_bytes, False
                )
                self.stored[ds][command.chunk_id] = copy
                added.append(copy)
        self.heartbeat(ds, added=added, removed=removed)
        return commands

    def by_address(self, text: str) -> DataserverId:
        ds = self.state.dataserver_id(text)
        assert ds is not None
        return ds

    # ---- the namespace and time ---------------------------------------------------

    def scan(
        self,
        refs: dict[ChunkId, tuple[ChunkVersion, int, int]],
        opened: dict[ChunkId, int] | None = None,
    ) -> None:
        """A namespace scan: ``opened`` gives the open time of the chunks whose version
        is open for write (the rest are committed)."""
        opened = opened or {}
        self.state.install_scan(
            {
                chunk: ChunkRef(v, length, goal, opened.get(chunk))
                for chunk, (v, length, goal) in refs.items()
            },
            self.now,
        )

    def wall_ns(self) -> int:
        """The wall clock (the scripts keep it in step with the monotonic one)."""
        return int(self.now * 1e9)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def plan(self) -> None:
        while self.state.plan(self.now):
            pass

    def leave_safe_mode(self, refs: dict[ChunkId, tuple[ChunkVersion, int, int]]) -> None:
        self.advance(GRACE_S)
        self.scan(refs)
        self.plan()

    def round(
        self, servers: Iterable[DataserverId]
    ) -> dict[DataserverId, list[DeleteReplica | ReplicateChunk]]:
        """Plan, then one carried-out heartbeat from each of ``servers``."""
        self.plan()
        done = {ds: list(self.carry_out(ds)) for ds in servers}
        self.plan()
        return done

    def holders(self, chunk: ChunkId) -> dict[DataserverId, ChunkVersion]:
        return {ds: held[chunk].version for ds, held in self.stored.items() if chunk in held}


# ---------------------------------------------------------------- registry and reports


def test_full_reports_in_batches_replace_what_was_known() -> None:
    script = Script([A])
    state = script.state
    script.store(A, X, V1)
    script.full_report(A)
    assert state.locate(X, V1) == (V1, (A,))
    batches = [
        FullReportRequest(A, 9, 0, False, (ReplicaReport(Y, V2, MIB, False),)),
        FullReportRequest(A, 9, 1, True, (ReplicaReport(Z, V1, MIB, False),)),
    ]
    for batch in batches:
        state.full_report(batch, script.now)
    assert state.locate(X, V1) == (V1, ())
    assert state.locate(Y, V2) == (V2, (A,))
    assert state.locate(Z, V1) == (V1, (A,))


def test_out_of_order_batches_and_unknown_servers_are_refused() -> None:
    script = Script([A])
    with pytest.raises(RequestRefused) as caught:
        script.state.full_report(FullReportRequest(A, 5, 1, True, ()), script.now)
    assert caught.value.code == errno.EINVAL
    with pytest.raises(UnknownDataserver):
        script.state.full_report(FullReportRequest(B, 5, 0, True, ()), script.now)
    with pytest.raises(UnknownDataserver):
        script.heartbeat(B)
    with pytest.raises(UnknownDataserver):
        script.heartbeat(A, incarnation=2)  # restarted: must register again


def test_a_full_report_longer_than_the_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cluster_state, "FULL_REPORT_REPLICAS_MAX", 3)
    script = Script([A])
    reports = tuple(ReplicaReport(ChunkId(i), V1, MIB, False) for i in range(1, 4))
    script.state.full_report(FullReportRequest(A, 1, 0, False, reports), script.now)
    with pytest.raises(RequestRefused) as caught:
        script.state.full_report(FullReportRequest(A, 1, 1, True, reports[:1]), script.now)
    assert caught.value.code == errno.E2BIG


def test_registration_is_validated_and_an_address_taken_over_retires_its_old_owner() -> None:
    script = Script([A])
    with pytest.raises(RequestRefused):
        script.state.register(RegisterRequest(B, "not an address", 1, script.space(A)), script.now)
    with pytest.raises(RequestRefused):
        script.state.register(
            RegisterRequest(DataserverId(0), address(A), 1, script.space(A)), script.now
        )
    script.state.register(RegisterRequest(B, address(A), 1, script.space(A)), script.now)
    assert script.state.state_of(A) is ServerState.DEAD
    assert script.state.dataserver_id(address(A)) == B


def test_heartbeats_apply_removals_then_additions() -> None:
    script = Script([A])
    script.heartbeat(A, added=[ReplicaReport(X, V1, MIB, False)])
    assert script.state.locate(X, V1)[1] == (A,)
    script.heartbeat(A, removed=[ReplicaKey(X, V1)], added=[ReplicaReport(X, V2, 2 * MIB, False)])
    assert script.state.locate(X, V2)[1] == (A,)
    assert script.state.replicas[X][A].length_bytes == 2 * MIB


# ---------------------------------------------------------------- safe mode and liveness


def test_nothing_is_deleted_or_copied_in_safe_mode() -> None:
    script = Script([A, B, C, D])
    script.store(A, X, V1)
    script.full_report(A)
    script.scan({})  # X is not referenced: an orphan once safe mode ends
    script.plan()
    assert script.carry_out(A) == []
    script.advance(GRACE_S)
    script.plan()
    assert script.carry_out(A) == []  # the scan started before X was first reported
    script.scan({})
    script.plan()
    assert script.carry_out(A) == [DeleteReplica(X, V1)]
    assert script.holders(X) == {}


def test_silence_past_dead_after_marks_a_server_dead_and_a_heartbeat_revives_it() -> None:
    script = Script([A, B])
    script.advance(DEAD_AFTER_S - 1)
    script.heartbeat(B)
    script.advance(2)
    assert script.state.check_liveness(script.now) == [A]
    assert script.state.state_of(A) is ServerState.DEAD
    assert script.state.state_of(B) is ServerState.LIVE
    script.heartbeat(A)
    assert script.state.state_of(A) is ServerState.LIVE


# ---------------------------------------------------------------- healing


def heal_setup(servers: Iterable[DataserverId] = (A, B, C, D, E), **options: float) -> Script:
    """X on A,B,C and Y on A,B at goal 3; everything reported and scanned."""
    script = Script(servers, **options)  # type: ignore[arg-type]
    for ds in (A, B, C):
        script.store(ds, X, V2)
    for ds in (A, B):
        script.store(ds, Y, V1)
    for ds in script.stored:
        script.full_report(ds)
    script.leave_safe_mode({X: (V2, MIB, 3), Y: (V1, MIB, 3)})
    return script


def test_a_dead_server_s_chunks_are_copied_from_live_holders_to_new_servers() -> None:
    script = heal_setup()
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D, E):
        script.heartbeat(ds)
    assert script.state.check_liveness(script.now) == [A]
    for _ in range(3):
        script.round([B, C, D, E])
    live = {B, C, D, E}
    assert len(set(script.holders(X)) & live) == 3
    assert len(set(script.holders(Y)) & live) == 3
    counters = script.state.counters(script.now)
    assert counters.under_replicated == 0 and counters.copies_in_flight == 0
    assert counters.copies_done == 3 and counters.bytes_copied == 3 * MIB


def test_the_chunk_with_fewest_live_replicas_is_copied_first() -> None:
    # Room for one copy only: Y (1 live replica after A dies) goes before X (2 left).
    script = Script([A, B, C, D, E], rate_bytes_s=1.0, chunk_size_bytes=MIB)
    for ds in (A, B, C):
        script.store(ds, X, V2)
    for ds in (A, B):
        script.store(ds, Y, V1)
    for ds in (A, B, C):
        script.full_report(ds)
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D, E):
        script.heartbeat(ds)
    assert script.state.check_liveness(script.now) == [A]
    script.scan({X: (V2, MIB, 3), Y: (V1, MIB, 3)})
    script.plan()
    orders = [c for ds in (B, C, D, E) for c in script.heartbeat(ds)]
    assert [(type(o), o.chunk_id) for o in orders] == [(ReplicateChunk, Y)]
    counters = script.state.counters(script.now)
    # Y still wants one more copy after this one: both wait for copy traffic.
    assert counters.under_replicated == 2 and counters.replication_queue == 2


def test_copy_traffic_stays_within_the_rate() -> None:
    rate = 2.0 * MIB
    script = Script([A, B, C, D, E], rate_bytes_s=rate, chunk_size_bytes=MIB)
    many = {ChunkId(0x100 + i): (V1, MIB, 3) for i in range(40)}
    for chunk in many:
        script.store(B, chunk, V1)
        script.store(C, chunk, V1)
    for ds in (B, C):
        script.full_report(ds)
    script.leave_safe_mode(many)
    started = script.state.counters(script.now).copies_in_flight
    assert started == 2  # the burst: one second's worth
    for second in range(1, 6):
        script.advance(1.0)
        for ds in (A, B, C, D, E):
            script.heartbeat(ds)
        script.plan()
        started = script.state.counters(script.now).copies_in_flight
        assert started == 2 + 2 * second


def test_a_copy_that_never_lands_is_retried_on_another_target() -> None:
    script = heal_setup([A, B, C, D])
    script.plan()
    first = {ds: c for ds in (C, D) for c in script.heartbeat(ds) if isinstance(c, ReplicateChunk)}
    assert [order.chunk_id for order in first.values()] == [Y]
    script.advance(COPY_TIMEOUT_BASE_S + 5)
    for ds in (A, B, C, D):
        script.heartbeat(ds)
    script.plan()
    again = {ds: c for ds in (C, D) for c in script.heartbeat(ds) if isinstance(c, ReplicateChunk)}
    assert [order.chunk_id for order in again.values()] == [Y]
    assert set(again) != set(first)
    assert script.state.counters(script.now).copies_failed == 1


def test_over_replicated_chunks_are_trimmed_to_the_goal_on_the_fullest_servers() -> None:
    script = Script([A, B, C, D])
    script.available[C] = GIB
    script.heartbeat(C)
    for ds in (A, B, C, D):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    deletes = {ds: script.carry_out(ds) for ds in (A, B, C, D)}
    assert deletes[C] == [DeleteReplica(X, V1)]
    assert sum(len(d) for d in deletes.values()) == 1
    assert set(script.holders(X)) == {A, B, D}
    script.plan()
    assert script.state.counters(script.now).over_replicated == 0


def test_stale_versions_are_deleted_once_a_current_replica_is_readable() -> None:
    script = Script([A, B, C, D])
    script.store(A, X, V1)  # missed the write of V2 (it was away)
    for ds in (B, C, D):
        script.store(ds, X, V2)
    for ds in (A, B, C, D):
        script.full_report(ds)
    script.leave_safe_mode({X: (V2, MIB, 3)})
    assert script.carry_out(A) == [DeleteReplica(X, V1)]
    assert set(script.holders(X)) == {B, C, D}


def test_an_abandoned_open_keeps_the_older_replicas_and_serves_them() -> None:
    # The namespace is at V3 but no dataserver ever got V3: V2 is the committed content.
    script = Script([A, B, C])
    for ds in (A, B, C):
        script.store(ds, X, V2)
        script.full_report(ds)
    script.leave_safe_mode({X: (V3, MIB, 3)})
    assert all(script.carry_out(ds) == [] for ds in (A, B, C))
    version, holders = script.state.locate(X, V3)
    assert version == V2 and set(holders) == {A, B, C}
    # The next open derives from what the servers hold.
    plan = script.state.grant_write(
        X, ChunkVersion(4), MIB, 3, (), script.now, opened_ns=script.wall_ns()
    )
    assert plan.base == V2 and set(plan.chain) == {A, B, C}


def test_the_last_good_replica_is_never_deleted_and_a_missing_chunk_is_counted() -> None:
    script = Script([A, B, C])
    script.store(A, X, V2, corrupt=True)
    script.store(B, X, V1)
    for ds in (A, B, C):
        script.full_report(ds)
    script.leave_safe_mode({X: (V2, MIB, 3)})
    assert all(script.carry_out(ds) == [] for ds in (A, B, C))
    assert script.state.counters(script.now).missing == 1


def test_a_client_cannot_mark_the_last_good_replica_corrupt() -> None:
    script = Script([A, B])
    script.store(A, X, V1)
    script.store(B, X, V1)
    for ds in (A, B):
        script.full_report(ds)
    state = script.state
    assert state.report_corrupt(X, V1, None, address(A), authoritative=False)
    assert not state.report_corrupt(X, V1, None, address(B), authoritative=False)
    assert state.locate(X, V1)[1] == (B,)
    assert state.report_corrupt(X, V1, B, address(B), authoritative=True)
    assert state.locate(X, V1)[1] == ()


def test_a_corrupt_replica_is_replaced_then_deleted() -> None:
    script = Script([A, B, C, D])
    script.stored_and_reported((A, B, C), X, V1)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    assert script.state.report_corrupt(X, V1, None, address(A), authoritative=False)
    script.stored[A][X] = ReplicaReport(X, V1, MIB, True)
    script.plan()
    assert script.carry_out(A) == []  # not deleted before a replacement exists
    copies = script.carry_out(D)
    assert [type(c) for c in copies] == [ReplicateChunk]
    script.plan()
    assert script.carry_out(A) == [DeleteReplica(X, V1)]
    assert set(script.holders(X)) == {B, C, D}


def test_a_corrupt_copy_is_replaced_in_place_when_no_other_server_is_free() -> None:
    script = Script([A, B, C])
    for ds in (A, B, C):
        script.store(ds, X, V1, corrupt=ds == A)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    (order,) = script.carry_out(A)
    assert isinstance(order, ReplicateChunk) and order.source in {address(B), address(C)}
    assert not script.stored[A][X].corrupt


def test_a_decommissioning_server_is_copied_off_but_keeps_its_replicas() -> None:
    script = Script([A, B, C, D])
    script.stored_and_reported((A, B, C), X, V1)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    script.state.set_admin_state(A, ServerState.DECOMMISSIONING)
    script.round([A, B, C, D])
    script.round([A, B, C, D])
    assert set(script.holders(X)) == {A, B, C, D}
    assert A in script.state.locate(X, V1)[1]  # still read from
    plan = script.state.grant_write(Y, V1, 0, 4, [], script.now, opened_ns=script.wall_ns())
    assert A not in plan.chain
    script.state.set_admin_state(A, None)
    script.round([A, B, C, D])
    assert len(script.holders(X)) == 3


def test_a_server_in_maintenance_counts_toward_goals_while_silent_but_is_not_read() -> None:
    script = Script([A, B, C, D])
    script.stored_and_reported((A, B, C), X, V1)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    script.state.set_admin_state(A, ServerState.MAINTENANCE)
    script.advance(DEAD_AFTER_S + 1)
    for ds in (B, C, D):
        script.heartbeat(ds)
    script.state.check_liveness(script.now)
    script.round([B, C, D])
    assert set(script.holders(X)) == {A, B, C}
    assert set(script.state.locate(X, V1)[1]) == {B, C}
    assert script.state.counters(script.now).dataservers_maintenance == 1


def test_the_command_queue_of_a_server_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_state, "SERVER_COMMANDS_MAX", 5)
    script = Script([A])
    for i in range(8):
        script.store(A, ChunkId(0x1000 + i), V1)
    script.full_report(A)
    script.advance(GRACE_S)
    script.scan({})
    script.advance(1)
    script.scan({})
    script.plan()
    assert len(script.state.servers[A].commands) == 5
    assert len(script.carry_out(A)) == 5
    script.scan({})
    script.plan()
    assert len(script.carry_out(A)) == 3
    assert script.stored[A] == {}


# ---------------------------------------------------------------- garbage


def test_deletion_queue_entries_are_judged_only_after_a_later_scan() -> None:
    script = Script([A, B, C])
    for ds in (A, B):
        script.store(ds, X, V1)
        script.full_report(ds)
    script.leave_safe_mode({X: (V1, MIB, 2)})
    entry = DeletedChunk(X, V1)
    state = script.state
    assert state.deletion_entries([entry], script.now) == []
    assert all(script.heartbeat(ds) == () for ds in (A, B))
    script.advance(1)
    script.scan({})
    assert state.deletion_entries([entry], script.now) == []  # deletes are on their way
    assert script.carry_out(A) == [DeleteReplica(X, V1)]
    assert script.carry_out(B) == [DeleteReplica(X, V1)]
    assert state.deletion_entries([entry], script.now) == [entry]
    assert script.holders(X) == {}


def test_a_version_bump_entry_is_acked_at_once_and_dead_holders_do_not_block() -> None:
    script = Script([A, B, C])
    script.store(A, X, V2)
    script.store(B, X, V2)
    script.store(C, X, V1)
    script.store(C, Y, V1)
    for ds in (A, B, C):
        script.full_report(ds)
    script.leave_safe_mode({X: (V2, MIB, 2)})
    entries = [DeletedChunk(X, V1), DeletedChunk(Y, V1)]
    state = script.state
    state.deletion_entries(entries, script.now)
    script.advance(DEAD_AFTER_S + 1)
    for ds in (A, B):
        script.heartbeat(ds)
    state.check_liveness(script.now)
    script.scan({X: (V2, MIB, 2)})
    assert state.deletion_entries(entries, script.now) == entries


def test_a_delete_of_a_replica_the_server_does_not_have_is_forgotten_next_heartbeat() -> None:
    script = Script([A])
    script.store(A, X, V1)
    script.full_report(A)
    del script.stored[A][X]  # it vanished without a report
    script.advance(GRACE_S)
    script.scan({})
    script.advance(1)
    script.scan({})
    script.plan()
    assert script.heartbeat(A) == (DeleteReplica(X, V1),)
    script.heartbeat(A)  # nothing removed: it was not there
    assert X not in script.state.replicas


def test_a_heartbeat_reply_carries_at_most_the_command_limit() -> None:
    script = Script([A])
    count = HEARTBEAT_COMMANDS_MAX + 200
    for i in range(count):
        script.store(A, ChunkId(0x1000 + i), V1)
    script.full_report(A)
    script.advance(GRACE_S)
    script.scan({})
    script.advance(1)
    script.scan({})
    script.plan()
    first = script.heartbeat(A)
    second = script.heartbeat(A)
    assert len(first) == HEARTBEAT_COMMANDS_MAX
    assert len(second) == 200


# ---------------------------------------------------------------- writes


def test_a_new_chunk_goes_to_goal_distinct_live_servers_minus_the_excluded() -> None:
    script = Script([A, B, C, D])
    plan = script.state.grant_write(X, V1, 0, 3, [D], script.now, opened_ns=script.wall_ns())
    assert plan.base is None and plan.topups == ()
    assert len(set(plan.chain)) == 3 and D not in plan.chain
    small = script.state.grant_write(Y, V1, 0, 16, [], script.now, opened_ns=script.wall_ns())
    assert sorted(small.chain) == [A, B, C, D]


def test_a_retried_open_gets_the_same_chain() -> None:
    script = Script([A, B, C, D])
    first = script.state.grant_write(X, V1, 0, 3, [], script.now, opened_ns=script.wall_ns())
    again = script.state.grant_write(X, V1, 0, 3, [], script.now, opened_ns=script.wall_ns())
    assert again.chain == first.chain


def test_an_existing_chunk_is_written_on_its_holders_topped_up_by_copies() -> None:
    script = Script([A, B, C, D])
    script.store(A, X, V1)
    script.store(B, X, V1)
    script.store(C, X, ChunkVersion(0))  # an older copy: may be replaced by a top-up
    for ds in (A, B, C):
        script.full_report(ds)
    plan = script.state.grant_write(X, V2, MIB, 3, [B], script.now, opened_ns=script.wall_ns())
    assert plan.base == V1 and plan.chain == (A,)
    assert len(plan.topups) == 2 and all(source == A for _, source in plan.topups)
    assert {target for target, _ in plan.topups} == {C, D}
    chain = script.state.topup_done(X, V1, D, MIB, script.now)
    assert chain == (A, D)


def test_no_live_replica_to_derive_from_is_an_error_unless_the_chunk_is_empty() -> None:
    script = Script([A, B, C])
    script.leave_safe_mode({})
    with pytest.raises(RequestRefused) as caught:
        script.state.grant_write(X, V2, MIB, 3, [], script.now, opened_ns=script.wall_ns())
    assert caught.value.code == errno.EIO
    plan = script.state.grant_write(Y, V2, 0, 3, [], script.now, opened_ns=script.wall_ns())
    assert plan.base is None and len(plan.chain) == 3


def test_a_young_leader_asks_writers_to_retry_until_reports_arrive() -> None:
    script = Script([])
    with pytest.raises(RequestRefused) as caught:
        script.state.grant_write(X, V1, 0, 3, [], script.now, opened_ns=script.wall_ns())
    assert caught.value.code == errno.EAGAIN
    with pytest.raises(RequestRefused) as caught:
        script.state.grant_write(Y, V2, MIB, 3, [], script.now, opened_ns=script.wall_ns())
    assert caught.value.code == errno.EAGAIN
    script.leave_safe_mode({})
    assert (
        script.state.grant_write(X, V1, 0, 3, [], script.now, opened_ns=script.wall_ns()).chain
        == ()
    )


def test_members_of_a_failed_pipeline_that_never_got_the_write_are_found_by_probing() -> None:
    script = Script([A, B, C, D])
    script.stored_and_reported((A, B, C), X, V1)
    state = script.state
    first = state.grant_write(X, V2, MIB, 3, [], script.now, opened_ns=script.wall_ns())
    assert set(first.chain) == {A, B, C}
    # The first member failed; nobody renamed to V2.  The next open asks the others.
    failed = first.chain[0]
    unsure = [ds for ds in state.unconfirmed_members(X, V2) if ds != failed]
    assert sorted(unsure) == sorted(set(first.chain) - {failed})
    for ds in unsure:
        state.probed(X, V2, ds, None, script.now)
    second = state.grant_write(X, V3, MIB, 3, [failed], script.now, opened_ns=script.wall_ns())
    assert second.base == V1 and set(second.chain) == set(unsure)
    assert [target for target, _ in second.topups] == [D]


def test_a_chunk_being_written_is_neither_copied_nor_cleaned_until_committed() -> None:
    script = Script([A, B, C, D])
    script.stored_and_reported((A, B, C), X, V1)
    script.leave_safe_mode({X: (V1, MIB, 3)})
    opened_ns = script.wall_ns()
    plan = script.state.grant_write(X, V2, MIB, 3, [C], script.now, opened_ns=opened_ns)
    for ds in plan.chain:
        script.store(ds, X, V2)
        script.heartbeat(ds, added=[script.stored[ds][X]])
    # However long the writer keeps the version open (short of the token's life), and
    # across scans that show it open, nothing is copied, trimmed or cleaned.
    for _ in range(3):
        script.advance(OPEN_MAX_S / 4)
        script.scan({X: (V2, MIB, 3)}, {X: opened_ns})
        script.plan()
        assert all(script.heartbeat(ds) == () for ds in (A, B, C, D))
    assert script.state.counters(script.now).writes_in_flux == 1
    script.scan({X: (V2, 2 * MIB, 3)})  # the writer committed
    script.round([A, B, C, D])
    script.round([A, B, C, D])
    holders = script.holders(X)
    assert sorted(holders.values()) == [V2, V2, V2]
    assert script.state.counters(script.now).writes_in_flux == 0


def test_waiting_copies_do_not_pile_up_in_the_queue_across_scans() -> None:
    script = Script([A, B, C, D], rate_bytes_s=1.0, chunk_size_bytes=MIB)
    many = {ChunkId(0x100 + i): (V1, MIB, 3) for i in range(50)}
    for chunk in many:
        script.store(A, chunk, V1)
    script.full_report(A)
    script.leave_safe_mode(many)
    for _scan in range(20):
        script.advance(0.01)
        script.scan(many)
        script.plan()
    queue = script.state._under_heap  # noqa: SLF001 (the bound under test)
    assert len(queue) <= 2 * len(many)
    assert script.state.counters(script.now).under_replicated == len(many)
