"""A deterministic, seeded simulation of a Paxos group, its clients, and their faults.

Everything -- replicas, clients, network, disks, clocks, an operator changing the
membership -- runs in one process, driven by one event queue ordered by simulated real
time (microseconds). Each replica owns a :class:`PaxosNode` and runs a Ready loop:
install snapshots, append records, fsync (a delay during which a crash loses them),
then send, apply, answer reads, ``advance``. On half the seeds
(``SimConfig.production_ordering``) it runs the loop as the metaserver does, with
every relaxation the Ready contract allows: the leader's requests leave and chosen
slots are applied before the fsync, and a lone commit-index record is not waited for.

Faults: messages dropped, duplicated, delayed and reordered; partitions and heals
between replicas; crashes (unsynced records lost, the tail possibly torn) and restarts;
a flipped bit in a synced record (the replica refuses to start and the operator
replaces it); clocks that run fast or slow within the drift bound.

After every event the :class:`SafetyChecker` runs; at the end the client history is
checked for linearizability and the group for liveness after everything healed.
Same seed, same run: every failure names its seed and replays from it alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metaserver.paxos import (
    CommittedEntry,
    EntryKind,
    LeaderChanged,
    Membership,
    MembershipChange,
    MembershipChangeKind,
    MembershipCommitted,
    MembershipResult,
    NodeId,
    PaxosNode,
    PaxosOptions,
    ProposalsDropped,
    ProposeResult,
    ReadId,
    ReadMode,
    ReadResult,
    ReadsFailed,
    Ready,
    Record,
    Role,
    SnapshotInstall,
    StepDownReason,
    SteppedDown,
    initial_snapshot_meta,
)
from metaserver.paxos.messages import Accept, Commit, Heartbeat
from metaserver.paxos.records import AcceptedRecord, ChosenRecord, CommitRecord, PromiseRecord
from metaserver.paxos.types import Ballot
from tests.lincheck import Operation, check, kv_model
from tests.sim.checker import SafetyChecker, SimViolation
from tests.sim.codec import decode_message, encode_message
from tests.sim.disk import DiskCorruption, SimDisk
from tests.sim.kv import KvState, PutCommand

REQUIRED_COVERAGE = (
    "leader_change",
    "leader_preempted",
    "snapshot_taken",
    "restart_from_snapshot",
    "catchup_from_snapshot",
    "membership_change",
    "torn_tail_cut",
    "corruption_detected",
    "lease_reads",
    "read_index_reads",
    "sent_before_fsync",
    "applied_before_fsync",
)
"""Events that some seed of every batch must reach, or the batch fails. Counted but
not required: ``hole_filled_noop`` (a new leader fills a hole below a recovered vote
with a no-op), which only 3 runs of seeds 0..449 reach; ``scripts/hole_filled_with_noop.txt``
shows it deterministically."""
COVERAGE_SEEDS_MIN = 50
"""Coverage is judged only on a batch of at least this many seeds: a few seeds (the
replay of one failure, a quick ``make sim SEEDS=5``) cannot be expected to reach all."""


class SimFailure(AssertionError):
    """A run failed: a safety check, linearizability, liveness, or a core invariant."""

    def __init__(self, seed: int, check: str, detail: str) -> None:
        super().__init__(
            f"seed {seed} failed [{check}]: {detail}\n"
            f"replay: python -m tests.sim.run_seeds --seeds 1 --start {seed}"
        )
        self.seed = seed
        self.check = check
        self.detail = detail


@dataclass(frozen=True)
class SimConfig:
    """Everything a run depends on, drawn from the seed."""

    seed: int
    replicas: int
    options: PaxosOptions
    fault_ms: int
    quiet_ms: int
    clients: int
    keys: int
    drop_rate: float
    dup_rate: float
    delay_us_min: int
    delay_us_max: int
    long_delay_rate: float
    fsync_us_max: int
    crash_count: int
    partition_count: int
    loss_burst_count: int
    membership_changes: int
    forced_elections: int
    bitflip: bool
    snapshot_every_slots: int
    drift_ppm_max: int
    tick_us: int = 5_000
    production_ordering: bool = False
    """Run the Ready loop as ``metaserver/replica.py`` does, using every relaxation the
    Ready contract allows (see ``Simulation._pump``), instead of fsync-before-anything."""

    @staticmethod
    def from_seed(seed: int) -> SimConfig:
        rng = random.Random(seed * 7919 + 1)
        read_mode = ReadMode.LEASE if rng.random() < 0.5 else ReadMode.READ_INDEX
        drift_ppm_max = rng.choice((0, 1_000, 20_000, 50_000, 90_000))
        options = PaxosOptions(
            heartbeat_interval_ms=20,
            election_timeout_ms=150,
            read_mode=read_mode,
            lease_ms=rng.choice((100, 140)),  # 140: just under the election timeout
            clock_drift_ppm_max=drift_ppm_max,
            window_slots=rng.choice((4, 16, 64)),
            batch_commands_max=rng.choice((1, 4, 64)),
            promise_entries_max=rng.choice((2, 64)),
            catchup_entries_max=rng.choice((3, 100)),
            snapshot_chunk_bytes=rng.choice((64, 1024)),
            log_retain_slots=rng.choice((0, 5, 50)),
            learner_lag_slots_max=8,
        )
        config = SimConfig(
            seed=seed,
            replicas=rng.choice((3, 3, 5)),
            options=options,
            fault_ms=rng.randrange(2_000, 4_000),
            quiet_ms=2_500,
            clients=rng.randrange(3, 7),
            keys=rng.randrange(1, 4),
            drop_rate=rng.choice((0.0, 0.01, 0.05)),
            dup_rate=rng.choice((0.0, 0.02)),
            delay_us_min=rng.randrange(100, 1_000),
            delay_us_max=rng.choice((1_000, rng.randrange(2_000, 15_000))),
            long_delay_rate=rng.choice((0.0, 0.01)),
            fsync_us_max=rng.choice((200, 2_000)),
            crash_count=rng.randrange(0, 5),
            partition_count=rng.randrange(0, 4),
            loss_burst_count=rng.randrange(0, 2),
            membership_changes=rng.choice((0, 0, 1, 2)),
            forced_elections=rng.choice((0, 1, 2)),
            bitflip=rng.random() < 0.15,
            snapshot_every_slots=rng.choice((8, 20, 60)),
            drift_ppm_max=drift_ppm_max,
        )
        # Drawn last so that every other draw of a seed stays what it was before these
        # options existed. Commit delay: 0 (news at once), shorter than a tick, or a
        # whole heartbeat interval (news only with Accepts and Heartbeats).
        commit_delay_ms = rng.choice((0, 3, 20))
        thrifty = rng.random() < 0.5
        production_ordering = rng.random() < 0.5
        return dataclasses.replace(
            config,
            options=dataclasses.replace(options, commit_delay_ms=commit_delay_ms, thrifty=thrifty),
            production_ordering=production_ordering,
        )


@dataclass
class SimResult:
    seed: int
    counters: dict[str, int]
    operations: int
    events: int
    sim_ms: int
    trace_digest: str
    """Digest of every message sent (when, from, to, bytes) and every slot applied
    (where, which slot, the state after): equal digests, the same run."""


# ---------------------------------------------------------------- client protocol


@dataclass(frozen=True)
class ClientRequest:
    client: int
    op_id: int
    op: tuple[Any, ...]


@dataclass(frozen=True)
class ClientReply:
    op_id: int
    status: str
    """"ok", "not_leader" (nothing was proposed: retry elsewhere) or "retry"."""
    result: Any = None
    leader_hint: NodeId | None = None


# ---------------------------------------------------------------- the simulation


class Host:
    """One replica: a disk, a clock, and (while running) a node and its state machine."""

    def __init__(self, node_id: NodeId, drift_ppm: int, offset_ms: int) -> None:
        self.node_id = node_id
        self.drift_ppm = drift_ppm
        self.offset_ms = offset_ms
        self.disk = SimDisk()
        self.node: PaxosNode | None = None
        self.kv = KvState()
        self.alive = False
        self.corrupt = False
        self.retired = False
        self.incarnation = 0
        self.busy = False
        self.was_leader = False
        self.crash_during_write = False
        self.pending_writes: set[tuple[int, int]] = set()
        self.durable_ballot = Ballot(0, NodeId(0))
        """Highest ballot of a promise or vote on this disk (production ordering)."""
        self.deferred_commit: CommitRecord | None = None
        """A commit-index record waiting to ride with the next records (production)."""
        self.pending_reads: dict[int, tuple[int, int, str]] = {}
        self.next_read_id = 1

    def local_ms(self, now_us: int) -> int:
        return self.offset_ms + (now_us * (1_000_000 + self.drift_ppm)) // 1_000_000_000


@dataclass
class Client:
    client_id: int
    rng: random.Random
    next_op_id: int = 1
    op_id: int | None = None
    op: tuple[Any, ...] | None = None
    invoke_us: int = 0
    target: NodeId | None = None
    deadline_us: int = 0
    history: list[Operation] = field(default_factory=list)
    stopped: bool = False


class Simulation:
    def __init__(self, config: SimConfig, disabled_checks: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.seed = config.seed
        self.options = config.options
        self.rng_net = random.Random(config.seed * 31 + 2)
        self.rng_fault = random.Random(config.seed * 37 + 3)
        self.rng_disk = random.Random(config.seed * 41 + 4)
        self.now_us = 0
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._sequence = 0
        self.events = 0
        self.counters: dict[str, int] = {}
        self.trace = hashlib.blake2b(digest_size=16)
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.drop_rate = config.drop_rate
        founders = tuple(NodeId(i) for i in range(1, config.replicas + 1))
        self.founders = founders
        self.checker = SafetyChecker(founders, config.options.window_slots, disabled_checks)
        self.hosts: dict[NodeId, Host] = {}
        self.next_node_id = config.replicas + 1
        for node_id in founders:
            host = self._new_host(node_id)
            host.disk.save_snapshot(initial_snapshot_meta(founders), b"")
        self.clients = [
            Client(1000 + i, random.Random(config.seed * 43 + i)) for i in range(config.clients)
        ]
        self.end_us = (config.fault_ms + config.quiet_ms) * 1_000
        self.fault_end_us = config.fault_ms * 1_000
        self.stable_us = self.fault_end_us
        self.leaders_seen: list[NodeId] = []
        self.operator_busy = False
        self.replacements_needed: list[NodeId] = []

    # ------------------------------------------------------------ event queue

    def at(self, delay_us: int, action: Callable[[], None]) -> None:
        self._sequence += 1
        heapq.heappush(self._queue, (self.now_us + max(0, delay_us), self._sequence, action))

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def run(self) -> SimResult:
        try:
            self._schedule_start()
            while self._queue:
                when, _, action = heapq.heappop(self._queue)
                if when > self.end_us:
                    break
                self.now_us = when
                action()
                self.events += 1
                self._after_event()
            self._final_checks()
        except SimViolation as violation:
            raise SimFailure(self.seed, violation.check, violation.detail) from violation
        except SimFailure:
            raise
        except Exception as error:  # a core invariant or a crash of the core
            raise SimFailure(self.seed, type(error).__name__, repr(error)) from error
        return SimResult(
            seed=self.seed,
            counters=dict(self.counters),
            operations=sum(len(c.history) for c in self.clients),
            events=self.events,
            sim_ms=self.now_us // 1000,
            trace_digest=self.trace.hexdigest(),
        )

    def _after_event(self) -> None:
        holders = [
            host.node_id
            for host in self.hosts.values()
            if host.alive
            and host.node is not None
            and host.node.lease_valid(host.local_ms(self.now_us))
        ]
        self.checker.on_leases(holders, self.now_us)

    # ------------------------------------------------------------ hosts

    def _new_host(self, node_id: NodeId) -> Host:
        drift = 0
        bound = self.config.drift_ppm_max
        if bound:
            # Half the time at an extreme of the bound, where lease margins are tightest.
            if self.rng_fault.random() < 0.5:
                drift = self.rng_fault.choice((-bound, bound))
            else:
                drift = self.rng_fault.randrange(-bound, bound + 1)
        host = Host(node_id, drift, self.rng_fault.randrange(0, 10_000_000))
        self.hosts[node_id] = host
        return host

    def _start(self, host: Host) -> None:
        """Boot a replica from its disk (first start or restart)."""
        if host.alive or host.retired or host.corrupt:
            return
        try:
            loaded = host.disk.load()
        except DiskCorruption:
            self.count("corruption_detected")
            host.corrupt = True
            self.replacements_needed.append(host.node_id)
            return
        if loaded.torn_tail:
            self.count("torn_tail_cut")
        self.checker.on_disk_loaded(host.node_id, loaded.records)
        snapshot = loaded.snapshot
        host.kv = KvState.restore(loaded.snapshot_data)
        if snapshot is not None:
            assert host.kv.index == snapshot.index
            self.checker.on_snapshot_saved(host.node_id, snapshot.index)
            if snapshot.index > 0 and host.incarnation > 0:
                self.count("restart_from_snapshot")
        host.incarnation += 1
        host.node = PaxosNode(
            node_id=host.node_id,
            options=self.options,
            rng=random.Random(self.seed * 1_000_003 + host.node_id * 101 + host.incarnation),
            now_ms=host.local_ms(self.now_us),
            snapshot=snapshot,
            snapshot_size_bytes=len(loaded.snapshot_data),
            records=loaded.records,
        )
        self.checker.on_restart(host.node_id, host.node.promised)
        host.durable_ballot = host.node.promised
        host.deferred_commit = None
        host.alive = True
        host.busy = False
        host.was_leader = False
        host.pending_writes.clear()
        host.pending_reads.clear()
        self._tick_loop(host, host.incarnation)
        self._pump(host)

    def _crash(self, host: Host) -> None:
        if not host.alive:
            return
        self.count("crash")
        host.alive = False
        host.node = None
        host.busy = False
        host.incarnation += 1
        host.disk.crash(self.rng_disk)

    def _tick_loop(self, host: Host, incarnation: int) -> None:
        if not host.alive or host.incarnation != incarnation:
            return
        assert host.node is not None
        host.node.tick(host.local_ms(self.now_us))
        self._pump(host)
        jitter = self.rng_net.randrange(0, self.config.tick_us // 2 + 1)
        self.at(self.config.tick_us + jitter, lambda: self._tick_loop(host, incarnation))

    def _pump(self, host: Host) -> None:
        """The owner's Ready loop, one Ready at a time.

        By default strictly in the documented order: fsync, then send, then apply. With
        ``production_ordering`` (half the seeds) as ``metaserver/replica.py`` does it,
        using the relaxations of :mod:`metaserver.paxos.ready`: a Ready whose only
        record is a commit index neither waits nor fsyncs (the record rides with the
        next records); the leader's Accept, Commit and Heartbeat at a ballot already
        durable leave before the fsync; and committed slots (chosen: a quorum holds
        them) are applied before it. Promises, votes and ``advance()`` still wait.
        """
        production = self.config.production_ordering
        while host.alive and not host.busy:
            node = host.node
            assert node is not None
            if not node.has_ready():
                return
            ready = node.ready()
            if ready.snapshot_install is not None:
                self._install(host, ready.snapshot_install)
            records = ready.records
            if production and records:
                last = records[-1]
                if len(records) == 1 and isinstance(last, CommitRecord):
                    host.deferred_commit = last
                    records = ()
                    self.count("commit_record_deferred")
                elif host.deferred_commit is not None:
                    records = (host.deferred_commit, *records)
                    host.deferred_commit = None
            if records:
                host.disk.append(records)
                host.busy = True
                early: frozenset[int] = frozenset()
                if production:
                    early = self._send_early(host, ready)
                    for entry in ready.committed:
                        self._apply(host, entry)
                        self.count("applied_before_fsync")
                if host.crash_during_write:
                    # Power fails while these records are on their way to the platter.
                    host.crash_during_write = False
                    self.at(self.rng_disk.randrange(0, 20), _bind(self._crash_and_restart, host))
                delay = self.rng_disk.randrange(20, self.config.fsync_us_max + 1)
                self.at(
                    delay, _bind(self._fsync_done, host, host.incarnation, ready, records, early)
                )
                return
            self._complete(host, ready)

    def _send_early(self, host: Host, ready: Ready) -> frozenset[int]:
        """Send what may leave before this Ready's fsync; returns their positions."""
        sent: set[int] = set()
        for position, outbound in enumerate(ready.messages):
            message = outbound.message
            if (
                isinstance(message, Accept | Commit | Heartbeat)
                and message.ballot <= host.durable_ballot
            ):
                self.checker.on_send(host.node_id, message)
                self._send_paxos(host.node_id, outbound.to, encode_message(message))
                self.count("sent_before_fsync")
                sent.add(position)
        return frozenset(sent)

    def _fsync_done(
        self,
        host: Host,
        incarnation: int,
        ready: Ready,
        records: tuple[Record, ...],
        sent_early: frozenset[int],
    ) -> None:
        if not host.alive or host.incarnation != incarnation:
            return
        host.disk.sync()
        self.checker.on_durable(host.node_id, records)
        for record in records:
            if isinstance(record, PromiseRecord | AcceptedRecord):
                host.durable_ballot = max(host.durable_ballot, record.ballot)
        if any(isinstance(r, ChosenRecord) for r in records):
            self.count("catchup_from_log")
        if any(_fills_hole(host.node_id, r) for r in records):
            self.count("hole_filled_noop")
        host.busy = False
        self._complete(host, ready, sent_early, applied=self.config.production_ordering)
        self._pump(host)

    def _complete(
        self,
        host: Host,
        ready: Ready,
        sent_early: frozenset[int] = frozenset(),
        *,
        applied: bool = False,
    ) -> None:
        node = host.node
        assert node is not None
        for position, outbound in enumerate(ready.messages):
            if position in sent_early:
                continue
            self.checker.on_send(host.node_id, outbound.message)
            self._send_paxos(host.node_id, outbound.to, encode_message(outbound.message))
        if not applied:
            for entry in ready.committed:
                self._apply(host, entry)
        for read in ready.reads:
            pending = host.pending_reads.pop(read.read_id, None)
            assert host.kv.index >= read.index, "read released before its index was applied"
            if pending is not None:
                client, op_id, key = pending
                self.count("reads_served")
                self._reply(host.node_id, client, ClientReply(op_id, "ok", host.kv.data.get(key)))
        for snapshot_read in ready.snapshot_reads:
            snapshot = host.disk.snapshot
            data: bytes | None = None
            if snapshot is not None and snapshot.index == snapshot_read.index:
                start = snapshot_read.offset
                data = host.disk.snapshot_data[start : start + snapshot_read.length]
            node.snapshot_read_done(snapshot_read, data)
        for notice in ready.notices:
            self._on_notice(host, notice)
        node.advance(ready)
        self._maybe_snapshot(host)

    def _apply(self, host: Host, entry: CommittedEntry) -> None:
        commands = host.kv.apply(entry)
        value = entry.entry()
        self.trace.update(b"a%d:%d:%d:" % (self.now_us, host.node_id, entry.slot) + host.kv.digest)
        self.checker.on_apply(host.node_id, entry.slot, value, host.kv.digest)
        for command in commands:
            key = (command.client, command.op_id)
            if key in host.pending_writes:
                host.pending_writes.discard(key)
                self._reply(host.node_id, command.client, ClientReply(command.op_id, "ok"))

    def _install(self, host: Host, install: SnapshotInstall) -> None:
        kv = KvState.restore(install.data)
        assert kv.index == install.meta.index or (not install.data and install.meta.index == 0)
        self.checker.on_install(host.node_id, install.meta.index, kv.digest)
        host.disk.save_snapshot(install.meta, install.data)
        self.checker.on_snapshot_saved(host.node_id, install.meta.index)
        host.kv = kv
        # A new learner first installs the empty state at slot 0: not a real catch-up.
        self.count("catchup_from_snapshot" if install.meta.index > 0 else "learner_bootstrap")

    def _maybe_snapshot(self, host: Host) -> None:
        node = host.node
        assert node is not None
        snapshot = host.disk.snapshot
        base = snapshot.index if snapshot is not None else 0
        if (
            host.kv.index != node.applied_index
            or host.kv.index - base < self.config.snapshot_every_slots
        ):
            return
        meta = node.snapshot_meta(node.applied_index)
        data = host.kv.encode()
        host.disk.save_snapshot(meta, data)
        self.checker.on_snapshot_saved(host.node_id, meta.index)
        node.snapshot_saved(meta, len(data))
        records = node.compacted_records()
        if records is not None:
            self.checker.on_disk_rewritten(host.node_id, records)
            host.disk.rewrite(records)
            self.count("log_compacted")
        self.count("snapshot_taken")

    def _on_notice(self, host: Host, notice: object) -> None:
        if isinstance(notice, LeaderChanged):
            if notice.leader is not None and notice.leader == host.node_id:
                host.was_leader = True
                if not self.leaders_seen or self.leaders_seen[-1] != notice.leader:
                    if self.leaders_seen:
                        self.count("leader_change")
                    self.leaders_seen.append(notice.leader)
        elif isinstance(notice, SteppedDown):
            if host.was_leader:
                host.was_leader = False
                if notice.reason in (StepDownReason.PREEMPTED, StepDownReason.HIGHER_BALLOT):
                    self.count("leader_preempted")
                else:
                    self.count(f"leader_step_down_{notice.reason.name.lower()}")
        elif isinstance(notice, ProposalsDropped):
            for raw in notice.commands:
                command = PutCommand.decode(raw)
                key = (command.client, command.op_id)
                if key in host.pending_writes:
                    host.pending_writes.discard(key)
                    self._reply(host.node_id, command.client, ClientReply(command.op_id, "retry"))
        elif isinstance(notice, ReadsFailed):
            for read_id in notice.read_ids:
                pending = host.pending_reads.pop(read_id, None)
                if pending is not None:
                    self._reply(host.node_id, pending[0], ClientReply(pending[1], "not_leader"))
        elif isinstance(notice, MembershipCommitted):
            if host.node is not None and host.node.role == Role.LEADER:
                self.count("membership_change")

    # ------------------------------------------------------------ network

    def _delay_us(self) -> int:
        delay = self.rng_net.randrange(self.config.delay_us_min, self.config.delay_us_max + 1)
        if self.config.long_delay_rate and self.rng_net.random() < self.config.long_delay_rate:
            delay += self.rng_net.randrange(50_000, 300_000)
        return delay

    def _send_paxos(self, src: NodeId, dst: NodeId, data: bytes) -> None:
        self.trace.update(b"m%d:%d:%d:%d:" % (self.now_us, src, dst, len(data)) + data)
        if (src, dst) in self.blocked or self.rng_net.random() < self.drop_rate:
            self.count("messages_dropped")
            return
        copies = 2 if self.rng_net.random() < self.config.dup_rate else 1
        for _ in range(copies):
            self.at(self._delay_us(), lambda: self._deliver_paxos(src, dst, data))
        self.count("messages_sent")

    def _deliver_paxos(self, src: NodeId, dst: NodeId, data: bytes) -> None:
        host = self.hosts.get(dst)
        if host is None or not host.alive or (src, dst) in self.blocked:
            return
        assert host.node is not None
        host.node.step(decode_message(data), host.local_ms(self.now_us))
        self._pump(host)

    def _reply(self, src: NodeId, client_id: int, reply: ClientReply) -> None:
        if self.rng_net.random() < self.drop_rate:
            return
        client = self.clients[client_id - 1000]
        self.at(self._delay_us(), lambda: self._client_receive(client, reply))

    # ------------------------------------------------------------ clients

    def _client_next(self, client: Client) -> None:
        if client.stopped or self.now_us > self.end_us - 500_000:
            client.stopped = True
            return
        key = f"k{client.rng.randrange(self.config.keys)}"
        op_id = client.next_op_id
        client.next_op_id += 1
        if client.rng.random() < 0.5:
            op: tuple[Any, ...] = ("put", key, client.client_id * 1_000_000 + op_id)
        else:
            op = ("get", key)
        client.op_id, client.op, client.invoke_us = op_id, op, self.now_us
        client.deadline_us = self.now_us + 4 * self.options.election_timeout_ms * 1_000
        if client.target is None:
            client.target = NodeId(client.rng.randrange(1, self.config.replicas + 1))
        self._client_send(client)
        incarnation = op_id
        self.at(client.deadline_us - self.now_us, lambda: self._client_timeout(client, incarnation))

    def _client_send(self, client: Client) -> None:
        assert client.op_id is not None and client.op is not None and client.target is not None
        request = ClientRequest(client.client_id, client.op_id, client.op)
        target = client.target
        if self.rng_net.random() < self.drop_rate:
            return
        self.at(self._delay_us(), lambda: self._host_client_request(target, request))

    def _client_receive(self, client: Client, reply: ClientReply) -> None:
        if client.op_id != reply.op_id or client.op is None:
            return
        if reply.status == "ok":
            result = reply.result if client.op[0] == "get" else None
            client.history.append(
                Operation(client.client_id, client.invoke_us, self.now_us, client.op, result)
            )
            client.op_id = client.op = None
            self.at(client.rng.randrange(0, 20_000), lambda: self._client_next(client))
            return
        if reply.leader_hint is not None:
            client.target = reply.leader_hint
        else:
            client.target = self._any_member(client)
        retry_us = client.rng.randrange(1_000, 10_000)
        self.at(retry_us, lambda: self._client_retry(client, reply.op_id))

    def _any_member(self, client: Client) -> NodeId:
        """A client knows the group's members (from redirects and its configuration)."""
        members = sorted(self.checker.latest_membership.voters)
        return NodeId(client.rng.choice(members))

    def _client_retry(self, client: Client, op_id: int) -> None:
        if client.op_id == op_id:
            self._client_send(client)

    def _client_timeout(self, client: Client, op_id: int) -> None:
        if client.op_id != op_id or client.op is None:
            return
        self.count("client_timeouts")
        client.history.append(Operation(client.client_id, client.invoke_us, None, client.op))
        client.op_id = client.op = None
        client.target = self._any_member(client)
        self._client_next(client)

    def _host_client_request(self, node_id: NodeId, request: ClientRequest) -> None:
        host = self.hosts.get(node_id)
        if host is None or not host.alive:
            return
        node = host.node
        assert node is not None
        hint = node.leader_id if node.leader_id != node_id else None
        if request.op[0] == "put":
            key = (request.client, request.op_id)
            if key in host.pending_writes:
                return
            command = PutCommand(request.client, request.op_id, request.op[1], request.op[2])
            result = node.propose(command.encode())
            if result == ProposeResult.OK:
                host.pending_writes.add(key)
            else:
                status = "not_leader" if result == ProposeResult.NOT_LEADER else "retry"
                self._reply(node_id, request.client, ClientReply(request.op_id, status, None, hint))
        else:
            read_id = host.next_read_id
            host.next_read_id += 1
            lease_before = node.lease_valid(host.local_ms(self.now_us))
            outcome = node.request_read(ReadId(read_id), host.local_ms(self.now_us))
            if outcome == ReadResult.OK:
                host.pending_reads[read_id] = (request.client, request.op_id, request.op[1])
                self.count("lease_reads" if lease_before else "read_index_reads")
            else:
                status = "not_leader" if outcome == ReadResult.NOT_LEADER else "retry"
                self._reply(node_id, request.client, ClientReply(request.op_id, status, None, hint))
        self._pump(host)

    # ------------------------------------------------------------ faults

    def _schedule_start(self) -> None:
        for host in list(self.hosts.values()):
            self.at(self.rng_fault.randrange(0, 5_000), lambda h=host: self._start(h))
        for client in self.clients:
            self.at(self.rng_fault.randrange(0, 50_000), lambda c=client: self._client_next(c))
        fault_us = self.fault_end_us
        for _ in range(self.config.crash_count):
            self.at(self.rng_fault.randrange(0, fault_us), self._fault_crash)
        for _ in range(self.config.partition_count):
            self.at(self.rng_fault.randrange(0, fault_us), self._fault_partition)
        for _ in range(self.config.loss_burst_count):
            self.at(self.rng_fault.randrange(0, fault_us), self._fault_loss_burst)
        for _ in range(self.config.forced_elections):
            self.at(self.rng_fault.randrange(0, fault_us), self._fault_forced_election)
        for _ in range(self.config.membership_changes):
            self.at(self.rng_fault.randrange(fault_us // 4, fault_us), self._operator_change)
        self.at(fault_us, self._heal_everything)
        self.at(500_000, self._operator_replace_corrupt)

    def _live_members(self) -> list[Host]:
        return [h for h in self.hosts.values() if not h.retired and not h.corrupt]

    def _fault_crash(self) -> None:
        candidates = [h for h in self._live_members() if h.alive]
        if not candidates:
            return
        host = self.rng_fault.choice(candidates)
        if self.rng_fault.random() < 0.4:
            host.crash_during_write = True
            return
        self._crash_and_restart(host)

    def _crash_and_restart(self, host: Host) -> None:
        if not host.alive:
            return
        if host.busy:
            self.count("crash_during_fsync")
        self._crash(host)
        # One corrupted disk per run: losing more than a minority is beyond any protocol.
        if self.config.bitflip and not self.counters.get("bit_flipped"):
            if self.rng_fault.random() < 0.5 and host.disk.flip_bit(self.rng_fault):
                self.count("bit_flipped")
        downtime = self.rng_fault.randrange(20_000, 1_500_000)
        self.at(downtime, lambda: self._start(host))

    def _fault_partition(self) -> None:
        nodes = [h.node_id for h in self._live_members()]
        self.rng_fault.shuffle(nodes)
        cut = self.rng_fault.randrange(1, len(nodes))
        side_a, side_b = nodes[:cut], nodes[cut:]
        one_way = self.rng_fault.random() < 0.2
        added: list[tuple[NodeId, NodeId]] = []
        for a in side_a:
            for b in side_b:
                for pair in ((a, b),) if one_way else ((a, b), (b, a)):
                    if pair not in self.blocked:
                        self.blocked.add(pair)
                        added.append(pair)
        self.count("partitions")
        duration = self.rng_fault.randrange(50_000, 1_500_000)

        def heal() -> None:
            for pair in added:
                self.blocked.discard(pair)

        self.at(duration, heal)

    def _fault_forced_election(self) -> None:
        """An operator moves leadership: a follower campaigns at once, preempting the
        leader (as ``paxfs admin`` would for maintenance)."""
        candidates = [
            h
            for h in self._live_members()
            if h.alive and h.node is not None and h.node.role != Role.LEADER
        ]
        if candidates:
            host = self.rng_fault.choice(candidates)
            assert host.node is not None
            if host.node.campaign(host.local_ms(self.now_us)):
                self.count("forced_elections")
                self._pump(host)

    def _fault_loss_burst(self) -> None:
        before = self.drop_rate
        self.drop_rate = self.rng_fault.choice((0.2, 0.5))

        def restore() -> None:
            self.drop_rate = before

        self.at(self.rng_fault.randrange(100_000, 800_000), restore)

    def _stable_from(self, when_us: int) -> None:
        """Nothing disturbs the group after ``when_us``: give it a full quiet period."""
        self.stable_us = max(self.stable_us, when_us)
        self.end_us = max(self.end_us, self.stable_us + self.config.quiet_ms * 1_000)

    def _heal_everything(self) -> None:
        self.blocked.clear()
        self.drop_rate = 0.0
        for host in self._live_members():
            if not host.alive:
                self._start(host)

    # ------------------------------------------------------------ operator

    def _leader_host(self) -> Host | None:
        for host in self.hosts.values():
            if host.alive and host.node is not None and host.node.is_leader_ready():
                return host
        return None

    def _new_voters_in_force(self) -> bool:
        """A quorum of the latest membership committed past the slot where it took over."""
        latest = self.checker.latest_membership
        effective = self.checker.latest_effective_slot
        caught_up = [
            node
            for node in latest.voters
            if node in self.hosts
            and self.hosts[node].node is not None
            and self.hosts[node].node.commit_index >= effective - 1
        ]
        return len(caught_up) >= len(latest.voters) // 2 + 1

    def _operator_change(self) -> None:
        """Replace a voter with a fresh replica, as an operator would, one step at a time."""
        if self.operator_busy:
            self.at(200_000, self._operator_change)
            return
        voters = sorted(self.checker.membership_voters())
        victim = NodeId(self.rng_fault.choice(voters))
        style = self.rng_fault.choice(("replace", "grow-shrink"))
        self._operator_replace(victim, style)

    def _operator_replace_corrupt(self) -> None:
        if self.replacements_needed and not self.operator_busy:
            victim = self.replacements_needed.pop(0)
            if victim in self.checker.membership_voters():
                self._operator_replace(victim, "replace")
        if self.now_us < self.end_us:
            self.at(200_000, self._operator_replace_corrupt)

    def _operator_replace(self, victim: NodeId, style: str) -> None:
        self.operator_busy = True
        newcomer = NodeId(self.next_node_id)
        self.next_node_id += 1
        steps: list[MembershipChange] = [
            MembershipChange(MembershipChangeKind.ADD_LEARNER, newcomer)
        ]
        if style == "replace":
            steps.append(MembershipChange(MembershipChangeKind.REPLACE, newcomer, victim))
        else:
            steps.append(MembershipChange(MembershipChangeKind.PROMOTE, newcomer))
            steps.append(MembershipChange(MembershipChangeKind.REMOVE, victim))
        self.count("operator_changes_started")
        self._operator_step(steps, victim, newcomer, self.now_us + 20_000_000)

    def _operator_step(
        self, steps: list[MembershipChange], victim: NodeId, newcomer: NodeId, give_up_us: int
    ) -> None:
        """Drive one change at a time, checking each step's effect in the chosen log."""
        latest = self.checker.latest_membership
        while steps and _step_done(steps[0], latest):
            steps = steps[1:]
        if not steps:
            everyone = self.checker.membership_voters() | self.checker.governing_voters()
            if victim in self.checker.membership_voters() or not self._new_voters_in_force():
                # Removed but not yet in force everywhere: the victim still matters.
                if self.now_us < give_up_us:
                    self.at(
                        50_000, lambda: self._operator_step(steps, victim, newcomer, give_up_us)
                    )
                    return
            self.operator_busy = False
            if victim in self.hosts and victim not in everyone:
                self.hosts[victim].retired = True
                self._crash(self.hosts[victim])
            self._stable_from(self.now_us)
            return
        if self.now_us > give_up_us:
            self.operator_busy = False
            self._stable_from(self.now_us)
            return
        step = steps[0]
        if step.kind != MembershipChangeKind.ADD_LEARNER and step.node not in latest.members:
            if step.kind != MembershipChangeKind.REMOVE:
                # The learner's addition was lost with a leader: add it again.
                steps = [MembershipChange(MembershipChangeKind.ADD_LEARNER, step.node), *steps]
                step = steps[0]
        leader = self._leader_host()
        if leader is not None and leader.node is not None:
            result = leader.node.change_membership(step)
            if result == MembershipResult.OK:
                if step.kind == MembershipChangeKind.ADD_LEARNER and newcomer not in self.hosts:
                    self._start(self._new_host(newcomer))
                self._pump(leader)
            elif result in (MembershipResult.ID_RETIRED, MembershipResult.LAST_VOTER):
                raise SimViolation("operator", f"membership change refused: {result!r}")
        self.at(50_000, lambda: self._operator_step(steps, victim, newcomer, give_up_us))

    # ------------------------------------------------------------ end of run

    def _final_checks(self) -> None:
        history = [operation for client in self.clients for operation in client.history]
        for client in self.clients:
            if client.op is not None:
                history.append(Operation(client.client_id, client.invoke_us, None, client.op))
        result = check(history, kv_model())
        if result.ok is False:
            raise SimViolation("linearizable", result.explanation)
        if result.ok is None:
            # An unchecked history proves nothing: a run whose search gave up must not
            # pass as linearizable. (No seed of 0..449 exhausted it.)
            raise SimViolation("linearizable-inconclusive", result.explanation)
        late = [
            op
            for op in history
            if op.complete is not None and op.invoke >= self.stable_us + 600_000
        ]
        if not late:
            raise SimViolation("liveness", "no client operation completed after every fault healed")
        leader = self._leader_host()
        if leader is None or leader.node is None:
            raise SimViolation("liveness", "no ready leader at the end of the quiet period")
        commit = leader.node.commit_index
        for host in self.hosts.values():
            node = host.node
            voters = self.checker.membership_voters()
            if not host.alive or node is None or host.node_id not in voters:
                continue
            if node.applied_index + self.options.window_slots < commit:
                raise SimViolation(
                    "liveness",
                    f"node {host.node_id} applied only {node.applied_index} of {commit}",
                )
        self.count("runs")


def run_seed(seed: int, disabled_checks: frozenset[str] = frozenset()) -> SimResult:
    """Run one seed; raises :class:`SimFailure` naming the seed on any failure.

    ``disabled_checks`` turns named checks off (used to show that a broken rule is also
    caught end to end, not only by the check aimed at it).
    """
    return Simulation(SimConfig.from_seed(seed), disabled_checks).run()


def _step_done(step: MembershipChange, latest: Membership) -> bool:
    if step.kind == MembershipChangeKind.ADD_LEARNER:
        return step.node in latest.members or step.node in latest.retired
    if step.kind == MembershipChangeKind.REMOVE:
        return step.node not in latest.members
    if step.kind == MembershipChangeKind.PROMOTE:
        return step.node in latest.voters
    return step.node in latest.voters and step.old_node not in latest.members


def _fills_hole(node_id: NodeId, record: object) -> bool:
    """A leader's own vote for a no-op below a value in the same batch: phase 1 found
    a hole under a reported vote and filled it (a no-op that only brings a membership
    into force is never followed by a value in its batch)."""
    if not isinstance(record, AcceptedRecord) or record.ballot.node != node_id:
        return False
    kinds = [entry.kind for entry in record.entries]
    if EntryKind.NOOP not in kinds:
        return False
    first_noop = kinds.index(EntryKind.NOOP)
    return any(kind != EntryKind.NOOP for kind in kinds[first_noop + 1 :])


def _bind(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: function(*args)
