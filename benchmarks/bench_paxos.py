"""Benchmark of the Multi-Paxos core: throughput per CPU-second and messages per command.

A three-replica group runs in one process with an owner loop like the simulation's but
without network delays: every Ready is persisted (in memory), its messages delivered,
and ``advance`` called. Numbers are CPU seconds of this process
(``time.process_time``), so they measure the core's own cost and not the machine's load.

Time moves as it does for a metaserver: the shared clock advances ``ROUND_MS`` per
round (about a loopback round trip plus a follower's fsync), and every replica ticks
each ``heartbeat_interval_ms``, so heartbeats, commit news that found no Accept to ride
on, and the slots a thrifty leader held back from the lazy follower all flow and are
counted. A run ends only when all three replicas have applied every command: the
counts include what the third replica costs, not only the quorum's critical path.

* batch 1 / 16 / 256, one batch in flight: each round proposes exactly one batch and
  delivers messages until nothing moves; with thrifty Accepts on (the default) and off.
* pipelined: the leader's queue is kept full, many slots are in flight (window 64),
  batches of up to 256 commands: the throughput an owner can hope for from the core.
* the same, with every message encoded and decoded by msgpack through the wire codec,
  as the metaserver does.

Run: ``python -m benchmarks.bench_paxos``.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from metaserver.paxos import (
    Message,
    NodeId,
    Outbound,
    PaxosNode,
    PaxosOptions,
    Ready,
    Role,
    initial_snapshot_meta,
)
from metaserver.paxos.records import CommitRecord

COMMAND = b"x" * 64
"""A namespace command is about this big once encoded."""
ROUND_MS = 1
"""Simulated time one round takes: a proposal, its Accepts, votes and fsyncs."""
DRAIN_MS_MAX = 10_000
"""A run that has not reached every replica this long after its last proposal is broken."""


@dataclass
class Group:
    nodes: dict[NodeId, PaxosNode]
    leader: PaxosNode
    inbox: deque[Outbound]
    now_ms: int = 0
    next_tick_ms: int = 0
    messages: int = 0
    fsyncs: int = 0
    applied_commands: dict[NodeId, int] = field(default_factory=dict)

    @property
    def leader_committed(self) -> int:
        return self.applied_commands[self.leader.node_id]

    @property
    def everywhere_applied(self) -> int:
        return min(self.applied_commands.values())


def make_group(options: PaxosOptions) -> Group:
    voters = (NodeId(1), NodeId(2), NodeId(3))
    nodes = {
        n: PaxosNode(
            node_id=n,
            options=options,
            rng=random.Random(n),
            now_ms=0,
            snapshot=initial_snapshot_meta(voters),
        )
        for n in voters
    }
    group = Group(nodes, nodes[voters[0]], deque())
    group.leader.campaign(0)
    pump(group, lambda m: m)
    assert group.leader.role == Role.LEADER
    group.next_tick_ms = options.heartbeat_interval_ms
    group.messages = group.fsyncs = 0
    group.applied_commands = dict.fromkeys(voters, 0)
    return group


def gating_fsync(ready: Ready) -> int:
    """1 if the Ready's messages must wait for an fsync: it records a promise, a vote or
    a learned value (a commit index alone is only a recovery hint)."""
    return int(any(type(r) is not CommitRecord for r in ready.records))


def handle(group: Group, node: PaxosNode) -> None:
    """Take one Ready of ``node`` and do what it asks."""
    ready = node.ready()
    group.fsyncs += gating_fsync(ready)
    group.messages += len(ready.messages)
    group.inbox.extend(ready.messages)
    if ready.committed:
        applied = sum(len(c.commands) for c in ready.committed)
        group.applied_commands[node.node_id] = group.applied_commands.get(node.node_id, 0) + applied
    node.advance(ready)


def deliver(group: Group, wire: Callable[[Message], Message]) -> bool:
    moved = bool(group.inbox)
    while group.inbox:
        outbound = group.inbox.popleft()
        group.nodes[outbound.to].step(wire(outbound.message), group.now_ms)
    return moved


def pump(group: Group, wire: Callable[[Message], Message]) -> None:
    """Handle Readies and deliver messages until nothing moves."""
    while True:
        moved = False
        for node in group.nodes.values():
            while node.has_ready():
                handle(group, node)
                moved = True
        if not deliver(group, wire) and not moved:
            return


def pass_time(group: Group, ms: int) -> None:
    """Move the clock; every replica ticks each heartbeat interval, as an owner does."""
    group.now_ms += ms
    while group.now_ms >= group.next_tick_ms:
        for node in group.nodes.values():
            node.tick(group.now_ms)
        group.next_tick_ms += group.leader.options.heartbeat_interval_ms


def drain(group: Group, commands: int, wire: Callable[[Message], Message]) -> None:
    """Let time pass until every replica has applied ``commands`` commands."""
    deadline_ms = group.now_ms + DRAIN_MS_MAX
    while group.everywhere_applied < commands:
        assert group.now_ms < deadline_ms, f"stuck: {group.applied_commands} of {commands}"
        pass_time(group, ROUND_MS)
        pump(group, wire)
    assert group.leader.role == Role.LEADER, "the leader must survive the benchmark"


def one_batch_in_flight(batch: int, rounds: int, thrifty: bool) -> tuple[float, float, float]:
    """Returns (commands per CPU second, messages per command, fsyncs per command)."""
    options = PaxosOptions(batch_commands_max=batch, window_slots=64, thrifty=thrifty)
    group = make_group(options)
    started = time.process_time()
    for _ in range(rounds):
        for _ in range(batch):
            group.leader.propose(COMMAND)
        pump(group, lambda m: m)
        pass_time(group, ROUND_MS)
    done = rounds * batch
    drain(group, done, lambda m: m)
    elapsed = time.process_time() - started
    assert set(group.applied_commands.values()) == {done}
    return done / elapsed, group.messages / done, group.fsyncs / done


def pipelined(commands: int, wire: Callable[[Message], Message]) -> tuple[float, float]:
    """Keep the queue full; returns (commands per CPU second, messages per command)."""
    group = make_group(PaxosOptions(batch_commands_max=256, window_slots=64))
    started = time.process_time()
    submitted = 0
    while group.leader_committed < commands:
        while submitted < commands and submitted - group.leader_committed < 64 * 256:
            group.leader.propose(COMMAND)
            submitted += 1
        # One Ready per replica per turn: a slot is batched while the previous ones
        # are still being voted on, as in a real owner overlapping fsyncs.
        for node in group.nodes.values():
            if node.has_ready():
                handle(group, node)
        deliver(group, wire)
        pass_time(group, ROUND_MS)
    drain(group, commands, wire)
    elapsed = time.process_time() - started
    return commands / elapsed, group.messages / commands


def main() -> None:
    print("Multi-Paxos core, 3 replicas, 64-byte commands, CPU time of this process")
    print(
        f"clock: {ROUND_MS} ms per round, ticks every heartbeat interval; "
        "counted until all 3 replicas applied every command"
    )
    print("fsyncs/command: fsyncs that messages wait for, summed over the three replicas")
    print(
        f"{'thrifty':>7} {'batch':>6} {'commands/CPU-s':>15} "
        f"{'messages/command':>17} {'fsyncs/command':>15}"
    )
    for thrifty in (True, False):
        for batch, rounds in ((1, 3_000), (16, 600), (256, 60)):
            rate, per_command, fsyncs = one_batch_in_flight(batch, rounds, thrifty)
            label = "on" if thrifty else "off"
            print(f"{label:>7} {batch:>6} {rate:>15,.0f} {per_command:>17.3f} {fsyncs:>15.4f}")
    rate, per_command = pipelined(200_000, lambda m: m)
    print(
        f"pipelined (window 64, batch <= 256): {rate:,.0f} commands/CPU-s, "
        f"{per_command:.4f} messages/command"
    )
    from tests.sim.codec import decode_message, encode_message

    rate, per_command = pipelined(200_000, lambda m: decode_message(encode_message(m)))
    print(f"pipelined, every message through msgpack + wire.schema: {rate:,.0f} commands/CPU-s")


if __name__ == "__main__":
    main()
