"""One metaserver replica: the Paxos core, the namespace and the disk, driven by trio.

This is the owner of :class:`~metaserver.paxos.PaxosNode` described in
:mod:`metaserver.paxos.ready`.  Inputs (peer messages, ticks, proposals, read
requests) go straight into the core, which only queues outputs; one driver task
takes each Ready and does what it asks, in order:

1. install a snapshot received from a peer, durably;
2. append the records and wait for their fsync (group commit: every proposal
   that arrived during the previous fsync rides in this one);
3. only then hand the messages to the peer links (a promise or a vote never
   leaves before it is on disk);
4. apply the committed commands to the namespace and wake whoever waits for
   each reply; then release the reads that became safe;
5. answer snapshot reads, act on notices, ``advance()``.

Periodic snapshots and log compaction happen between ``advance()`` and the next
``ready()``, as the core requires.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from metaserver.codec import decode_snapshot, encode_record, encode_snapshot
from metaserver.namespace import Namespace, decode_command, encode_command
from metaserver.paxos import (
    CommittedEntry,
    EntryKind,
    LeaderChanged,
    NodeId,
    PaxosNode,
    ProposalsDropped,
    ProposeResult,
    ReadId,
    ReadResult,
    ReadsFailed,
    Ready,
    Role,
    SnapshotMeta,
)
from metaserver.storage import MetaStorage
from wire import schema
from wire.errors import NOT_LEADER, RpcError
from wire.namespace_ops import Command, Reply

log = logging.getLogger(__name__)

TICK_INTERVAL_MS = 10


@dataclass(frozen=True)
class ReplicaOptions:
    snapshot_interval_entries: int = 100_000
    """Applied slots between snapshots (each snapshot also compacts the log)."""


class _Waiter:
    """A task waiting for one outcome (a reply, or an error) from the driver."""

    __slots__ = ("_event", "outcome", "error")

    def __init__(self) -> None:
        self._event = trio.Event()
        self.outcome: Any = None
        self.error: RpcError | None = None

    def resolve(self, outcome: Any) -> None:
        if not self._event.is_set():
            self.outcome = outcome
            self._event.set()

    def fail(self, error: RpcError) -> None:
        if not self._event.is_set():
            self.error = error
            self._event.set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self.error is not None:
            raise self.error
        return self.outcome


MessageSink = Callable[[NodeId, list[Any]], None]
LeaderHint = Callable[[NodeId | None], str]


class Replica:
    """A running replica; see the module docstring for the Ready loop it drives."""

    def __init__(
        self,
        node: PaxosNode,
        namespace: Namespace,
        storage: MetaStorage,
        send_messages: MessageSink,
        leader_address: LeaderHint,
        options: ReplicaOptions,
        snapshot_blob: bytes | None,
    ) -> None:
        self.node = node
        self.namespace = namespace
        self._storage = storage
        self._send_messages = send_messages
        self._leader_address = leader_address
        self._options = options
        self._snapshot_blob = snapshot_blob
        self._snapshot_index = node.snapshot_index
        self._proposals: dict[bytes, deque[_Waiter]] = defaultdict(deque)
        self._reads: dict[ReadId, _Waiter] = {}
        self._next_read_id = 0
        self._kicked = trio.Event()
        self.leader_epoch = 0
        """Grows at every leader change this replica sees (cluster-manager epochs)."""
        self.leader_changed = trio.Event()
        """Set (and replaced) whenever the leader changes."""
        self.applied_commands = 0

    # ------------------------------------------------------------ time

    @staticmethod
    def now_ms() -> int:
        return int(trio.current_time() * 1000)

    # ------------------------------------------------------------ inputs

    def deliver(self, messages: tuple[Any, ...]) -> None:
        """Step peer messages into the core (the driver sends whatever they cause)."""
        now = self.now_ms()
        for message in messages:
            self.node.step(message, now)
        self._kick()

    def _kick(self) -> None:
        self._kicked.set()

    @property
    def is_leader(self) -> bool:
        return self.node.role == Role.LEADER

    def not_leader(self) -> RpcError:
        """The redirect error: its message is the leader's address, or empty."""
        leader = self.node.leader_id
        hint = "" if leader is None or leader == self.node.node_id else self._leader_address(leader)
        return RpcError(NOT_LEADER, hint)

    async def submit(self, command: Command) -> Reply:
        """Propose ``command`` and return the namespace's reply once it is applied here.

        Raises ``RpcError(NOT_LEADER)`` when this replica cannot propose (the
        client retries at the leader with the same sequence number).
        """
        data = encode_command(command)
        result = self.node.propose(data)
        if result == ProposeResult.NOT_LEADER:
            raise self.not_leader()
        if result == ProposeResult.QUEUE_FULL:
            raise RpcError(errno.EAGAIN, "metaserver proposal queue is full; retry")
        if result == ProposeResult.TOO_LARGE:
            raise RpcError(errno.E2BIG, "command too large")
        waiter = _Waiter()
        waiters = self._proposals[data]
        waiters.append(waiter)
        self._kick()
        try:
            reply: Reply = await waiter.wait()
            return reply
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._proposals.pop(data, None)

    async def confirm_read(self) -> None:
        """Return once the applied state may answer a linearizable read (read-index)."""
        self._next_read_id += 1
        read_id = ReadId(self._next_read_id)
        result = self.node.request_read(read_id, self.now_ms())
        if result == ReadResult.NOT_LEADER:
            raise self.not_leader()
        if result == ReadResult.BUSY:
            raise RpcError(errno.EAGAIN, "too many reads pending; retry")
        waiter = _Waiter()
        self._reads[read_id] = waiter
        self._kick()
        try:
            await waiter.wait()
        finally:
            self._reads.pop(read_id, None)

    # ------------------------------------------------------------ the driver

    async def run(self) -> None:
        """Tick the core and drive its Ready loop until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick_loop)
            await self._drive()

    async def _tick_loop(self) -> None:
        while True:
            await trio.sleep(TICK_INTERVAL_MS / 1000)
            self.node.tick(self.now_ms())
            self._kick()

    async def _drive(self) -> None:
        while True:
            await self._kicked.wait()
            self._kicked = trio.Event()
            while self.node.has_ready():
                ready = self.node.ready()
                await self._handle(ready)
                self.node.advance(ready)
                await self._maybe_snapshot()

    async def _handle(self, ready: Ready) -> None:
        if ready.snapshot_install is not None:
            await self._install(ready.snapshot_install.meta, ready.snapshot_install.data)
        if ready.records:
            ticket = await self._storage.submit([encode_record(r) for r in ready.records])
            await ticket.wait_durable()
        if ready.messages:
            by_peer: dict[NodeId, list[Any]] = defaultdict(list)
            for outbound in ready.messages:
                by_peer[outbound.to].append(outbound.message)
            for peer, messages in by_peer.items():
                self._send_messages(peer, messages)
        for entry in ready.committed:
            self._apply(entry)
        for read in ready.reads:
            waiter = self._reads.get(read.read_id)
            if waiter is not None:
                waiter.resolve(read.index)
        for snapshot_read in ready.snapshot_reads:
            blob = self._snapshot_blob
            data = None
            if blob is not None and snapshot_read.index == self._snapshot_index:
                data = blob[snapshot_read.offset : snapshot_read.offset + snapshot_read.length]
            self.node.snapshot_read_done(snapshot_read, data)
        for notice in ready.notices:
            self._on_notice(notice)

    def _apply(self, entry: CommittedEntry) -> None:
        if entry.kind != EntryKind.COMMANDS:
            return
        for data in entry.commands:
            try:
                command = decode_command(data)
            except schema.SchemaError as error:
                # Every replica skips the same bytes, so state stays identical.
                log.error("slot %d holds an undecodable command: %s", entry.slot, error)
                reply: Any = RpcError(errno.EPROTO, "undecodable command")
            else:
                reply = self.namespace.apply(command)
                self.applied_commands += 1
            waiters = self._proposals.get(data)
            if waiters:
                waiter = waiters.popleft()
                if isinstance(reply, RpcError):
                    waiter.fail(reply)
                else:
                    waiter.resolve(reply)

    def _on_notice(self, notice: Any) -> None:
        if isinstance(notice, LeaderChanged):
            self.leader_epoch += 1
            self.leader_changed.set()
            self.leader_changed = trio.Event()
            log.info("leader is now %s (ballot %s)", notice.leader, notice.ballot)
        elif isinstance(notice, ProposalsDropped):
            for data in notice.commands:
                for waiter in self._proposals.pop(data, ()):
                    waiter.fail(self.not_leader())
        elif isinstance(notice, ReadsFailed):
            for read_id in notice.read_ids:
                waiter = self._reads.get(read_id)
                if waiter is not None:
                    waiter.fail(self.not_leader())

    # ------------------------------------------------------------ snapshots

    async def _install(self, meta: SnapshotMeta, blob: bytes) -> None:
        """Replace the namespace with a peer's snapshot and make it durable."""
        _meta, namespace_bytes = decode_snapshot(blob)
        self.namespace = Namespace.restore(namespace_bytes)
        await self._storage.save_snapshot(meta.index, blob)
        self._snapshot_blob = blob
        self._snapshot_index = meta.index
        log.info("installed snapshot at slot %d from a peer", meta.index)

    async def _maybe_snapshot(self) -> None:
        applied = self.node.applied_index
        if applied - self._snapshot_index < self._options.snapshot_interval_entries:
            return
        started = time.monotonic()
        meta = self.node.snapshot_meta(applied)
        blob = encode_snapshot(meta, self.namespace.snapshot())
        await self._storage.save_snapshot(meta.index, blob)
        self.node.snapshot_saved(meta, len(blob))
        self._snapshot_blob = blob
        self._snapshot_index = meta.index
        await self._storage.compact([encode_record(r) for r in self.node.compacted_records()])
        log.info(
            "snapshot at slot %d (%d bytes) in %.2f s; log compacted",
            meta.index,
            len(blob),
            time.monotonic() - started,
        )
