"""One metaserver replica: the Paxos core, the namespace and the disk, driven by trio.

This is the owner of :class:`~metaserver.paxos.PaxosNode` described in
:mod:`metaserver.paxos.ready`.  Inputs (peer messages, ticks, proposals, read
requests) go straight into the core, which only queues outputs; one driver task
takes each Ready and does what it asks:

1. install a snapshot received from a peer, durably;
2. send at once the messages that reveal nothing of this Ready's records -- the
   leader's Accept, Commit and Heartbeat requests at a ballot already durable here --
   so that the followers' fsync runs in parallel with the leader's own (Raft thesis
   10.2.1); the peer links write them before the next step when idle (commit news
   rides on the next Accept or Heartbeat: the core sends a lone Commit only after
   ``PaxosOptions.commit_delay_ms`` without either);
3. make the records durable: written and synced right here when the log writer is
   idle (:meth:`~metaserver.storage.MetaStorage.append_now`: ~0.1 ms, cheaper than two
   thread hand-offs on every commit), otherwise queued for the writer thread (group
   commit: every proposal that arrived during the previous fsync rides in this one); a
   record of the commit index alone waits to ride with later records (nothing depends
   on its durability);
4. apply the committed commands to the namespace and wake whoever waits for each
   reply (a committed slot is chosen: a quorum holds it durably, so applying it does
   not wait for this replica's own records);
5. wait for the fsync, and only then send the other messages (a promise or a vote
   never leaves before it is on disk) and ``advance()``, which counts the leader's
   own vote;
6. release the reads that became safe, answer snapshot reads, act on notices.

Linearizable reads are served at once while the leader holds a lease from a quorum
(``ReadMode.LEASE``) and its state has applied everything committed; otherwise they
wait for a read-index confirmation from the core.

Snapshots: the namespace is serialised in a worker thread while the driver keeps
running (heartbeats, votes, fsyncs); committed commands wait in a bounded backlog
until the serialisation ends, so the thread reads a state nobody writes.  The saved
snapshot then compacts the log, between ``advance()`` and the next ``ready()`` as the
core requires.

Every replica also keeps a durable set of the metaservers it has heard from (see
:class:`~metaserver.codec.HeardFromRecord`), and applies *group commands* (the
addresses of replicas added later) beside the namespace's commands.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import trio

from metaserver.codec import (
    GroupState,
    HeardFromRecord,
    SetMetaserverAddress,
    decode_group_command,
    decode_snapshot,
    encode_group_command,
    encode_record,
    encode_snapshot,
    is_group_command,
)
from metaserver.namespace import Namespace, decode_command, encode_command
from metaserver.paxos import (
    Ballot,
    CommittedEntry,
    EntryKind,
    LeaderChanged,
    MembershipChange,
    MembershipChangeKind,
    MembershipCommitted,
    MembershipResult,
    NodeId,
    PaxosNode,
    ProposalsDropped,
    ProposeResult,
    ReadId,
    ReadResult,
    ReadsFailed,
    Ready,
    Role,
    Slot,
    SnapshotMeta,
    SteppedDown,
)
from metaserver.paxos.messages import Accept, Commit, Heartbeat
from metaserver.paxos.records import AcceptedRecord, CommitRecord, PromiseRecord
from metaserver.peers import BATCH_BYTES_MAX
from metaserver.storage import MetaStorage
from wire import schema
from wire.address import Address, parse_address
from wire.admin_ops import (
    MemberAddress,
    MembershipAction,
    MembershipChangeRequest,
    MembershipReply,
)
from wire.errors import NOT_LEADER, RpcError
from wire.invariant import invariant
from wire.namespace_ops import Command, Reply
from wire.rpc import Deferred

log = logging.getLogger(__name__)

TICK_INTERVAL_MS = 10
"""How often a leader or candidate ticks its core: heartbeats, commit news, elections."""
FOLLOWER_TICK_INTERVAL_MS = 25
"""How often a follower ticks: only its election deadline (hundreds of ms away) and
catch-up retries need time to pass there, and every tick costs a timer and a wake-up."""
COMMIT_RECORD_DELAY_MS = 100
"""Longest a commit-index record waits for other records to share their fsync."""
MEMBERSHIP_WAIT_S_MAX = 30.0
"""How long a membership change waits to come into force before answering EAGAIN."""

_EARLY_MESSAGE_TYPES = (Accept, Commit, Heartbeat)
"""Leader requests that reveal no acceptor state: they may leave before the fsync."""

_MEMBERSHIP_KINDS = {
    MembershipAction.ADD_LEARNER: MembershipChangeKind.ADD_LEARNER,
    MembershipAction.PROMOTE: MembershipChangeKind.PROMOTE,
    MembershipAction.REMOVE: MembershipChangeKind.REMOVE,
    MembershipAction.REPLACE: MembershipChangeKind.REPLACE,
}


@dataclass(frozen=True)
class ReplicaOptions:
    snapshot_interval_entries: int = 100_000
    """Applied slots between snapshots (each snapshot also compacts the log)."""
    apply_backlog_slots_max: int = 8_192
    """Committed slots held back while a snapshot is serialised; past it the driver
    waits for the serialisation (and the leader refuses new proposals past half)."""


class _Waiter(Deferred):
    """The outcome of one proposal or read, settled by the driver (a reply or an error)."""

    __slots__ = ("command",)

    def __init__(self, command: Any = None, transform: Callable[[Any], Any] | None = None):
        super().__init__(transform)
        self.command = command
        """The decoded command, so that the leader need not decode its own proposal."""


MessageSink = Callable[[NodeId, list[Any]], None]
AddressSink = Callable[[int, Address], None]


class Replica:
    """A running replica; see the module docstring for the Ready loop it drives.

    ``founders`` are the founding members' addresses from ``[cluster] metaservers``;
    ``group`` is the replicated group state recovered with the snapshot; ``heard`` the
    durable set of peers this replica has taken messages from.  ``send_messages`` and
    ``set_peer_address`` are the peer links.
    """

    def __init__(
        self,
        node: PaxosNode,
        namespace: Namespace,
        storage: MetaStorage,
        *,
        founders: dict[int, Address],
        group: GroupState,
        heard: set[int],
        send_messages: MessageSink,
        set_peer_address: AddressSink,
        options: ReplicaOptions,
        snapshot_blob: bytes | None,
    ) -> None:
        invariant(
            node.options.message_bytes_max < BATCH_BYTES_MAX,
            "the core's messages must fit the peer links' frames",
        )
        self.node = node
        self.namespace = namespace
        self.group = group
        self._founders = dict(founders)
        self._storage = storage
        self._send_messages = send_messages
        self._set_peer_address = set_peer_address
        self._options = options
        self._snapshot_blob = snapshot_blob
        self._snapshot_index = node.snapshot_index
        self.applied_index = node.applied_index
        """Last slot applied to ``namespace`` (behind the core's while a backlog waits)."""
        self._durable_ballot: Ballot = node.promised
        self._commit_record: CommitRecord | None = None
        self._commit_record_since_ms = 0
        self._proposals: dict[bytes, deque[_Waiter]] = defaultdict(deque)
        self._reads: dict[ReadId, _Waiter] = {}
        self._reads_unapplied: deque[tuple[int, ReadId]] = deque()
        self._next_read_id = 0
        self._kicked = trio.Event()
        self._progressed = trio.Event()
        self._backlog: deque[CommittedEntry] = deque()
        self._serialising = False
        self._serialised = trio.Event()
        self._snapshot_task_done = trio.Event()
        self._snapshot_task_done.set()
        self._snapshot_saved: tuple[SnapshotMeta, bytes] | None = None
        self._compaction_due = False
        self._nursery: trio.Nursery | None = None
        self._heard = set(heard)
        self._heard_submitted = set(heard)
        self._heard_pending: dict[int, trio.Event] = {}
        self.leader_epoch = 0
        """Grows at every leader change this replica sees (cluster-manager epochs)."""
        self.applied_commands = 0
        self.snapshots_taken = 0
        self.snapshot_serialised_at: tuple[float, float] = (0.0, 0.0)
        """When (trio clock) the last snapshot's serialisation started and ended."""
        self._link_group()

    def _link_group(self) -> None:
        """Point the peer links at every member address the group knows."""
        for node_id, address in self.group.address_map().items():
            self._set_peer_address(node_id, parse_address(address))

    # ------------------------------------------------------------ time and identity

    @staticmethod
    def now_ms() -> int:
        return int(trio.current_time() * 1000)

    def addresses(self) -> dict[int, str]:
        """Every metaserver's address known here: founders, then replicas added later."""
        known = {node: str(address) for node, address in self._founders.items()}
        known.update(self.group.address_map())
        return known

    def member_addresses(self) -> tuple[MemberAddress, ...]:
        return tuple(MemberAddress(n, a) for n, a in sorted(self.addresses().items()))

    def heard_from(self, node_id: int) -> bool:
        """Whether this replica has (or is about to have) durably heard from ``node_id``."""
        return node_id in self._heard_submitted

    def is_retired(self, node_id: int) -> bool:
        membership = self.node.membership()
        return membership is not None and node_id in membership.retired

    def may_send(self, node_id: int) -> bool:
        """Accept Paxos messages from ``node_id``: any positive id not retired."""
        return node_id > 0 and node_id != self.node.node_id and not self.is_retired(node_id)

    # ------------------------------------------------------------ inputs

    async def deliver(self, sender: int, messages: tuple[Any, ...]) -> None:
        """Step peer messages into the core (the driver sends whatever they cause).

        The first messages ever taken from ``sender`` wait until that fact is durable.
        """
        if sender not in self._heard:
            await self._record_heard(sender)
        now = self.now_ms()
        for message in messages:
            self.node.step(message, now)
        if self.node.has_ready_besides_proposals():
            # Most replies change nothing to do (the vote after the quorum, a heartbeat
            # ack): the driver sleeps on instead of waking for an empty round.  Queued
            # proposals are the driver's to batch (they woke it when they came).
            self._kick()

    async def _record_heard(self, sender: int) -> None:
        pending = self._heard_pending.get(sender)
        if pending is not None:
            await pending.wait()
            if sender not in self._heard:
                raise RpcError(errno.EAGAIN, "recording the sender failed; resend")
            return
        pending = self._heard_pending[sender] = trio.Event()
        self._heard_submitted.add(sender)
        try:
            ticket = await self._storage.submit([encode_record(HeardFromRecord((sender,)))])
            await ticket.wait_durable()
            self._heard.add(sender)
            log.info("first contact with metaserver %d recorded", sender)
        finally:
            del self._heard_pending[sender]
            pending.set()

    def _kick(self) -> None:
        self._kicked.set()

    @property
    def is_leader(self) -> bool:
        return self.node.role == Role.LEADER

    def leader_address(self) -> str:
        leader = self.node.leader_id
        if leader is None or leader == self.node.node_id:
            return ""
        return self.addresses().get(leader, "")

    def not_leader(self) -> RpcError:
        """The redirect error: its message is the leader's address, or empty."""
        return RpcError(NOT_LEADER, self.leader_address())

    async def submit(self, command: Command) -> Reply:
        """Propose ``command`` and return the namespace's reply once it is applied here.

        Raises ``RpcError(NOT_LEADER)`` when this replica cannot propose (the
        client retries at the leader with the same sequence number).
        """
        return await self._propose(encode_command(command), command)  # type: ignore[no-any-return]

    def submit_deferred(self, command: Command, transform: Callable[[Any], Any]) -> Deferred:
        """Like :meth:`submit` without waiting: the Deferred is resolved with
        ``transform(reply)`` once applied here, or failed (NOT_LEADER after a leader
        change).  Raises at once what :meth:`submit` would raise before proposing."""
        return self._queue_proposal(encode_command(command), command, transform)

    async def submit_group(self, command: SetMetaserverAddress) -> None:
        """Propose a group command and return once it is applied here."""
        await self._propose(encode_group_command(command), command)

    def _queue_proposal(
        self, data: bytes, command: Any, transform: Callable[[Any], Any] | None = None
    ) -> _Waiter:
        if len(self._backlog) > self._options.apply_backlog_slots_max // 2:
            raise RpcError(errno.EAGAIN, "metaserver busy writing a snapshot; retry")
        result = self.node.propose(data)
        if result == ProposeResult.NOT_LEADER:
            raise self.not_leader()
        if result == ProposeResult.QUEUE_FULL:
            raise RpcError(errno.EAGAIN, "metaserver proposal queue is full; retry")
        if result == ProposeResult.TOO_LARGE:
            raise RpcError(errno.E2BIG, "command too large")
        waiter = _Waiter(command, transform)
        self._proposals[data].append(waiter)
        self._kick()
        return waiter

    async def _propose(self, data: bytes, command: Any) -> Any:
        waiter = self._queue_proposal(data, command)
        waiters = self._proposals[data]
        try:
            return await waiter.wait()
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._proposals.get(data) is waiters:
                del self._proposals[data]

    async def confirm_read(self) -> None:
        """Return once the applied state may answer a linearizable read.

        At once while this leader holds a valid lease and has applied everything
        committed; otherwise through the core's read-index confirmation.
        """
        waiter = self.read_deferred(None)
        if not waiter.done:  # done at once only under a lease, and then never failed
            await waiter.wait()

    def read_deferred(self, transform: Callable[[Any], Any] | None) -> Deferred:
        """A Deferred resolved with ``transform(None)`` -- run at that moment, so it may
        read the namespace -- once the applied state may answer a linearizable read
        (at once under a valid lease); failed with NOT_LEADER if leadership is lost.
        Raises NOT_LEADER or EAGAIN at once when no read can be started here."""
        node = self.node
        if (
            self.applied_index >= node.commit_index
            and not self._backlog
            and node.lease_valid(self.now_ms())
        ):
            ready = Deferred(transform)
            ready.resolve(None)
            return ready
        self._next_read_id += 1
        read_id = ReadId(self._next_read_id)
        result = node.request_read(read_id, self.now_ms())
        if result == ReadResult.NOT_LEADER:
            raise self.not_leader()
        if result == ReadResult.BUSY:
            raise RpcError(errno.EAGAIN, "too many reads pending; retry")
        waiter = _Waiter(None, transform)
        self._reads[read_id] = waiter
        self._kick()
        return waiter

    # ------------------------------------------------------------ membership

    async def change_membership(self, request: MembershipChangeRequest) -> MembershipReply:
        """Carry out one membership change as leader; return once it is in force.

        ADD_LEARNER first replicates the new replica's address (a group command), so
        that every replica can reach it before the core starts sending it the log.
        """
        node_id = request.node_id
        if request.action == MembershipAction.ADD_LEARNER:
            try:
                address = parse_address(request.address)
            except ValueError as error:
                raise RpcError(errno.EINVAL, str(error)) from None
            known = self.addresses().get(node_id)
            if known is not None and known != str(address):
                raise RpcError(
                    errno.EEXIST, f"metaserver {node_id} is known at {known}, not {address}"
                )
            if self._in_force(request):
                return self.membership_reply()
            if self.is_retired(node_id):
                raise RpcError(errno.EINVAL, f"id {node_id} was retired; ids are never reused")
            if known is None:
                await self.submit_group(SetMetaserverAddress(node_id, str(address)))
        if self._in_force(request):
            return self.membership_reply()
        change = MembershipChange(
            _MEMBERSHIP_KINDS[request.action],
            NodeId(node_id),
            NodeId(request.old_node_id) if request.action == MembershipAction.REPLACE else None,
        )
        result = self.node.change_membership(change)
        if result == MembershipResult.NOT_LEADER:
            raise self.not_leader()
        if result in (MembershipResult.CHANGE_IN_PROGRESS, MembershipResult.LEARNER_BEHIND):
            reason = "another change is in progress"
            if result == MembershipResult.LEARNER_BEHIND:
                reason = f"learner {node_id} is still catching up"
            raise RpcError(errno.EAGAIN, f"{reason}; retry")
        if result == MembershipResult.ID_RETIRED:
            raise RpcError(errno.EINVAL, f"id {node_id} was retired; ids are never reused")
        if result == MembershipResult.UNKNOWN_NODE:
            raise RpcError(errno.ENOENT, f"no such member for {request.action.name}: {node_id}")
        if result != MembershipResult.OK and result != MembershipResult.ALREADY_MEMBER:
            raise RpcError(errno.EINVAL, f"membership change refused: {result.name}")
        self._kick()
        with trio.move_on_after(MEMBERSHIP_WAIT_S_MAX):
            while not self._in_force(request):
                if not self.is_leader:
                    raise self.not_leader()
                await self._progressed.wait()
            log.info("membership now %s", self.node.membership())
            return self.membership_reply()
        raise RpcError(errno.EAGAIN, "membership change not in force yet; retry")

    def _in_force(self, request: MembershipChangeRequest) -> bool:
        if self.node.status().pending_membership is not None:
            return False
        membership = self.node.membership()
        if membership is None:
            return False
        node_id = request.node_id
        if request.action == MembershipAction.ADD_LEARNER:
            return node_id in membership.members
        if request.action == MembershipAction.PROMOTE:
            return node_id in membership.voters
        if request.action == MembershipAction.REMOVE:
            return node_id in membership.retired
        return node_id in membership.voters and request.old_node_id in membership.retired

    def membership_reply(self) -> MembershipReply:
        membership = self.node.membership()
        if membership is None:
            raise RpcError(errno.EAGAIN, "this replica has not learned the membership yet")
        return MembershipReply(
            voters=tuple(membership.voters),
            learners=tuple(membership.learners),
            retired=tuple(membership.retired),
            addresses=self.member_addresses(),
        )

    # ------------------------------------------------------------ the driver

    async def run(self) -> None:
        """Tick the core and drive its Ready loop until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._tick_loop)
            await self._drive()

    async def _tick_loop(self) -> None:
        while True:
            follower = self.node.role == Role.FOLLOWER
            await trio.sleep((FOLLOWER_TICK_INTERVAL_MS if follower else TICK_INTERVAL_MS) / 1000)
            now = self.now_ms()
            self.node.tick(now)
            if self.node.has_ready_besides_proposals() or self._commit_record_due(now):
                self._kick()

    async def _drive(self) -> None:
        while True:
            await self._kicked.wait()
            self._kicked = trio.Event()
            self._drain_backlog()
            await self._flush_commit_record()
            while self.node.has_ready():
                ready = self.node.ready()
                await self._handle(ready)
                self.node.advance(ready)
                await self._after_advance()
                self._progressed.set()
                self._progressed = trio.Event()

    async def _handle(self, ready: Ready) -> None:
        if ready.snapshot_install is not None:
            await self._install(ready.snapshot_install.meta, ready.snapshot_install.data)
        ticket = None
        held: tuple[Any, ...] = ()
        records = ready.records
        only = records[0] if len(records) == 1 else None
        if isinstance(only, CommitRecord):
            # Nothing waits for a commit index to be durable: the slots are chosen (a
            # quorum holds them), and the record only shortens recovery.  It rides with
            # the next records, or goes alone after COMMIT_RECORD_DELAY_MS.  (A Ready
            # holds at most one CommitRecord, after any other record.)
            if self._commit_record is None:
                self._commit_record_since_ms = self.now_ms()
            self._commit_record = only
            records = ()
        elif records and self._commit_record is not None:
            records = (self._commit_record, *records)
            self._commit_record = None
        durable_now = False
        if records:
            payloads = [encode_record(r) for r in records]
            # Early messages first: the peer links write them at once when idle, so the
            # followers' fsyncs run while this replica writes its own.
            held = self._send(ready.messages, early_only=True)
            ticket = self._storage.append_now(payloads)
            if ticket is None:
                ticket = await self._storage.submit(payloads)
            else:
                durable_now = True
                self._note_durable(ready)
                self._send(held, early_only=False)
        else:
            self._send(ready.messages, early_only=False)
        for entry in ready.committed:
            self._commit_entry(entry)
        if ticket is not None and not durable_now:
            await ticket.wait_durable()
            self._note_durable(ready)
            self._send(held, early_only=False)
        for read in ready.reads:
            self._read_ready(read.read_id, read.index)
        for snapshot_read in ready.snapshot_reads:
            blob = self._snapshot_blob
            data = None
            if blob is not None and snapshot_read.index == self._snapshot_index:
                data = blob[snapshot_read.offset : snapshot_read.offset + snapshot_read.length]
            self.node.snapshot_read_done(snapshot_read, data)
        for notice in ready.notices:
            self._on_notice(notice)

    def _send(self, messages: tuple[Any, ...], *, early_only: bool) -> tuple[Any, ...]:
        """Hand ``messages`` to the peer links; with ``early_only`` only those that may
        leave before this Ready's fsync, returning the rest."""
        by_peer: dict[NodeId, list[Any]] = defaultdict(list)
        held: list[Any] = []
        durable = self._durable_ballot
        for outbound in messages:
            message = outbound.message
            if early_only and not (
                isinstance(message, _EARLY_MESSAGE_TYPES) and message.ballot <= durable
            ):
                held.append(outbound)
                continue
            by_peer[outbound.to].append(message)
        for peer, batch in by_peer.items():
            self._send_messages(peer, batch)
        return tuple(held)

    def _commit_record_due(self, now_ms: int) -> bool:
        """A commit-index record waited COMMIT_RECORD_DELAY_MS for others to ride with."""
        return (
            self._commit_record is not None
            and now_ms - self._commit_record_since_ms >= COMMIT_RECORD_DELAY_MS
        )

    async def _flush_commit_record(self) -> None:
        record = self._commit_record
        if record is not None and self._commit_record_due(self.now_ms()):
            self._commit_record = None
            await self._storage.submit([encode_record(record)])

    def _note_durable(self, ready: Ready) -> None:
        for record in ready.records:
            if isinstance(record, (PromiseRecord, AcceptedRecord)):
                if record.ballot > self._durable_ballot:
                    self._durable_ballot = record.ballot

    # ------------------------------------------------------------ applying

    def _commit_entry(self, entry: CommittedEntry) -> None:
        if self._serialising or self._backlog:
            self._backlog.append(entry)
            return
        self._apply(entry)

    def _drain_backlog(self) -> None:
        if self._serialising:
            return
        while self._backlog:
            self._apply(self._backlog.popleft())

    def _apply(self, entry: CommittedEntry) -> None:
        invariant(entry.slot == self.applied_index + 1, f"applying slot {entry.slot} out of order")
        self.applied_index = entry.slot
        if entry.kind == EntryKind.COMMANDS:
            for data in entry.commands:
                self._apply_command(data)
        self._release_reads()

    def _release_reads(self) -> None:
        while self._reads_unapplied and self._reads_unapplied[0][0] <= self.applied_index:
            _index, read_id = self._reads_unapplied.popleft()
            waiter = self._reads.pop(read_id, None)
            if waiter is not None:
                waiter.resolve(None)

    def _apply_command(self, data: bytes) -> None:
        waiters = self._proposals.get(data)
        waiter = waiters[0] if waiters else None
        reply: Any
        try:
            if is_group_command(data):
                command = waiter.command if waiter is not None else decode_group_command(data)
                reply = self._apply_group(command)
            else:
                command = waiter.command if waiter is not None else decode_command(data)
                reply = self.namespace.apply(command)
                self.applied_commands += 1
        except schema.SchemaError as error:
            # Every replica skips the same bytes, so state stays identical.
            log.error("slot %d holds an undecodable command: %s", self.applied_index, error)
            reply = RpcError(errno.EPROTO, "undecodable command")
        if waiters:
            waiters.popleft()
            if not waiters:
                del self._proposals[data]
            assert waiter is not None
            if isinstance(reply, RpcError):
                waiter.fail(reply)
            else:
                waiter.resolve(reply)

    def _apply_group(self, command: SetMetaserverAddress) -> RpcError | None:
        try:
            address = parse_address(command.address)
        except ValueError as error:
            return RpcError(errno.EINVAL, str(error))
        book = self.group.address_map()
        book[command.node] = str(address)
        entries = tuple(MemberAddress(n, a) for n, a in sorted(book.items()))
        self.group = replace(self.group, addresses=entries)
        self._set_peer_address(command.node, address)
        log.info("metaserver %d is at %s", command.node, address)
        return None

    def _read_ready(self, read_id: ReadId, index: int) -> None:
        waiter = self._reads.get(read_id)
        if waiter is None:
            return
        if index <= self.applied_index:
            del self._reads[read_id]
            waiter.resolve(None)
        else:
            self._reads_unapplied.append((index, read_id))

    def _on_notice(self, notice: Any) -> None:
        if isinstance(notice, LeaderChanged):
            self.leader_epoch += 1
            log.info("leader is now %s (ballot %s)", notice.leader, notice.ballot)
            if notice.leader != self.node.node_id:
                # Commands that got a slot may still be chosen, or not: let the clients
                # retry at the new leader with the same sequence numbers.  (If one is
                # applied here later, it is decoded from the log like any other.)
                proposals, self._proposals = self._proposals, defaultdict(deque)
                for waiters in proposals.values():
                    for waiter in waiters:
                        waiter.fail(self.not_leader())
        elif isinstance(notice, ProposalsDropped):
            for data in notice.commands:
                for waiter in self._proposals.pop(data, ()):
                    waiter.fail(self.not_leader())
        elif isinstance(notice, ReadsFailed):
            for read_id in notice.read_ids:
                failed = self._reads.pop(read_id, None)
                if failed is not None:
                    failed.fail(self.not_leader())
        elif isinstance(notice, SteppedDown):
            log.info("stepped down from ballot %s: %s", notice.ballot, notice.reason.name)
        elif isinstance(notice, MembershipCommitted):
            log.info(
                "membership %s chosen at slot %d, in force from slot %d",
                notice.membership,
                notice.entry_slot,
                notice.effective_slot,
            )

    # ------------------------------------------------------------ snapshots

    async def _install(self, meta: SnapshotMeta, blob: bytes) -> None:
        """Replace the namespace with a peer's snapshot and make it durable."""
        await self._snapshot_task_done.wait()
        _meta, namespace_bytes, group = decode_snapshot(blob)
        self.namespace = Namespace.restore(namespace_bytes)
        self.group = group
        self._link_group()
        self._backlog.clear()
        self.applied_index = meta.index
        self._release_reads()
        await self._storage.save_snapshot(meta.index, blob)
        self._snapshot_blob = blob
        self._snapshot_index = meta.index
        log.info("installed snapshot at slot %d from a peer (%d bytes)", meta.index, len(blob))

    async def _after_advance(self) -> None:
        """Between ``advance()`` and the next ``ready()``: finish or start a snapshot."""
        if len(self._backlog) > self._options.apply_backlog_slots_max:
            await self._serialised.wait()
            self._drain_backlog()
        saved, self._snapshot_saved = self._snapshot_saved, None
        if saved is not None and saved[0].index > self._snapshot_index:
            meta, blob = saved
            self.node.snapshot_saved(meta, len(blob))
            self._snapshot_blob = blob
            self._snapshot_index = meta.index
            self._compaction_due = True
        if self._compaction_due:
            records = self.node.compacted_records()
            if records is not None:
                self._compaction_due = False
                payloads = [encode_record(r) for r in records]
                heard = HeardFromRecord(tuple(sorted(self._heard_submitted)))
                payloads.append(encode_record(heard))
                await self._storage.compact(payloads)
            return
        if (
            self._snapshot_task_done.is_set()
            and not self._backlog
            and self.applied_index - self._snapshot_index >= self._options.snapshot_interval_entries
            and self._nursery is not None
        ):
            meta = self.node.snapshot_meta(Slot(self.applied_index))
            self._snapshot_task_done = trio.Event()
            self._serialising = True
            self._serialised = trio.Event()
            self._nursery.start_soon(self._take_snapshot, meta)

    async def _take_snapshot(self, meta: SnapshotMeta) -> None:
        """Serialise in a thread (applies wait meanwhile), save, and hand the result to
        the driver, which tells the core and compacts the log."""
        started = time.monotonic()
        started_at = trio.current_time()
        namespace, group = self.namespace, self.group
        try:
            try:
                blob = await trio.to_thread.run_sync(
                    lambda: encode_snapshot(meta, namespace.snapshot(), group),
                    abandon_on_cancel=True,
                )
            finally:
                self._serialising = False
                self._serialised.set()
                self._kick()
            serialised_s = time.monotonic() - started
            self.snapshot_serialised_at = (started_at, trio.current_time())
            await self._storage.save_snapshot(meta.index, blob)
            self._snapshot_saved = (meta, blob)
            self.snapshots_taken += 1
        finally:
            self._snapshot_task_done.set()
            self._kick()
        log.info(
            "snapshot at slot %d (%d bytes): serialised in %.2f s, saved in %.2f s",
            meta.index,
            len(blob),
            serialised_s,
            time.monotonic() - started - serialised_s,
        )
