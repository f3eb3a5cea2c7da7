"""Rules of one Paxos replica, each shown on a small hand-driven group.

The group here is the scripted-interaction environment of ``tests/sim``: nodes own a
durable record list, messages wait in a queue until delivered, and the simulation's
safety checker watches every step.
"""

from __future__ import annotations

import random

import pytest

from metaserver.paxos import (
    Ballot,
    EntryKind,
    Membership,
    MembershipChange,
    MembershipChangeKind,
    MembershipResult,
    NodeId,
    PaxosInvariantError,
    PaxosNode,
    PaxosOptions,
    ProposeResult,
    ReadId,
    ReadMode,
    ReadResult,
    Role,
    Slot,
    initial_snapshot_meta,
)
from metaserver.paxos.messages import (
    Accept,
    Accepted,
    Commit,
    Heartbeat,
    Nack,
    Prepare,
    ProbeReply,
    ProbeRequest,
    Promise,
)
from metaserver.paxos.records import AcceptedRecord, CommitRecord, PromiseRecord
from metaserver.paxos.types import NOOP_ENTRY, Entry
from tests.sim.interaction import InteractionEnv

N1, N2, N3 = NodeId(1), NodeId(2), NodeId(3)


def group(count: int = 3, **settings: str) -> InteractionEnv:
    env = InteractionEnv()
    env.run("add-nodes " + " ".join([str(count)] + [f"{k}={v}" for k, v in settings.items()]))
    return env


def elect(env: InteractionEnv, node: int = 1) -> PaxosNode:
    env.run(f"campaign {node}")
    env.run("stabilize")
    leader = env.owners[NodeId(node)].node
    assert leader is not None and leader.is_leader_ready()
    return leader


def lone_node(**options: object) -> PaxosNode:
    return PaxosNode(
        node_id=N1,
        options=PaxosOptions(**options),  # type: ignore[arg-type]
        rng=random.Random(1),
        now_ms=0,
        snapshot=initial_snapshot_meta((N1, N2, N3)),
    )


# ---------------------------------------------------------------- proposals


def test_a_follower_refuses_proposals_and_reads() -> None:
    env = group()
    elect(env)
    follower = env.owners[N2].node
    assert follower is not None
    assert follower.propose(b"x") == ProposeResult.NOT_LEADER
    assert follower.request_read(ReadId(1), env.now_ms) == ReadResult.NOT_LEADER
    assert follower.leader_id == N1


def test_proposals_are_bounded_in_size_and_in_number() -> None:
    env = InteractionEnv()
    env.run("add-nodes 3")
    leader = elect(env)
    leader._options = PaxosOptions(command_bytes_max=4, queue_commands_max=2)
    assert leader.propose(b"12345") == ProposeResult.TOO_LARGE
    assert leader.propose(b"a") == ProposeResult.OK
    assert leader.propose(b"b") == ProposeResult.OK
    assert leader.propose(b"c") == ProposeResult.QUEUE_FULL


def test_commands_are_batched_per_slot_up_to_the_batch_limit() -> None:
    env = group(batch="2")
    leader = elect(env)
    for command in (b"a", b"b", b"c", b"d", b"e"):
        assert leader.propose(command) == ProposeResult.OK
    ready = leader.ready()
    (record,) = [r for r in ready.records if isinstance(r, AcceptedRecord)]
    assert [e.commands for e in record.entries] == [(b"a", b"b"), (b"c", b"d"), (b"e",)]
    accepts = [o.message for o in ready.messages if isinstance(o.message, Accept)]
    assert len(accepts) == 2, "one Accept per follower carries every new slot"


def test_the_check_after_a_step_leaves_queued_proposals_to_batch() -> None:
    env = group(batch="8")
    leader = elect(env)
    leader.propose(b"a")
    assert not leader.has_ready_besides_proposals()
    leader.propose(b"b")
    assert leader.has_ready()
    ready = leader.ready()
    (record,) = [r for r in ready.records if isinstance(r, AcceptedRecord)]
    assert [e.commands for e in record.entries] == [(b"a", b"b")], "one slot for both"


def test_no_more_than_the_window_of_slots_is_in_flight() -> None:
    env = group(window="2", batch="1")
    leader = elect(env)
    for command in (b"a", b"b", b"c", b"d"):
        leader.propose(command)
    env.run("process-ready 1")
    (record,) = [r for r in env.owners[N1].records if isinstance(r, AcceptedRecord)]
    assert record.first_slot == 1 and len(record.entries) == 2
    env.run("stabilize")
    assert leader.commit_index == 4, "the window slides as slots are chosen"


def test_the_leader_counts_its_own_vote_only_after_advance() -> None:
    env = InteractionEnv()
    env.run("add-nodes 1")
    leader = elect(env)
    leader.propose(b"x")
    first = leader.ready()
    assert any(isinstance(r, AcceptedRecord) for r in first.records)
    assert first.committed == (), "not chosen before its own vote is durable"
    leader.advance(first)
    second = leader.ready()
    assert [c.commands for c in second.committed] == [(b"x",)]
    assert CommitRecord(Slot(1)) in second.records


def _commits(env: InteractionEnv) -> list[str]:
    """Process node 1's Ready; the Commit messages it sends, as text."""
    return [line for line in env.run("process-ready 1").splitlines() if "Commit b=" in line]


def test_commit_news_rides_on_the_next_accept_instead_of_a_commit_message() -> None:
    env = group(batch="1", **{"commit-delay": "5"})
    leader = elect(env)
    follower = env.owners[N2].node
    assert follower is not None
    for command in (b"a", b"b", b"c"):
        leader.propose(command)
        env.run("process-ready 1")
        env.run("deliver-msgs")
        env.run("process-ready 2 3")
        env.run("deliver-msgs")
        assert _commits(env) == [], "the commit must wait for the next Accept"
    assert leader.commit_index == 3
    assert follower.applied_index == 2, "each Accept told the followers of the slot before"
    leader.propose(b"d")
    env.run("process-ready 1")
    accepts = [o.message for _sender, o in env.queue if isinstance(o.message, Accept)]
    assert {a.commit_index for a in accepts} == {3}


def test_commit_news_goes_alone_once_the_delay_passes_without_traffic() -> None:
    env = group(batch="1", **{"commit-delay": "5"})
    leader = elect(env)
    leader.propose(b"a")
    env.run("stabilize")
    follower = env.owners[N2].node
    assert follower is not None and leader.commit_index == 1
    assert follower.applied_index == 0, "nobody told the follower yet"
    env.run("tick 4 1")
    assert _commits(env) == []
    env.run("tick 1 1")
    assert _commits(env) == [
        "    1->2 Commit b=1.1 commit=1 base=1",
        "    1->3 Commit b=1.1 commit=1 base=1",
    ]
    env.run("stabilize")
    assert follower.applied_index == 1


def test_without_a_delay_commit_news_leaves_at_once() -> None:
    env = group(batch="1")
    leader = elect(env)
    leader.propose(b"a")
    env.run("process-ready 1")
    env.run("deliver-msgs")
    env.run("process-ready 2 3")
    env.run("deliver-msgs")
    ready = leader.ready()
    commits = [o.message for o in ready.messages if isinstance(o.message, Commit)]
    assert [(c.commit_index, c.commit_base) for c in commits] == [(1, 1), (1, 1)]


def _accept_targets(env: InteractionEnv) -> list[int]:
    """Process node 1's Ready; the peers its Accepts go to."""
    ready = env.run("process-ready 1").splitlines()
    return sorted({int(line.split("->")[1].split()[0]) for line in ready if " Accept b=" in line})


def test_a_thrifty_leader_sends_new_slots_at_once_only_to_a_quorum() -> None:
    env = group(5, batch="1", thrifty="1", **{"commit-delay": "5"})
    leader = elect(env)
    leader.propose(b"a")
    assert _accept_targets(env) == [2, 3], "itself and two followers make a quorum of five"
    env.run("stabilize")
    assert leader.commit_index == 1
    env.run("tick 10 1")
    heartbeat = env.run("stabilize")
    assert "1->4 Accept b=1.1 slots=1..1 [a] commit=1" in heartbeat
    assert "1->5 Accept b=1.1 slots=1..1 [a] commit=1" in heartbeat
    assert "CatchupRequest" not in heartbeat, "held-back slots go before the commit news"
    for node in (NodeId(4), NodeId(5)):
        follower = env.owners[node].node
        assert follower is not None and follower.applied_index == 1


def test_a_quiet_thrifty_leader_sends_held_back_slots_after_the_quiet_time() -> None:
    env = group(3, batch="1", thrifty="1", quiet="7", **{"commit-delay": "5"})
    leader = elect(env)
    lazy = env.owners[N3].node
    assert lazy is not None
    for command in (b"a", b"b"):
        leader.propose(command)
        env.run("stabilize")
    assert leader.commit_index == 2 and lazy.applied_index == 0
    env.run("tick 6 1")
    assert "1->3" not in env.run("stabilize")
    env.run("tick 1 1")
    assert "1->3 Accept b=1.1 slots=1..2 [a] [b] commit=2" in env.run("stabilize")
    assert lazy.applied_index == 2, "a quiet group converges well before a heartbeat"


def test_a_new_thrifty_leader_first_sends_to_a_follower_that_promised() -> None:
    env = group(3, batch="1", thrifty="1", **{"commit-delay": "5"})
    env.run("crash 1")
    leader = elect(env, 3)
    leader.propose(b"a")
    ready = env.run("process-ready 3")
    assert "3->2 Accept" in ready and "3->1 Accept" not in ready, "node 1 never promised"


def test_a_thrifty_leader_sends_to_every_member_while_a_membership_change_is_pending() -> None:
    env = group(3, batch="1", window="4", thrifty="1", **{"commit-delay": "5"})
    leader = elect(env)
    leader.change_membership(MembershipChange(MembershipChangeKind.ADD_LEARNER, NodeId(4)))
    assert _accept_targets(env) == [2], "not chosen yet: one membership, one quorum"
    env.run("deliver-msgs")
    env.run("process-ready 2")
    env.run("deliver-msgs")
    # Chosen: the no-ops that bring it into force need quorums of both memberships.
    assert _accept_targets(env) == [2, 3, 4]
    assert leader.status().pending_membership is not None


def test_a_deposed_leader_drops_its_queue_and_says_so() -> None:
    env = group()
    leader = elect(env)
    env.run("partition 1 2,3")
    env.run("campaign 2")
    env.run("stabilize")
    leader.propose(b"late")
    nack = Nack(N2, leader.promised, Ballot(leader.promised.round + 1, N2))
    leader.step(nack, env.now_ms)
    assert leader.role == Role.FOLLOWER
    notices = leader.ready().notices
    assert any(getattr(n, "commands", None) == (b"late",) for n in notices)


# ---------------------------------------------------------------- acceptors


def test_promise_pages_are_bounded_in_bytes_as_well_as_in_entries() -> None:
    node = lone_node(
        message_bytes_max=1000,
        batch_bytes_max=1000,
        command_bytes_max=1000,
        catchup_bytes_max=1000,
        snapshot_chunk_bytes=1000,
    )
    big = Entry(EntryKind.COMMANDS, (b"x" * 400,))
    node.step(Accept(N2, Ballot(1, N2), Slot(1), (big,) * 5, Slot(0), Slot(1)), 0)
    node.advance(node.ready())
    node.step(Prepare(N3, Ballot(2, N3), Slot(1)), 0)
    (outbound,) = node.ready().messages
    page = outbound.message
    assert isinstance(page, Promise)
    assert [a.slot for a in page.accepted] == [1, 2] and page.more_from == 3


def test_a_promise_is_recorded_in_the_same_ready_as_the_promise_message() -> None:
    env = group()
    node = env.owners[N2].node
    assert node is not None
    node.step(Prepare(N1, Ballot(5, N1), Slot(1)), env.now_ms)
    ready = node.ready()
    assert PromiseRecord(Ballot(5, N1)) in ready.records
    assert [type(o.message).__name__ for o in ready.messages] == ["Promise"]


def test_an_acceptor_refuses_a_lower_ballot_with_a_nack_naming_the_higher() -> None:
    env = group()
    node = env.owners[N2].node
    assert node is not None
    node.step(Prepare(N3, Ballot(7, N3), Slot(1)), env.now_ms)
    node.advance(node.ready())
    node.step(Accept(N1, Ballot(6, N1), Slot(1), (NOOP_ENTRY,), Slot(0), Slot(1)), env.now_ms)
    (outbound,) = node.ready().messages
    assert outbound.message == Nack(N2, Ballot(6, N1), Ballot(7, N3))


def test_a_vote_at_or_below_the_commit_index_is_only_for_the_chosen_value() -> None:
    env = group(batch="1")
    leader = elect(env)
    leader.propose(b"a")
    env.run("stabilize")
    follower = env.owners[N2].node
    assert follower is not None and follower.commit_index == 1
    higher = Ballot(9, N3)
    follower.step(
        Accept(N3, higher, Slot(1), (Entry(EntryKind.COMMANDS, (b"z",)),), Slot(0), Slot(1)), 0
    )
    ready = follower.ready()
    assert not [o for o in ready.messages if isinstance(o.message, Accepted)]
    assert not [r for r in ready.records if isinstance(r, AcceptedRecord)]


def test_a_restarted_replica_never_reuses_a_ballot() -> None:
    env = group()
    env.run("campaign 2")
    env.run("process-ready 2")
    used = env.owners[N2].node.promised  # type: ignore[union-attr]
    env.run("crash 2")
    env.run("restart 2")
    env.run("campaign 2")
    again = env.owners[N2].node.promised  # type: ignore[union-attr]
    assert used.node == again.node == N2 and again > used


# ---------------------------------------------------------------- elections


def test_a_follower_that_hears_its_leader_refuses_to_support_an_election() -> None:
    env = group()
    elect(env)
    follower = env.owners[N3].node
    assert follower is not None
    follower.step(ProbeRequest(N2, 1, Slot(0)), env.now_ms)
    (outbound,) = follower.ready().messages
    assert isinstance(outbound.message, ProbeReply) and not outbound.message.granted


class _EdgeRandom:
    """A random source that always answers the lowest (or highest) value allowed."""

    def __init__(self, highest: bool) -> None:
        self.highest = highest

    def randrange(self, start: int, stop: int) -> int:
        return stop - 1 if self.highest else start


def _timing_node(rng: object) -> PaxosNode:
    return PaxosNode(
        node_id=N1,
        options=PaxosOptions(heartbeat_interval_ms=10, election_timeout_ms=100, lease_ms=50),
        rng=rng,  # type: ignore[arg-type]
        now_ms=0,
        snapshot=initial_snapshot_meta((N1, N2, N3)),
    )


def _ms_until_probe(node: PaxosNode, now_ms: int) -> int:
    """Tick a follower every millisecond until it probes for an election."""
    assert node.role == Role.FOLLOWER
    for elapsed in range(1, 10_000):
        node.tick(now_ms + elapsed)
        if node.role == Role.PROBING:
            return elapsed
    raise AssertionError("the follower never probed")


def test_election_timeouts_are_drawn_from_the_injected_randomness() -> None:
    """In [T, 2T): replicas that lose their leader together do not all probe at once."""
    assert _ms_until_probe(_timing_node(_EdgeRandom(highest=False)), 0) == 100
    assert _ms_until_probe(_timing_node(_EdgeRandom(highest=True)), 0) == 199
    seeded = [_ms_until_probe(_timing_node(random.Random(seed)), 0) for seed in range(8)]
    assert all(100 <= ms < 200 for ms in seeded)
    assert len(set(seeded)) > 1, f"different seeds, one timeout: {seeded}"
    again = [_ms_until_probe(_timing_node(random.Random(seed)), 0) for seed in range(8)]
    assert again == seeded, "the same seed must give the same timeouts"


def _preempt(node: PaxosNode, now_ms: int) -> None:
    """Campaign, then hear a NACK naming a higher ballot."""
    assert node.campaign(now_ms)
    ballot = node.promised
    node.step(Nack(N2, ballot, Ballot(ballot.round + 1, N2)), now_ms)
    assert node.role == Role.FOLLOWER


def test_the_election_deadline_backs_off_after_each_preemption_and_resets_on_a_leader() -> None:
    """After k preemptions in a row the extra wait is drawn from [0, T * (2**k - 1)]
    (k at most ``backoff_level_max``); hearing a live leader forgets the back-off."""
    node = _timing_node(_EdgeRandom(highest=True))  # every draw at its maximum
    now, delays = 0, []
    for _ in range(5):
        _preempt(node, now)
        delay = _ms_until_probe(node, now)
        delays.append(delay)
        now += delay
    # 2T - 1 for the timeout itself, plus T, 3T, 7T, then capped at level 3.
    assert delays == [299, 499, 899, 899, 899]

    leader_ballot = Ballot(node.promised.round + 1, N2)
    node.step(Heartbeat(N2, leader_ballot, 1, Slot(0), Slot(1)), now)
    assert node.leader_id == N2
    assert _ms_until_probe(node, now) == 199, "a leader heard: the plain timeout again"
    now += 199
    _preempt(node, now)
    assert _ms_until_probe(node, now) == 299, "the back-off starts again from level 1"


def test_the_back_off_is_randomised_too() -> None:
    """Two candidates preempted together do not retry in lockstep."""
    delays = set()
    for seed in range(8):
        node = _timing_node(random.Random(seed))
        _preempt(node, 0)
        _preempt(node, 0)  # level 2: extra wait in [0, 3T]
        delays.add(_ms_until_probe(node, 0))
    assert all(100 <= ms < 200 + 300 for ms in delays)
    assert len(delays) > 1


def test_a_leader_that_loses_its_quorum_steps_down_within_an_election_timeout() -> None:
    env = group()
    leader = elect(env)
    env.run("partition 1 2,3")
    for _ in range(11):
        env.run("tick 10 1")
        env.run("stabilize 1")
    assert leader.role == Role.FOLLOWER


def test_time_must_not_go_backwards() -> None:
    node = lone_node()
    node.tick(10)
    with pytest.raises(PaxosInvariantError):
        node.tick(5)


# ---------------------------------------------------------------- reads


def test_reads_are_bounded() -> None:
    env = group()
    leader = elect(env)
    leader._options = PaxosOptions(reads_pending_max=2)
    assert leader.request_read(ReadId(1), env.now_ms) == ReadResult.OK
    assert leader.request_read(ReadId(2), env.now_ms) == ReadResult.OK
    assert leader.request_read(ReadId(3), env.now_ms) == ReadResult.BUSY


def test_a_read_index_read_waits_for_a_quorum_of_heartbeat_acks() -> None:
    env = group()
    leader = elect(env)
    leader.request_read(ReadId(1), env.now_ms)
    first = env.run("process-ready 1")
    assert "Reads:" not in first and "Heartbeat" in first
    assert "Reads: r1@0" in env.run("stabilize")


def test_a_replica_in_lease_mode_waits_out_a_lease_after_starting() -> None:
    node = lone_node(read_mode=ReadMode.LEASE, lease_ms=100)
    assert not node.campaign(50)
    assert node.campaign(100)
    assert not node.lease_valid(100), "a lease needs a quorum's acks first"


# ---------------------------------------------------------------- recovery and snapshots


def test_recovery_from_records_and_from_compacted_records_agree() -> None:
    env = group(batch="1")
    leader = elect(env)
    for command in (b"a", b"b", b"c"):
        leader.propose(command)
        env.run("stabilize")
    owner = env.owners[N2]
    options = env.options
    rebuilt = PaxosNode(
        node_id=N2,
        options=options,
        rng=random.Random(2),
        now_ms=env.now_ms,
        snapshot=owner.snapshot,
        records=owner.records,
    )
    node = owner.node
    assert node is not None
    compacted = node.compacted_records()
    assert compacted is not None
    from_compacted = PaxosNode(
        node_id=N2,
        options=options,
        rng=random.Random(2),
        now_ms=env.now_ms,
        snapshot=owner.snapshot,
        records=compacted,
    )
    for other in (rebuilt, from_compacted):
        assert other.promised == node.promised
        assert other.commit_index == node.commit_index == 3
        assert [v for _, v in other._log.items_from(0)] == [v for _, v in node._log.items_from(0)]
    assert len(compacted) < len(owner.records)


def test_compaction_is_refused_while_a_ready_is_outstanding() -> None:
    env = group()
    leader = elect(env)
    leader.propose(b"x")
    ready = leader.ready()
    assert leader.compacted_records() is None
    leader.advance(ready)
    assert leader.compacted_records() is not None


def test_a_snapshot_drops_the_log_but_keeps_the_retained_tail() -> None:
    env = group(batch="1", retain="2")
    leader = elect(env)
    for command in (b"a", b"b", b"c", b"d", b"e"):
        leader.propose(command)
    env.run("stabilize")
    meta = leader.snapshot_meta(Slot(5))
    leader.snapshot_saved(meta, 10)
    assert leader.status().log_first_slot == 4
    assert leader.status().snapshot_index == 5


# ---------------------------------------------------------------- membership


def test_membership_changes_are_validated() -> None:
    env = group(window="2")
    leader = elect(env)

    def change(kind: MembershipChangeKind, node: int, old: int | None = None) -> MembershipResult:
        old_node = NodeId(old) if old is not None else None
        return leader.change_membership(MembershipChange(kind, NodeId(node), old_node))

    assert change(MembershipChangeKind.PROMOTE, 7) == MembershipResult.UNKNOWN_NODE
    assert change(MembershipChangeKind.ADD_LEARNER, 2) == MembershipResult.ALREADY_MEMBER
    assert change(MembershipChangeKind.REMOVE, 9) == MembershipResult.UNKNOWN_NODE
    assert change(MembershipChangeKind.ADD_LEARNER, 4) == MembershipResult.OK
    assert change(MembershipChangeKind.ADD_LEARNER, 5) == MembershipResult.CHANGE_IN_PROGRESS
    env.run("stabilize")
    assert change(MembershipChangeKind.REMOVE, 3) == MembershipResult.OK
    env.run("propose 1 x")
    env.run("stabilize")
    assert leader.membership() == Membership(voters=(N1, N2), learners=(NodeId(4),), retired=(N3,))
    assert change(MembershipChangeKind.ADD_LEARNER, 3) == MembershipResult.ID_RETIRED


def test_a_lagging_learner_is_not_promoted() -> None:
    env = group(window="2", batch="1")
    leader = elect(env)
    leader.change_membership(MembershipChange(MembershipChangeKind.ADD_LEARNER, NodeId(4)))
    env.run("process-ready 1")
    env.run("deliver-msgs to=4 drop")
    env.run("stabilize 1 2 3")
    for index in range(8):
        leader.propose(b"c%d" % index)
        env.run("stabilize 1 2 3")
    result = leader.change_membership(MembershipChange(MembershipChangeKind.PROMOTE, NodeId(4)))
    assert result == MembershipResult.LEARNER_BEHIND


def test_the_last_voter_cannot_be_removed() -> None:
    env = InteractionEnv()
    env.run("add-nodes 1")
    leader = elect(env)
    result = leader.change_membership(MembershipChange(MembershipChangeKind.REMOVE, N1))
    assert result == MembershipResult.LAST_VOTER


# ---------------------------------------------------------------- value types


def test_options_reject_inconsistent_settings() -> None:
    with pytest.raises(PaxosInvariantError):
        PaxosOptions(lease_ms=500, election_timeout_ms=500)
    with pytest.raises(PaxosInvariantError):
        PaxosOptions(heartbeat_interval_ms=100, election_timeout_ms=150)
    with pytest.raises(PaxosInvariantError):
        PaxosOptions(commit_delay_ms=-1)
    with pytest.raises(PaxosInvariantError):
        PaxosOptions(catchup_bytes_max=2 << 20)


def test_the_leader_lease_is_shortened_by_the_drift_bound() -> None:
    options = PaxosOptions(lease_ms=1000, election_timeout_ms=2000, clock_drift_ppm_max=10_000)
    assert options.lease_leader_ms == 1000 * 990_000 // 1_010_000 == 980


def test_entries_and_memberships_refuse_inconsistent_contents() -> None:
    with pytest.raises(PaxosInvariantError):
        Entry(EntryKind.NOOP, commands=(b"x",))
    with pytest.raises(PaxosInvariantError):
        Entry(EntryKind.MEMBERSHIP)
    with pytest.raises(PaxosInvariantError):
        Membership(voters=(N1, N2), learners=(N2,))
    assert Ballot(2, N1) > Ballot(1, N3) > Ballot(1, N2)
