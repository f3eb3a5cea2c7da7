"""Benchmark of the Multi-Paxos core: throughput per CPU-second and messages per command.

A three-replica group runs in one process with an owner loop like the simulation's but
without delays: every Ready is persisted (in memory), its messages delivered, and
``advance`` called. Numbers are CPU seconds of this process (``time.process_time``), so
they measure the core's own cost and not the machine's load.

* batch 1 / 16 / 256, one batch in flight: each round proposes exactly one batch and
  delivers messages until nothing moves (the clock stands still, so no heartbeat fires).
  Messages per committed command is then the protocol's cost on the critical path,
  divided by the commands in the slot: with thrifty Accepts (the default) an Accept to
  the one follower that completes a quorum of three, and its Accepted; the other
  follower's copy and the commit notices ride on later Accepts and heartbeats.
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
from dataclasses import dataclass

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


@dataclass
class Group:
    nodes: dict[NodeId, PaxosNode]
    leader: PaxosNode
    inbox: deque[Outbound]
    messages: int = 0
    fsyncs: int = 0
    committed_commands: int = 0


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
    group.messages = group.fsyncs = group.committed_commands = 0
    return group


def gating_fsync(ready: Ready) -> int:
    """1 if the Ready's messages must wait for an fsync: it records a promise, a vote or
    a learned value (a commit index alone is only a recovery hint)."""
    return int(any(type(r) is not CommitRecord for r in ready.records))


def pump(group: Group, wire: Callable[[Message], Message]) -> None:
    """Handle Readies and deliver messages until nothing moves."""
    leader_id = group.leader.node_id
    while True:
        moved = False
        for node in group.nodes.values():
            while node.has_ready():
                ready = node.ready()
                group.fsyncs += gating_fsync(ready)
                group.messages += len(ready.messages)
                group.inbox.extend(ready.messages)
                if node.node_id == leader_id:
                    group.committed_commands += sum(len(c.commands) for c in ready.committed)
                node.advance(ready)
                moved = True
        while group.inbox:
            outbound = group.inbox.popleft()
            group.nodes[outbound.to].step(wire(outbound.message), 0)
            moved = True
        if not moved:
            return


def one_batch_in_flight(batch: int, rounds: int) -> tuple[float, float, float]:
    """Returns (commands per CPU second, messages per command, fsyncs per command)."""
    group = make_group(PaxosOptions(batch_commands_max=batch, window_slots=64))
    started = time.process_time()
    for _ in range(rounds):
        for _ in range(batch):
            group.leader.propose(COMMAND)
        pump(group, lambda m: m)
    elapsed = time.process_time() - started
    done = group.committed_commands
    assert done == rounds * batch
    return done / elapsed, group.messages / done, group.fsyncs / done


def pipelined(commands: int, wire: Callable[[Message], Message]) -> tuple[float, float]:
    """Keep the queue full; returns (commands per CPU second, messages per command)."""
    group = make_group(PaxosOptions(batch_commands_max=256, window_slots=64))
    started = time.process_time()
    submitted = 0
    while group.committed_commands < commands:
        while submitted < commands and submitted - group.committed_commands < 64 * 256:
            group.leader.propose(COMMAND)
            submitted += 1
        # One Ready per replica per turn: a slot is batched while the previous ones
        # are still being voted on, as in a real owner overlapping fsyncs.
        for node in group.nodes.values():
            if node.has_ready():
                ready = node.ready()
                group.fsyncs += gating_fsync(ready)
                group.messages += len(ready.messages)
                group.inbox.extend(ready.messages)
                if node is group.leader:
                    group.committed_commands += sum(len(c.commands) for c in ready.committed)
                node.advance(ready)
        while group.inbox:
            outbound = group.inbox.popleft()
            group.nodes[outbound.to].step(wire(outbound.message), 0)
    elapsed = time.process_time() - started
    return group.committed_commands / elapsed, group.messages / group.committed_commands


def main() -> None:
    print("Multi-Paxos core, 3 replicas, 64-byte commands, CPU time of this process")
    print("fsyncs/command: fsyncs that messages wait for, summed over the three replicas")
    print(f"{'batch':>6} {'commands/CPU-s':>15} {'messages/command':>17} {'fsyncs/command':>15}")
    for batch, rounds in ((1, 3_000), (16, 600), (256, 60)):
        rate, per_command, fsyncs = one_batch_in_flight(batch, rounds)
        print(f"{batch:>6} {rate:>15,.0f} {per_command:>17.3f} {fsyncs:>15.4f}")
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
