"""Scripted interaction tests: a text script of events -> the expected trace.

Modelled on etcd-io/raft's ``testdata/*.txt``: each block of a script is a command,
a ``----`` line, and the output the command must produce; blocks are separated by a
blank line and ``#`` starts a comment. Run ``PAXFS_REWRITE_SCRIPTS=1 pytest
tests/sim/test_interaction_scripts.py`` to regenerate the expected output -- only on
purpose, and read the diff.

Time is real milliseconds (``tick``); each node reads its own clock, which may run
fast or slow (``clock``). After every command the checker verifies that at most one
node holds a valid lease. The environment owns the nodes the way the metaserver does:
``process-ready`` makes the records durable at once, queues the messages, applies the
entries, serves reads and answers snapshot reads, then calls ``advance``. Messages wait
in one queue until a script delivers or drops them. The same :class:`SafetyChecker` as
in the random simulation watches every step.

Commands (``<n>`` is a node id):

``add-nodes <count> [read=lease] [lease=<ms>] [drift=<ppm>] [window=<slots>]
[batch=<commands>] [page=<entries>] [chunk=<bytes>] [retain=<slots>]
[commit-delay=<ms>] [thrifty=1] [quiet=<ms>]``
    create the founding voters 1..count (election timeout 100 ms, heartbeat 10 ms;
    commit news at once and every slot to every peer at once, unless ``commit-delay``
    and ``thrifty`` say otherwise)
``clock <n> <ppm>``                   node n's clock runs fast (or slow, if negative)
``campaign <n>``                      start phase 1 now
``tick <ms> [<n> ...]``               advance the clock and tick (all live nodes)
``propose <n> <command> ...``         propose commands
``read <n> <read-id>``                ask for a linearizable read
``process-ready <n> ...``             handle one Ready of each node
``deliver-msgs [from=<n>] [to=<n>] [type=<Name>] [drop]``
                                      deliver (or drop) the matching queued messages
``stabilize [<n> ...]``               process Readies and deliver until quiet
``crash <n>`` / ``restart <n>``       lose volatile state / rebuild from disk
``partition <a,b> <c,d>`` / ``heal``  cut (drop) messages between the groups
``snapshot <n>``                      the owner snapshots its state and compacts its log
``add-learner <leader> <n>`` / ``promote <leader> <n>`` / ``remove <leader> <n>`` /
``replace <leader> <old> <new>``      membership changes (add-learner starts node n)
``status <n>`` / ``log <n>`` / ``state <n>``
                                      print a node's view, log, or applied commands
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from metaserver.paxos import (
    Entry,
    EntryKind,
    LeaderChanged,
    Membership,
    MembershipChange,
    MembershipChangeKind,
    MembershipCommitted,
    NodeId,
    Outbound,
    PaxosNode,
    PaxosOptions,
    ProposalsDropped,
    ReadId,
    ReadMode,
    ReadsFailed,
    Ready,
    Record,
    SnapshotMeta,
    SteppedDown,
    initial_snapshot_meta,
)
from metaserver.paxos.messages import (
    Accept,
    Accepted,
    CatchupReply,
    CatchupRequest,
    Commit,
    Heartbeat,
    HeartbeatAck,
    Message,
    Nack,
    Prepare,
    ProbeReply,
    ProbeRequest,
    Promise,
    SnapshotChunk,
    SnapshotChunkRequest,
    SnapshotOffer,
)
from metaserver.paxos.records import AcceptedRecord, ChosenRecord, CommitRecord, PromiseRecord
from metaserver.paxos.types import Ballot
from tests.sim.checker import SafetyChecker
from tests.sim.codec import decode_message, decode_record, encode_message, encode_record


class ScriptError(Exception):
    """The script itself is wrong (unknown command, bad argument)."""


# ---------------------------------------------------------------- formatting


def fmt_ballot(ballot: Ballot) -> str:
    return f"{ballot.round}.{ballot.node}"


def fmt_entry(entry: Entry) -> str:
    if entry.kind == EntryKind.NOOP:
        return "noop"
    if entry.kind == EntryKind.MEMBERSHIP:
        assert entry.membership is not None
        return fmt_membership(entry.membership)
    return "[" + ",".join(command.decode(errors="replace") for command in entry.commands) + "]"


def fmt_membership(membership: Membership) -> str:
    parts = ["v=" + ",".join(str(n) for n in membership.voters)]
    if membership.learners:
        parts.append("l=" + ",".join(str(n) for n in membership.learners))
    if membership.retired:
        parts.append("r=" + ",".join(str(n) for n in membership.retired))
    return "conf(" + " ".join(parts) + ")"


def fmt_entries(entries: tuple[Entry, ...]) -> str:
    return " ".join(fmt_entry(entry) for entry in entries)


def fmt_message(message: Message) -> str:
    if isinstance(message, ProbeRequest):
        return f"Probe id={message.probe_id} commit={message.commit_index}"
    if isinstance(message, ProbeReply):
        verdict = "granted" if message.granted else "refused"
        return f"ProbeReply id={message.probe_id} {verdict} promised={fmt_ballot(message.promised)}"
    if isinstance(message, Prepare):
        return f"Prepare b={fmt_ballot(message.ballot)} from={message.from_slot}"
    if isinstance(message, Promise):
        accepted = " ".join(
            f"{a.slot}:{fmt_ballot(a.ballot)}:{fmt_entry(a.entry)}" for a in message.accepted
        )
        more = f" more={message.more_from}" if message.more_from is not None else ""
        return (
            f"Promise b={fmt_ballot(message.ballot)} from={message.from_slot} "
            f"commit={message.commit_index} votes=[{accepted}]{more}"
        )
    if isinstance(message, Nack):
        return (
            f"Nack rejected={fmt_ballot(message.rejected)} promised={fmt_ballot(message.promised)}"
        )
    if isinstance(message, Accept):
        last = message.first_slot + len(message.entries) - 1
        return (
            f"Accept b={fmt_ballot(message.ballot)} slots={message.first_slot}..{last} "
            f"{fmt_entries(message.entries)} commit={message.commit_index} "
            f"base={message.commit_base}"
        )
    if isinstance(message, Accepted):
        return (
            f"Accepted b={fmt_ballot(message.ballot)} slots={message.first_slot}.."
            f"{message.last_slot} commit={message.commit_index}"
        )
    if isinstance(message, Commit):
        return (
            f"Commit b={fmt_ballot(message.ballot)} commit={message.commit_index} "
            f"base={message.commit_base}"
        )
    if isinstance(message, Heartbeat):
        return (
            f"Heartbeat b={fmt_ballot(message.ballot)} seq={message.seq} "
            f"commit={message.commit_index} base={message.commit_base}"
        )
    if isinstance(message, HeartbeatAck):
        return (
            f"HeartbeatAck b={fmt_ballot(message.ballot)} seq={message.seq} "
            f"commit={message.commit_index}"
        )
    if isinstance(message, CatchupRequest):
        return f"CatchupRequest from={message.from_slot} has_config={message.has_config}"
    if isinstance(message, CatchupReply):
        values = " ".join(f"{fmt_entry(v.entry)}@{fmt_ballot(v.ballot)}" for v in message.values)
        return f"CatchupReply first={message.first_slot} [{values}] commit={message.commit_index}"
    if isinstance(message, SnapshotOffer):
        return f"SnapshotOffer index={message.meta.index} size={message.size_bytes}"
    if isinstance(message, SnapshotChunkRequest):
        return f"SnapshotChunkRequest index={message.index} offset={message.offset}"
    if isinstance(message, SnapshotChunk):
        return (
            f"SnapshotChunk index={message.meta.index} offset={message.offset} "
            f"len={len(message.data)} size={message.size_bytes}"
        )
    raise ScriptError(f"cannot format {type(message).__name__}")


def fmt_record(record: Record) -> str:
    if isinstance(record, PromiseRecord):
        return f"Promise {fmt_ballot(record.ballot)}"
    if isinstance(record, AcceptedRecord):
        return (
            f"Accepted {fmt_ballot(record.ballot)} from={record.first_slot} "
            f"{fmt_entries(record.entries)}"
        )
    if isinstance(record, ChosenRecord):
        values = " ".join(f"{fmt_entry(v.entry)}@{fmt_ballot(v.ballot)}" for v in record.values)
        return f"Chosen from={record.first_slot} {values}"
    if isinstance(record, CommitRecord):
        return f"Commit {record.commit_index}"
    raise ScriptError(f"cannot format {type(record).__name__}")


def fmt_notice(notice: object) -> str:
    if isinstance(notice, LeaderChanged):
        ballot = fmt_ballot(notice.ballot) if notice.ballot is not None else "-"
        return f"LeaderChanged leader={notice.leader} ballot={ballot}"
    if isinstance(notice, SteppedDown):
        return f"SteppedDown b={fmt_ballot(notice.ballot)} reason={notice.reason.name}"
    if isinstance(notice, ProposalsDropped):
        commands = ",".join(c.decode(errors="replace") for c in notice.commands)
        return f"ProposalsDropped [{commands}]"
    if isinstance(notice, ReadsFailed):
        return "ReadsFailed " + ",".join(f"r{r}" for r in notice.read_ids)
    if isinstance(notice, MembershipCommitted):
        return (
            f"MembershipCommitted slot={notice.entry_slot} effective={notice.effective_slot} "
            f"{fmt_membership(notice.membership)}"
        )
    raise ScriptError(f"cannot format {type(notice).__name__}")


# ---------------------------------------------------------------- environment


@dataclass
class _Owner:
    """What the metaserver keeps for one replica: disk, state machine, node."""

    node_id: NodeId
    records: list[Record] = field(default_factory=list)
    snapshot: SnapshotMeta | None = None
    snapshot_data: bytes = b""
    applied: list[str] = field(default_factory=list)
    applied_index: int = 0
    node: PaxosNode | None = None
    incarnation: int = 0


class InteractionEnv:
    def __init__(self, disabled_checks: frozenset[str] = frozenset()) -> None:
        self.disabled_checks = disabled_checks
        self.options = PaxosOptions()
        self.now_ms = 0
        """Real time; a node reads its own clock, which may run fast or slow."""
        self.clock_ppm: dict[NodeId, int] = {}
        self.owners: dict[NodeId, _Owner] = {}
        self.queue: list[tuple[NodeId, Outbound]] = []
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.checker: SafetyChecker | None = None
        self.out: list[str] = []
        self._commands: dict[str, Callable[[list[str]], None]] = {
            "add-nodes": self._add_nodes,
            "campaign": self._campaign,
            "tick": self._tick,
            "propose": self._propose,
            "read": self._read,
            "process-ready": self._process_ready_cmd,
            "deliver-msgs": self._deliver_msgs,
            "stabilize": self._stabilize,
            "crash": self._crash,
            "restart": self._restart,
            "partition": self._partition,
            "heal": self._heal,
            "snapshot": self._snapshot,
            "add-learner": self._membership,
            "promote": self._membership,
            "remove": self._membership,
            "replace": self._membership,
            "status": self._status,
            "log": self._log,
            "state": self._state,
            "clock": self._clock,
        }

    def run(self, command_line: str) -> str:
        """Execute one script command; return its output."""
        self.out = []
        words = command_line.split()
        handler = self._commands.get(words[0])
        if handler is None:
            raise ScriptError(f"unknown command {words[0]!r}")
        self._current = words[0]
        handler(words[1:])
        self._check_leases()
        return "\n".join(self.out) if self.out else "ok"

    def local_ms(self, node_id: NodeId) -> int:
        """What ``node_id``'s clock reads now."""
        return self.now_ms * (1_000_000 + self.clock_ppm.get(node_id, 0)) // 1_000_000

    def _check_leases(self) -> None:
        if self.checker is None:
            return
        holders = [
            node_id
            for node_id, owner in sorted(self.owners.items())
            if owner.node is not None and owner.node.lease_valid(self.local_ms(node_id))
        ]
        self.checker.on_leases(holders, self.now_ms * 1000)

    def emit(self, line: str) -> None:
        self.out.append(line)

    # ------------------------------------------------------------ helpers

    def _node(self, word: str) -> PaxosNode:
        owner = self.owners.get(NodeId(int(word)))
        if owner is None or owner.node is None:
            raise ScriptError(f"node {word} is not running")
        return owner.node

    def _make_node(self, owner: _Owner) -> None:
        owner.incarnation += 1
        owner.node = PaxosNode(
            node_id=owner.node_id,
            options=self.options,
            rng=random.Random(owner.node_id * 1000 + owner.incarnation),
            now_ms=self.local_ms(owner.node_id),
            snapshot=owner.snapshot,
            snapshot_size_bytes=len(owner.snapshot_data),
            records=[decode_record(encode_record(r)) for r in owner.records],
        )

    # ------------------------------------------------------------ commands

    def _add_nodes(self, args: list[str]) -> None:
        count = int(args[0])
        settings = dict(arg.split("=", 1) for arg in args[1:])
        self.options = PaxosOptions(
            heartbeat_interval_ms=10,
            election_timeout_ms=100,
            lease_ms=int(settings.get("lease", 50)),
            clock_drift_ppm_max=int(settings.get("drift", 0)),
            read_mode=ReadMode.LEASE if settings.get("read") == "lease" else ReadMode.READ_INDEX,
            window_slots=int(settings.get("window", 8)),
            batch_commands_max=int(settings.get("batch", 8)),
            promise_entries_max=int(settings.get("page", 64)),
            snapshot_chunk_bytes=int(settings.get("chunk", 1024)),
            log_retain_slots=int(settings.get("retain", 0)),
            learner_lag_slots_max=4,
            commit_delay_ms=int(settings.get("commit-delay", 0)),
            thrifty=settings.get("thrifty") == "1",
            thrifty_quiet_ms=int(settings.get("quiet", 20)),
        )
        voters = tuple(NodeId(i) for i in range(1, count + 1))
        self.checker = SafetyChecker(voters, self.options.window_slots, self.disabled_checks)
        for node_id in voters:
            owner = _Owner(node_id, snapshot=initial_snapshot_meta(voters))
            self.owners[node_id] = owner
            self._make_node(owner)

    def _campaign(self, args: list[str]) -> None:
        node_id = NodeId(int(args[0]))
        if not self._node(args[0]).campaign(self.local_ms(node_id)):
            self.emit("refused")

    def _clock(self, args: list[str]) -> None:
        """``clock <n> <ppm>``: node n's clock runs ppm parts per million fast (or slow)."""
        self.clock_ppm[NodeId(int(args[0]))] = int(args[1])

    def _tick(self, args: list[str]) -> None:
        self.now_ms += int(args[0])
        targets = [NodeId(int(a)) for a in args[1:]] or sorted(self.owners)
        for node_id in targets:
            node = self.owners[node_id].node
            if node is not None:
                node.tick(self.local_ms(node_id))

    def _propose(self, args: list[str]) -> None:
        node = self._node(args[0])
        for command in args[1:]:
            result = node.propose(command.encode())
            if result.name != "OK":
                self.emit(f"{command}: {result.name}")

    def _read(self, args: list[str]) -> None:
        node_id = NodeId(int(args[0]))
        result = self._node(args[0]).request_read(ReadId(int(args[1])), self.local_ms(node_id))
        self.emit(result.name)

    def _process_ready_cmd(self, args: list[str]) -> None:
        for word in args:
            self._process_ready(NodeId(int(word)))

    def _process_ready(self, node_id: NodeId) -> bool:
        owner = self.owners[node_id]
        node = owner.node
        if node is None or not node.has_ready():
            return False
        assert self.checker is not None
        ready = node.ready()
        self.emit(f"> {node_id} handling Ready")
        self._print_ready(ready)
        if ready.snapshot_install is not None:
            install = ready.snapshot_install
            owner.snapshot, owner.snapshot_data = install.meta, install.data
            owner.applied = list(msgpack.unpackb(install.data)) if install.data else []
            owner.applied_index = install.meta.index
            self.checker.on_install(node_id, install.meta.index, msgpack.packb(owner.applied))
            self.checker.on_snapshot_saved(node_id, install.meta.index)
        owner.records.extend(ready.records)
        self.checker.on_durable(node_id, ready.records)
        for outbound in ready.messages:
            self.checker.on_send(node_id, outbound.message)
            decoded = decode_message(encode_message(outbound.message))
            self.queue.append((node_id, Outbound(outbound.to, decoded)))
        for entry in ready.committed:
            owner.applied_index = entry.slot
            owner.applied.extend(c.decode() for c in entry.commands)
            value = entry.entry()
            digest = msgpack.packb(owner.applied)
            self.checker.on_apply(node_id, entry.slot, value, digest)
        for read in ready.snapshot_reads:
            data = None
            if owner.snapshot is not None and owner.snapshot.index == read.index:
                data = owner.snapshot_data[read.offset : read.offset + read.length]
            node.snapshot_read_done(read, data)
        node.advance(ready)
        return True

    def _print_ready(self, ready: Ready) -> None:
        if ready.snapshot_install is not None:
            meta = ready.snapshot_install.meta
            self.emit(
                f"  InstallSnapshot index={meta.index} size={len(ready.snapshot_install.data)}"
            )
        if ready.records:
            self.emit("  Records:")
            for record in ready.records:
                self.emit(f"    {fmt_record(record)}")
        if ready.messages:
            self.emit("  Messages:")
            for outbound in ready.messages:
                sender = outbound.message.sender
                self.emit(f"    {sender}->{outbound.to} {fmt_message(outbound.message)}")
        if ready.committed:
            self.emit("  Committed:")
            for entry in ready.committed:
                value = entry.entry()
                self.emit(f"    {entry.slot}: {fmt_entry(value)}")
        if ready.reads:
            self.emit("  Reads: " + " ".join(f"r{r.read_id}@{r.index}" for r in ready.reads))
        if ready.snapshot_reads:
            self.emit(
                "  SnapshotReads: "
                + " ".join(f"{r.to}:{r.index}+{r.offset}/{r.length}" for r in ready.snapshot_reads)
            )
        for notice in ready.notices:
            self.emit(f"  {fmt_notice(notice)}")

    def _deliver_msgs(self, args: list[str]) -> None:
        filters = dict(arg.split("=", 1) for arg in args if "=" in arg)
        drop = "drop" in args
        kept: list[tuple[NodeId, Outbound]] = []
        batch: list[tuple[NodeId, Outbound]] = []
        for sender, outbound in self.queue:
            matches = (
                ("from" not in filters or sender == int(filters["from"]))
                and ("to" not in filters or outbound.to == int(filters["to"]))
                and ("type" not in filters or type(outbound.message).__name__ == filters["type"])
            )
            (batch if matches else kept).append((sender, outbound))
        self.queue = kept
        for sender, outbound in batch:
            self._deliver(sender, outbound, drop)

    def _deliver(self, sender: NodeId, outbound: Outbound, drop: bool) -> None:
        text = f"{sender}->{outbound.to} {fmt_message(outbound.message)}"
        owner = self.owners.get(outbound.to)
        if drop:
            self.emit(f"dropped: {text}")
        elif (sender, outbound.to) in self.blocked:
            self.emit(f"cut: {text}")
        elif owner is None or owner.node is None:
            self.emit(f"lost (down): {text}")
        else:
            self.emit(text)
            owner.node.step(outbound.message, self.local_ms(outbound.to))

    def _stabilize(self, args: list[str]) -> None:
        only = {NodeId(int(a)) for a in args}
        while True:
            progressed = False
            for node_id in sorted(self.owners):
                if only and node_id not in only:
                    continue
                while self._process_ready(node_id):
                    progressed = True
            pending = [(s, o) for s, o in self.queue if not only or (s in only and o.to in only)]
            if pending:
                self.queue = [item for item in self.queue if item not in pending]
                for sender, outbound in pending:
                    self._deliver(sender, outbound, drop=False)
                progressed = True
            if not progressed:
                return

    def _crash(self, args: list[str]) -> None:
        """Lose volatile state; messages still travelling to the node are lost too."""
        owner = self.owners[NodeId(int(args[0]))]
        for sender, outbound in [item for item in self.queue if item[1].to == owner.node_id]:
            self.queue.remove((sender, outbound))
            self.emit(f"lost (down): {sender}->{outbound.to} {fmt_message(outbound.message)}")
        owner.node = None
        owner.applied = []
        owner.applied_index = 0

    def _restart(self, args: list[str]) -> None:
        owner = self.owners[NodeId(int(args[0]))]
        assert self.checker is not None
        self.checker.on_disk_loaded(owner.node_id, owner.records)
        owner.applied = list(msgpack.unpackb(owner.snapshot_data)) if owner.snapshot_data else []
        owner.applied_index = owner.snapshot.index if owner.snapshot is not None else 0
        self._make_node(owner)
        assert owner.node is not None
        self.checker.on_restart(owner.node_id, owner.node.promised)

    def _partition(self, args: list[str]) -> None:
        groups = [[NodeId(int(n)) for n in group.split(",")] for group in args]
        for group in groups:
            for other in groups:
                if other is not group:
                    for a in group:
                        for b in other:
                            self.blocked.add((a, b))

    def _heal(self, args: list[str]) -> None:
        self.blocked.clear()

    def _snapshot(self, args: list[str]) -> None:
        owner = self.owners[NodeId(int(args[0]))]
        node = self._node(args[0])
        assert self.checker is not None
        meta = node.snapshot_meta(node.applied_index)
        owner.snapshot, owner.snapshot_data = meta, msgpack.packb(owner.applied)
        node.snapshot_saved(meta, len(owner.snapshot_data))
        self.checker.on_snapshot_saved(owner.node_id, meta.index)
        records = node.compacted_records()
        if records is None:
            raise ScriptError("compaction refused: process the outstanding Ready first")
        owner.records = list(records)
        self.emit(f"snapshot index={meta.index} size={len(owner.snapshot_data)}")
        for record in records:
            self.emit(f"  {fmt_record(record)}")

    def _membership(self, args: list[str]) -> None:
        leader = self._node(args[0])
        kind = {
            "add-learner": MembershipChangeKind.ADD_LEARNER,
            "promote": MembershipChangeKind.PROMOTE,
            "remove": MembershipChangeKind.REMOVE,
            "replace": MembershipChangeKind.REPLACE,
        }[self._current]
        if kind == MembershipChangeKind.REPLACE:
            change = MembershipChange(kind, NodeId(int(args[2])), NodeId(int(args[1])))
        else:
            change = MembershipChange(kind, NodeId(int(args[1])))
        result = leader.change_membership(change)
        self.emit(result.name)
        if kind == MembershipChangeKind.ADD_LEARNER and result.name == "OK":
            owner = _Owner(change.node)
            self.owners[change.node] = owner
            self._make_node(owner)

    def _status(self, args: list[str]) -> None:
        status = self._node(args[0]).status()
        membership = fmt_membership(status.membership) if status.membership else "-"
        leader_ballot = fmt_ballot(status.leader_ballot) if status.leader_ballot else "-"
        self.emit(
            f"role={status.role.name} leader={status.leader_id} ballot={leader_ballot} "
            f"promised={fmt_ballot(status.promised)} commit={status.commit_index} "
            f"applied={status.applied_index} snapshot={status.snapshot_index} {membership}"
        )
        if status.pending_membership is not None:
            pending = status.pending_membership
            self.emit(
                f"  pending from slot {pending.effective_slot}: "
                f"{fmt_membership(pending.membership)}"
            )
        for peer in status.peers:
            kind = "voter" if peer.voter else "learner"
            self.emit(f"  peer {peer.node} {kind} match={peer.match_index}")

    def _log(self, args: list[str]) -> None:
        node = self._node(args[0])
        lines = [
            f"{slot}: {fmt_ballot(vote.ballot)} {fmt_entry(vote.entry)}"
            for slot, vote in node._log.items_from(0)
        ]
        self.out.extend(lines or ["(empty)"])

    def _state(self, args: list[str]) -> None:
        owner = self.owners[NodeId(int(args[0]))]
        self.emit(f"applied={owner.applied_index} [{','.join(owner.applied)}]")


# ---------------------------------------------------------------- script files


@dataclass
class Block:
    command: str
    expected: str
    line: int


def parse_script(text: str) -> tuple[list[str], list[Block]]:
    """Split a script into (leading comment lines, blocks)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    header: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip() or line.startswith("#"):
            if not blocks:
                header.append(line)
            index += 1
            continue
        command_line = index + 1
        command = line.strip()
        index += 1
        if index >= len(lines) or lines[index] != "----":
            raise ScriptError(f"line {command_line}: expected ---- after {command!r}")
        index += 1
        expected: list[str] = []
        while index < len(lines) and lines[index].strip():
            expected.append(lines[index])
            index += 1
        blocks.append(Block(command, "\n".join(expected), command_line))
    return header, blocks


def render_script(
    header: list[str], blocks: list[tuple[str, str]], comments: dict[int, list[str]]
) -> str:
    """Write a script back with fresh outputs, keeping its comments."""
    parts: list[str] = []
    if header:
        parts.append("\n".join(header).strip("\n"))
    for position, (command, output) in enumerate(blocks):
        chunk = comments.get(position, []) + [command, "----", output]
        parts.append("\n".join(chunk))
    return "\n\n".join(parts) + "\n"


def comments_by_block(text: str) -> dict[int, list[str]]:
    """Comment lines immediately preceding each block (by block position)."""
    result: dict[int, list[str]] = {}
    pending: list[str] = []
    position = -1
    lines = text.splitlines()
    index = 0
    seen_block = False
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            if seen_block:
                pending.append(line)
            index += 1
            continue
        if not line.strip():
            index += 1
            continue
        position += 1
        seen_block = True
        if pending:
            result[position] = pending
            pending = []
        index += 2
        while index < len(lines) and lines[index].strip():
            index += 1
    return result


def run_script(
    text: str, disabled_checks: frozenset[str] = frozenset()
) -> list[tuple[str, str, str, int]]:
    """Run every block; returns (command, expected, actual, line) per block."""
    _, blocks = parse_script(text)
    env = InteractionEnv(disabled_checks)
    return [(b.command, b.expected, env.run(b.command), b.line) for b in blocks]
