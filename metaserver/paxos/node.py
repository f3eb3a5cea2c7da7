"""One Multi-Paxos replica as a pure state machine (sans-IO).

Rules of this file (after h11's ``_state.py``):

1. No I/O, no clock, no randomness of its own: time arrives as ``now_ms`` and random
   numbers come from the injected ``rng``. The same inputs give the same outputs.
2. Nothing leaves before it is durable. A promise or a vote is recorded in the same
   Ready as the message that reveals it, and the owner sends messages only after the
   records are durable. Replies to *this* replica (its own promise, its own vote) are
   held back and delivered in ``advance()``, after the owner's fsync: the leader counts
   its own vote only once it is on disk.
3. A slot is chosen when a quorum of the membership governing that slot voted for the
   same ballot. A replica applies only chosen values: its own vote counts as the
   chosen value only when it carries the ballot named by the commit news
   ("Paxos Made Live", section 5; PITFALLS.md).
4. The membership introduced at slot ``i`` governs slots from ``i + window_slots``;
   a leader proposes only within ``window_slots`` of its commit index, so it always
   knows the quorum of every slot it proposes in ("Paxos Made Simple", section 3).
5. Phase 1 covers the whole open suffix; before proposing in a slot the leader holds
   complete promises from a quorum of that slot's membership and proposes the value
   of the highest ballot they reported, or a no-op in a hole.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from metaserver.paxos import _quorum
from metaserver.paxos._invariant import invariant
from metaserver.paxos._log import ConfigHistory, LogSlot, SlotLog
from metaserver.paxos.messages import (
    Accept,
    Accepted,
    AcceptedSlot,
    CatchupReply,
    CatchupRequest,
    ChosenValue,
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
from metaserver.paxos.options import PaxosOptions, ReadMode
from metaserver.paxos.ready import (
    CommittedEntry,
    GroupStatus,
    LeaderChanged,
    MembershipChange,
    MembershipChangeKind,
    MembershipCommitted,
    MembershipResult,
    Notice,
    Outbound,
    PeerStatus,
    ProposalsDropped,
    ProposeResult,
    ReadReady,
    ReadResult,
    ReadsFailed,
    Ready,
    Role,
    SnapshotInstall,
    SnapshotRead,
    StepDownReason,
    SteppedDown,
)
from metaserver.paxos.records import (
    AcceptedRecord,
    ChosenRecord,
    CommitRecord,
    PromiseRecord,
    Record,
)
from metaserver.paxos.types import (
    NOOP_ENTRY,
    ZERO_BALLOT,
    Ballot,
    Entry,
    EntryKind,
    Membership,
    NodeId,
    ReadId,
    Slot,
    SnapshotMeta,
)


class RandomSource(Protocol):
    """What the core needs of randomness; ``random.Random`` satisfies it."""

    def randrange(self, start: int, stop: int) -> int: ...


@dataclass(slots=True)
class _PromiseProgress:
    """Phase-1 progress of one acceptor: which page to ask for next, and whether done."""

    next_from: Slot
    complete: bool = False


@dataclass(slots=True)
class _InflightSlot:
    entry: Entry
    voters: frozenset[NodeId]
    needed: int
    proposed_ms: int
    acked: set[NodeId] = field(default_factory=set)
    votes: int = 0
    chosen: bool = False


@dataclass(slots=True)
class _PeerProgress:
    last_contact_ms: int
    commit_index: Slot = Slot(0)
    acked_slot: Slot = Slot(0)
    heartbeat_seq: int = 0
    commit_sent: Slot = Slot(0)
    sent_slot: Slot = Slot(0)
    """Highest slot sent to the peer in an Accept at this ballot."""
    accept_sent_ms: int = -(1 << 62)


@dataclass(slots=True)
class _PendingRead:
    read_id: ReadId
    index: Slot
    seq: int


@dataclass(slots=True)
class _LeaderState:
    """Volatile state of a candidate or leader for one ballot."""

    ballot: Ballot
    now_ms: int
    promises: dict[NodeId, _PromiseProgress] = field(default_factory=dict)
    reports: dict[int, LogSlot] = field(default_factory=dict)
    max_reported_slot: Slot = Slot(0)
    max_promiser_commit: Slot = Slot(0)
    max_promiser: NodeId | None = None
    active: bool = False
    """Caught up with every promiser and proposing (``base_slot`` is set)."""
    ready: bool = False
    """Active, and every slot chosen before this ballot is committed: reads may run."""
    base_slot: Slot = Slot(0)
    next_slot: Slot = Slot(0)
    inflight: dict[int, _InflightSlot] = field(default_factory=dict)
    membership_inflight: int = 0
    peers: dict[NodeId, _PeerProgress] = field(default_factory=dict)
    heartbeat_seq: int = 0
    heartbeat_sent_ms: dict[int, int] = field(default_factory=dict)
    heartbeat_due: bool = False
    next_heartbeat_ms: int = 0
    news_due_ms: int | None = None
    """When peers that no Accept or Heartbeat told of the commit index get a lone Commit
    (and lazy voters their held-back slots, if nothing was proposed since)."""
    proposed_ms: int = 0
    """When slots were last proposed."""
    responders: list[NodeId] = field(default_factory=list)
    """Voters whose votes counted towards a quorum, the latest first: the thrifty
    leader sends new slots at once to as many of the first as a quorum needs (then to
    those that promised this ballot)."""
    next_prepare_retry_ms: int = 0
    lease_expires_ms: int | None = None


@dataclass(slots=True)
class _Catchup:
    source: NodeId
    from_slot: Slot
    sent_ms: int


@dataclass(slots=True)
class _Transfer:
    source: NodeId
    meta: SnapshotMeta
    size_bytes: int
    parts: list[bytes]
    received_bytes: int
    progress_ms: int
    requested_ms: int


class PaxosNode:
    """A replica of a Multi-Paxos group, driven by its owner.

    Construct it from the latest snapshot (``initial_snapshot_meta`` for a founding
    replica of a new group; ``None`` for a brand-new replica that will be added as a
    learner) and the records persisted since, in order. Then feed it ``step``,
    ``tick``, ``propose``, ``request_read``; take ``ready()``; call ``advance()``.
    """

    def __init__(
        self,
        *,
        node_id: NodeId,
        options: PaxosOptions,
        rng: RandomSource,
        now_ms: int,
        snapshot: SnapshotMeta | None,
        snapshot_size_bytes: int = 0,
        records: Iterable[Record] = (),
    ) -> None:
        invariant(node_id > 0, "node ids are positive")
        self._id = node_id
        self._options = options
        self._rng = rng
        self._now_ms = now_ms
        self._announce = False

        # Outputs.
        self._out_records: list[Record] = []
        self._out_messages: list[Outbound] = []
        self._out_notices: list[Notice] = []
        self._out_install: SnapshotInstall | None = None
        self._out_snapshot_reads: list[SnapshotRead] = []
        self._self_next: list[Message] = []
        self._self_bound: list[Message] = []
        self._outstanding = False

        # Elections.
        self._role = Role.FOLLOWER
        self._leader: NodeId | None = None
        self._leader_ballot: Ballot | None = None
        self._leader_contact_ms: int | None = None
        self._backoff_level = 0
        self._timeout_draw_ms = self._draw_timeout()
        self._election_deadline_ms = now_ms + self._timeout_draw_ms
        # A restarted replica may have granted a lease it no longer remembers: it keeps
        # that promise for a full lease before supporting anyone else.
        lease_mode = options.read_mode == ReadMode.LEASE
        self._lease_block_until_ms = now_ms + options.lease_ms if lease_mode else now_ms
        self._probe_id = 0
        self._probe_grants: set[NodeId] = set()
        self._ls: _LeaderState | None = None

        # Catch-up.
        self._catchup: _Catchup | None = None
        self._transfer: _Transfer | None = None
        self._commit_hint = Slot(0)
        """The highest commit index a leader announced: how far catch-up should go."""
        self._snapshot_reads_pending = 0

        # Proposals and reads.
        self._queue: deque[bytes] = deque()
        self._queue_bytes = 0
        self._membership_queued: Membership | None = None
        self._reads_waiting: deque[ReadId] = deque()
        self._reads_pending: deque[_PendingRead] = deque()
        self._reads_confirmed: deque[ReadReady] = deque()

        # Acceptor and log, rebuilt from the snapshot and the records.
        self._promised = ZERO_BALLOT
        self._snapshot = snapshot
        self._snapshot_size_bytes = snapshot_size_bytes if snapshot is not None else 0
        floor = snapshot.index if snapshot is not None else 0
        self._log = SlotLog(Slot(floor + 1))
        self._commit = Slot(floor)
        self._applied = Slot(floor)
        self._configs = ConfigHistory(snapshot.configs) if snapshot is not None else None
        replayed_commit = self._replay(records, Slot(floor))
        for slot in range(floor + 1, replayed_commit + 1):
            invariant(self._log.get(slot) is not None, f"records lack committed slot {slot}")
        self._commit_through(replayed_commit)
        self._recorded_commit = self._commit
        self._max_round_seen = self._promised.round
        self._announce = True

        self._handlers: dict[type, Callable[[Any], None]] = {
            ProbeRequest: self._on_probe_request,
            ProbeReply: self._on_probe_reply,
            Prepare: self._on_prepare,
            Promise: self._on_promise,
            Nack: self._on_nack,
            Accept: self._on_accept,
            Accepted: self._on_accepted,
            Commit: self._on_commit,
            Heartbeat: self._on_heartbeat,
            HeartbeatAck: self._on_heartbeat_ack,
            CatchupRequest: self._on_catchup_request,
            CatchupReply: self._on_catchup_reply,
            SnapshotOffer: self._on_snapshot_offer,
            SnapshotChunkRequest: self._on_snapshot_chunk_request,
            SnapshotChunk: self._on_snapshot_chunk,
        }

    # ------------------------------------------------------------------ accessors

    @property
    def node_id(self) -> NodeId:
        return self._id

    @property
    def options(self) -> PaxosOptions:
        return self._options

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader_id(self) -> NodeId | None:
        """The leader this replica follows (itself when leading), if any."""
        return self._leader

    @property
    def promised(self) -> Ballot:
        return self._promised

    @property
    def commit_index(self) -> Slot:
        return self._commit

    @property
    def applied_index(self) -> Slot:
        """Last slot handed out in ``Ready.committed`` (or installed by snapshot)."""
        return self._applied

    @property
    def snapshot_index(self) -> Slot:
        return self._snapshot.index if self._snapshot is not None else Slot(0)

    def membership(self) -> Membership | None:
        """The membership governing the next slot to commit, if known."""
        return self._configs.for_slot(self._commit + 1) if self._configs is not None else None

    def is_leader_ready(self) -> bool:
        """Leading, and every slot chosen before this ballot is committed here."""
        return self._role == Role.LEADER and self._ls is not None and self._ls.ready

    def lease_valid(self, now_ms: int) -> bool:
        """True when this replica may serve a read from its state without a round trip."""
        ls = self._ls
        return (
            self._options.read_mode == ReadMode.LEASE
            and self._role == Role.LEADER
            and ls is not None
            and ls.ready
            and ls.lease_expires_ms is not None
            and now_ms < ls.lease_expires_ms
        )

    # ------------------------------------------------------------------ driving

    def step(self, message: Message, now_ms: int) -> None:
        """Feed one message received from a peer (``message.sender``)."""
        self._observe(now_ms)
        invariant(message.sender != self._id, "the owner never loops messages back")
        handler = self._handlers.get(type(message))
        invariant(handler is not None, f"not a Paxos message: {type(message).__name__}")
        assert handler is not None
        handler(message)

    def tick(self, now_ms: int) -> None:
        """Let time pass: elections, heartbeats, retransmissions, quorum checks."""
        self._observe(now_ms)
        if self._role == Role.LEADER:
            self._leader_tick()
        elif self._role == Role.PREPARING:
            ls = self._ls
            assert ls is not None
            if now_ms >= self._election_deadline_ms:
                self._step_down(StepDownReason.ELECTION_FAILED)
            elif now_ms >= ls.next_prepare_retry_ms:
                self._retry_prepares()
        elif now_ms >= self._election_deadline_ms:
            self._start_probe()
        self._catchup_tick()

    def campaign(self, now_ms: int) -> bool:
        """Start phase 1 at once, skipping the probe (leadership transfer, tests).

        Returns False, doing nothing, when this replica already leads, is not a voter,
        or still honours a lease it granted (it may not promise a new ballot yet).
        """
        self._observe(now_ms)
        if self._role == Role.LEADER or not self._is_voter() or now_ms < self._lease_block_until_ms:
            return False
        if self._ls is not None:
            self._step_down(StepDownReason.ELECTION_FAILED)
        self._start_phase1()
        return True

    def propose(self, command: bytes) -> ProposeResult:
        """Queue an opaque command; it is batched into a slot when ``ready()`` runs.

        OK means queued at the leader, not committed: the command shows up in
        ``Ready.committed`` on success, or in a ``ProposalsDropped`` notice if it never
        got a slot. A command that got a slot may still be lost to a leader change; the
        owner de-duplicates retries (client id, sequence) in its state machine.
        """
        if self._role != Role.LEADER:
            return ProposeResult.NOT_LEADER
        if len(command) > self._options.command_bytes_max:
            return ProposeResult.TOO_LARGE
        if (
            len(self._queue) >= self._options.queue_commands_max
            or self._queue_bytes + len(command) > self._options.queue_bytes_max
        ):
            return ProposeResult.QUEUE_FULL
        self._queue.append(command)
        self._queue_bytes += len(command)
        return ProposeResult.OK

    def request_read(self, read_id: ReadId, now_ms: int) -> ReadResult:
        """Ask for a linearizable read; it comes back as a ``ReadReady`` in a Ready, or
        in a ``ReadsFailed`` notice if leadership is lost first."""
        self._observe(now_ms)
        ls = self._ls
        if self._role != Role.LEADER or ls is None:
            return ReadResult.NOT_LEADER
        outstanding = (
            len(self._reads_waiting) + len(self._reads_pending) + len(self._reads_confirmed)
        )
        if outstanding >= self._options.reads_pending_max:
            return ReadResult.BUSY
        if not ls.ready:
            self._reads_waiting.append(read_id)
        else:
            self._start_read(read_id)
        return ReadResult.OK

    def change_membership(self, change: MembershipChange) -> MembershipResult:
        """Propose one membership change through the log (one at a time).

        A new replica is added as a learner, promoted once it is within
        ``learner_lag_slots_max`` of the commit index, and its id never reused after it
        leaves. The change governs slots ``window_slots`` after the slot it is chosen in.
        """
        ls = self._ls
        if self._role != Role.LEADER or ls is None or not ls.ready:
            return MembershipResult.NOT_LEADER
        assert self._configs is not None
        if (
            self._membership_queued is not None
            or ls.membership_inflight > 0
            or self._configs.pending(self._commit) is not None
        ):
            return MembershipResult.CHANGE_IN_PROGRESS
        current = self._configs.for_slot(self._commit + 1)
        result, proposed = self._changed_membership(current, change)
        if proposed is not None:
            self._membership_queued = proposed
        return result

    # ------------------------------------------------------------------ the Ready loop

    def has_ready(self) -> bool:
        """Whether ``ready()`` would hand out anything."""
        self._prepare_outputs()
        return self._has_outputs()

    def has_ready_besides_proposals(self) -> bool:
        """Like :meth:`has_ready`, but leaves queued proposals in the queue: the check an
        owner makes after a step or tick, when the Ready loop that takes them may still
        be busy. Slots made then would carry only what was queued so far, where the
        loop's next ``ready()`` batches everything queued by then."""
        self._prepare_outputs(propose=False)
        return self._has_outputs()

    def _has_outputs(self) -> bool:
        return bool(
            self._out_records
            or self._out_messages
            or self._out_notices
            or self._out_install is not None
            or self._out_snapshot_reads
            or self._self_next
            or self._applied < self._commit
            or self._commit > self._recorded_commit
            or (self._reads_confirmed and self._reads_confirmed[0].index <= self._applied)
        )

    def ready(self) -> Ready:
        """Take what the owner must do now (see :mod:`metaserver.paxos.ready`)."""
        invariant(not self._outstanding, "advance() the previous Ready first")
        self._prepare_outputs()
        if self._commit > self._recorded_commit:
            self._out_records.append(CommitRecord(self._commit))
            self._recorded_commit = self._commit
        committed: list[CommittedEntry] = []
        upto = min(self._commit, self._applied + self._options.apply_slots_max)
        for slot in range(self._applied + 1, upto + 1):
            vote = self._log.get(slot)
            invariant(vote is not None, f"committed slot {slot} missing from the log")
            assert vote is not None
            entry = vote.entry
            committed.append(
                CommittedEntry(Slot(slot), entry.kind, entry.commands, entry.membership)
            )
        self._applied = Slot(max(self._applied, upto))
        reads: list[ReadReady] = []
        while self._reads_confirmed and self._reads_confirmed[0].index <= self._applied:
            reads.append(self._reads_confirmed.popleft())
        result = Ready(
            records=tuple(self._out_records),
            messages=tuple(self._out_messages),
            committed=tuple(committed),
            snapshot_install=self._out_install,
            snapshot_reads=tuple(self._out_snapshot_reads),
            reads=tuple(reads),
            notices=tuple(self._out_notices),
        )
        self._out_records = []
        self._out_messages = []
        self._out_notices = []
        self._out_install = None
        self._out_snapshot_reads = []
        self._self_bound = self._self_next
        self._self_next = []
        self._outstanding = True
        return result

    def advance(self, ready: Ready) -> None:
        """The owner did everything ``ready`` asked: its records are durable.

        Replies this replica addressed to itself while producing ``ready`` (its own
        promise and votes) take effect now, after its own fsync.
        """
        invariant(self._outstanding, "advance() without an outstanding Ready")
        self._outstanding = False
        bound, self._self_bound = self._self_bound, []
        for message in bound:
            handler = self._handlers[type(message)]
            handler(message)

    # ------------------------------------------------------------------ snapshots

    def snapshot_meta(self, index: Slot) -> SnapshotMeta:
        """The metadata to store with an owner snapshot of the state at ``index``
        (any applied slot at or above the current snapshot)."""
        invariant(self._configs is not None, "no membership known yet")
        assert self._configs is not None
        invariant(
            self.snapshot_index <= index <= self._applied,
            f"snapshot index {index} outside [{self.snapshot_index}, {self._applied}]",
        )
        return self._configs.meta_for(index)

    def snapshot_saved(self, meta: SnapshotMeta, size_bytes: int) -> None:
        """The owner durably saved a snapshot: the log below it may go.

        Entries up to ``log_retain_slots`` below the snapshot stay in memory so that
        slightly lagging peers catch up from the log rather than by transfer.
        """
        invariant(meta.index <= self._applied, "snapshot beyond the applied index")
        if meta.index <= self.snapshot_index and self._snapshot is not None:
            return
        self._snapshot = meta
        self._snapshot_size_bytes = size_bytes
        self._log.discard_through(meta.index - self._options.log_retain_slots)
        if self._configs is not None:
            self._configs.prune_through(meta.index)

    def snapshot_read_done(self, read: SnapshotRead, data: bytes | None) -> None:
        """Answer a ``SnapshotRead`` of an earlier Ready (``None``: snapshot gone)."""
        self._snapshot_reads_pending = max(0, self._snapshot_reads_pending - 1)
        snapshot = self._snapshot
        if snapshot is None:
            return
        if data is None or read.index != snapshot.index:
            self._send(read.to, SnapshotOffer(self._id, snapshot, self._snapshot_size_bytes))
            return
        invariant(len(data) == read.length, "snapshot read returned the wrong length")
        self._send(
            read.to,
            SnapshotChunk(self._id, snapshot, read.offset, data, self._snapshot_size_bytes),
        )

    def compacted_records(self) -> tuple[Record, ...] | None:
        """The smallest record sequence that rebuilds this replica with its snapshot.

        After ``snapshot_saved`` the owner may atomically replace its record log with
        these. Returns ``None`` (try again after the next ``advance()``) while a Ready is
        outstanding or a snapshot install is on its way to the owner: the records must
        not get ahead of the owner's durable snapshot.
        """
        if self._outstanding or self._out_install is not None:
            return None
        floor = self.snapshot_index
        records: list[Record] = [PromiseRecord(self._promised)]
        chosen_first: Slot | None = None
        chosen: list[ChosenValue] = []
        run_first: Slot | None = None
        run_ballot = ZERO_BALLOT
        run: list[Entry] = []
        expected = floor + 1
        for slot, vote in self._log.items_from(floor + 1):
            if slot <= self._commit:
                if chosen_first is None:
                    chosen_first = slot
                chosen.append(ChosenValue(vote.ballot, vote.entry))
                continue
            if run and (vote.ballot != run_ballot or slot != expected):
                assert run_first is not None
                records.append(AcceptedRecord(run_ballot, run_first, tuple(run)))
                run = []
            if not run:
                run_first, run_ballot = slot, vote.ballot
            run.append(vote.entry)
            expected = slot + 1
        if chosen_first is not None:
            records.append(ChosenRecord(chosen_first, tuple(chosen)))
        if run:
            assert run_first is not None
            records.append(AcceptedRecord(run_ballot, run_first, tuple(run)))
        if self._commit > floor:
            records.append(CommitRecord(self._commit))
        return tuple(records)

    def status(self) -> GroupStatus:
        """This replica's view of the group, for admin tools."""
        ls = self._ls
        peers: list[PeerStatus] = []
        if ls is not None and self._role == Role.LEADER and self._configs is not None:
            voters: set[NodeId] = set()
            for membership in self._configs.relevant(self._commit):
                voters.update(membership.voters)
            for node in self._targets():
                peer = ls.peers.get(node)
                peers.append(
                    PeerStatus(
                        node=node,
                        voter=node in voters,
                        match_index=Slot(max(peer.commit_index, peer.acked_slot))
                        if peer
                        else Slot(0),
                        last_contact_ms=peer.last_contact_ms if peer else None,
                    )
                )
        pending = self._configs.pending(self._commit) if self._configs is not None else None
        return GroupStatus(
            node_id=self._id,
            role=self._role,
            leader_id=self._leader,
            promised=self._promised,
            leader_ballot=self._leader_ballot,
            commit_index=self._commit,
            applied_index=self._applied,
            snapshot_index=self.snapshot_index,
            log_first_slot=self._log.first_slot,
            log_last_slot=self._log.last_slot,
            membership=self.membership(),
            pending_membership=pending,
            queued_commands=len(self._queue),
            lease_expires_at_ms=ls.lease_expires_ms if ls is not None else None,
            peers=tuple(peers),
        )

    # ------------------------------------------------------------------ recovery

    def _replay(self, records: Iterable[Record], floor: Slot) -> Slot:
        """Rebuild the acceptor from persisted records; returns the recorded commit."""
        commit = floor
        for record in records:
            if isinstance(record, PromiseRecord):
                self._promised = max(self._promised, record.ballot)
            elif isinstance(record, AcceptedRecord):
                self._promised = max(self._promised, record.ballot)
                for offset, entry in enumerate(record.entries):
                    slot = Slot(record.first_slot + offset)
                    if slot > floor:
                        self._log.put_if_not_older(slot, LogSlot(record.ballot, entry))
            elif isinstance(record, ChosenRecord):
                for offset, value in enumerate(record.values):
                    slot = Slot(record.first_slot + offset)
                    if slot > floor:
                        self._log.put_if_not_older(slot, LogSlot(value.ballot, value.entry))
            elif isinstance(record, CommitRecord):
                commit = Slot(max(commit, record.commit_index))
            else:
                invariant(False, f"unknown record {type(record).__name__}")
        return commit

    # ------------------------------------------------------------------ helpers

    def _observe(self, now_ms: int) -> None:
        invariant(now_ms >= self._now_ms, f"time went backwards: {now_ms} < {self._now_ms}")
        self._now_ms = now_ms

    def _send(self, to: NodeId, message: Message) -> None:
        if to == self._id:
            self._self_next.append(message)
        else:
            self._out_messages.append(Outbound(to, message))

    def _notice(self, notice: Notice) -> None:
        if self._announce:
            self._out_notices.append(notice)

    def _draw_timeout(self) -> int:
        timeout = self._options.election_timeout_ms
        return self._rng.randrange(timeout, 2 * timeout)

    def _is_voter(self) -> bool:
        configs = self._configs
        return configs is not None and self._id in configs.for_slot(self._commit + 1).voters

    def _targets(self) -> tuple[NodeId, ...]:
        """Every other replica in a membership governing the open window."""
        if self._configs is None:
            return ()
        nodes: list[NodeId] = []
        for membership in self._configs.relevant(self._commit):
            for node in membership.members:
                if node != self._id and node not in nodes:
                    nodes.append(node)
        return tuple(nodes)

    def _note_round(self, ballot: Ballot) -> None:
        if ballot.round > self._max_round_seen:
            self._max_round_seen = ballot.round

    def _set_leader(self, leader: NodeId | None, ballot: Ballot | None) -> None:
        if leader != self._leader or ballot != self._leader_ballot:
            self._leader = leader
            self._leader_ballot = ballot
            self._notice(LeaderChanged(leader, ballot))

    def _leader_recently_heard(self) -> bool:
        contact = self._leader_contact_ms
        return contact is not None and self._now_ms - contact < self._options.election_timeout_ms

    # ------------------------------------------------------------------ acceptor

    def _set_promise(self, ballot: Ballot) -> None:
        """Promise ``ballot`` (durably, before any reply that reveals it)."""
        invariant(ballot > self._promised, "promises only ever rise")
        self._promised = ballot
        self._note_round(ballot)
        self._persist_promise(ballot)
        ls = self._ls
        if ls is not None and ls.ballot < ballot:
            self._step_down(StepDownReason.PREEMPTED)

    def _persist_promise(self, ballot: Ballot) -> None:
        self._out_records.append(PromiseRecord(ballot))

    def _promise_page(self, ballot: Ballot, from_slot: Slot) -> Promise:
        """Report votes from ``from_slot`` on (above the commit index), one page."""
        start = max(from_slot, self._commit + 1)
        accepted: list[AcceptedSlot] = []
        more_from: Slot | None = None
        size_bytes = 0
        for slot, vote in self._log.items_from(start):
            size_bytes += vote.entry.size_bytes()
            if len(accepted) >= self._options.promise_entries_max or (
                accepted and size_bytes > self._options.message_bytes_max
            ):
                more_from = slot
                break
            accepted.append(AcceptedSlot(slot, vote.ballot, vote.entry))
        return Promise(self._id, ballot, from_slot, self._commit, tuple(accepted), more_from)

    def _accept_votes(
        self, ballot: Ballot, first_slot: Slot, entries: tuple[Entry, ...]
    ) -> list[tuple[Slot, Slot]]:
        """Vote for ``ballot`` (already checked against the promise); returns the slot
        ranges voted for, after recording what changed.

        Above the commit index every vote is stored. At or below it the slot is chosen:
        a vote is given only for the chosen value itself (or blindly for a slot already
        folded into the snapshot -- any leader whose ballot is not refused proposes the
        chosen value there, and a leader below the chosen ballot is refused by every
        acceptor of the choosing quorum).
        """
        acked: list[tuple[Slot, Slot]] = []
        run_first: Slot | None = None
        run: list[Entry] = []

        def flush_run() -> None:
            nonlocal run_first, run
            if run_first is not None:
                self._persist_votes(ballot, run_first, tuple(run))
            run_first, run = None, []

        def ack(slot: Slot) -> None:
            if acked and acked[-1][1] == slot - 1:
                acked[-1] = (acked[-1][0], slot)
            else:
                acked.append((slot, slot))

        for offset, entry in enumerate(entries):
            slot = Slot(first_slot + offset)
            store = False
            if slot > self._commit:
                store = True
            else:
                vote = self._log.get(slot)
                if vote is None:
                    ack(slot)
                elif vote.entry == entry and ballot >= vote.ballot:
                    store = ballot > vote.ballot
                    ack(slot)
            if store:
                self._log.put(slot, LogSlot(ballot, entry))
                if slot > self._commit:
                    ack(slot)
                if run_first is None or run_first + len(run) != slot:
                    flush_run()
                    run_first = slot
                run.append(entry)
            elif run_first is not None:
                flush_run()
        flush_run()
        return acked

    def _persist_votes(self, ballot: Ballot, first_slot: Slot, entries: tuple[Entry, ...]) -> None:
        self._out_records.append(AcceptedRecord(ballot, first_slot, entries))

    def _vote_is_chosen(self, vote: LogSlot, slot: int, ballot: Ballot, base: Slot) -> bool:
        """Commit news says slots ``base..`` were chosen at ``ballot``: this replica's vote
        holds the chosen value only if it is a vote for that very ballot."""
        return slot >= base and vote.ballot == ballot

    def _learn_commit(self, ballot: Ballot, base: Slot, commit_index: Slot) -> None:
        if commit_index <= self._commit:
            return
        self._commit_hint = max(self._commit_hint, commit_index)
        if self._configs is None:
            self._request_catchup(ballot.node)
            return
        slot = self._commit + 1
        while slot <= commit_index:
            vote = self._log.get(slot)
            if vote is None or not self._vote_is_chosen(vote, slot, ballot, base):
                break
            slot += 1
        if slot - 1 > self._commit:
            self._commit_through(Slot(slot - 1))
        if self._commit < commit_index:
            self._request_catchup(ballot.node)

    def _commit_through(self, new_commit: Slot) -> None:
        """Every slot up to ``new_commit`` now holds its chosen value in the log."""
        if new_commit <= self._commit:
            return
        configs = self._configs
        invariant(configs is not None, "commit without a known membership")
        assert configs is not None
        ls = self._ls
        for slot in range(self._commit + 1, new_commit + 1):
            vote = self._log.get(slot)
            invariant(vote is not None, f"committing slot {slot} with no value")
            assert vote is not None
            membership = vote.entry.membership
            if membership is not None:
                epoch = configs.add(Slot(slot), membership, self._options.window_slots)
                self._notice(
                    MembershipCommitted(epoch.entry_slot, epoch.effective_slot, membership)
                )
            if ls is not None:
                ls.reports.pop(slot, None)
        self._commit = new_commit
        transfer = self._transfer
        if transfer is not None and transfer.meta.index <= new_commit:
            self._transfer = None
        if ls is not None:
            self._on_leader_commit()

    # ------------------------------------------------------------------ handlers

    def _on_probe_request(self, message: ProbeRequest) -> None:
        granted = (
            self._role != Role.LEADER
            and not self._leader_recently_heard()
            and self._now_ms >= self._lease_block_until_ms
        )
        self._send(message.sender, ProbeReply(self._id, message.probe_id, granted, self._promised))

    def _on_probe_reply(self, message: ProbeReply) -> None:
        self._note_round(message.promised)
        if self._role != Role.PROBING or message.probe_id != self._probe_id or not message.granted:
            return
        self._probe_grants.add(message.sender)
        assert self._configs is not None
        if _quorum.is_quorum(self._configs.for_slot(self._commit + 1).voters, self._probe_grants):
            self._start_phase1()

    def _on_prepare(self, message: Prepare) -> None:
        self._note_round(message.ballot)
        if message.ballot < self._promised:
            self._send(message.sender, Nack(self._id, message.ballot, self._promised))
            return
        if message.ballot > self._promised:
            if self._now_ms < self._lease_block_until_ms:
                return  # a lease we granted is running: support no one else yet
            self._set_promise(message.ballot)
            self._set_leader(None, None)
            if self._role == Role.PROBING:
                self._role = Role.FOLLOWER
        # A candidate we promised is as good as a live leader while its phase 1 makes
        # progress: do not start or support a rival election that would preempt it.
        self._leader_contact_ms = self._now_ms
        if self._role == Role.FOLLOWER:
            self._election_deadline_ms = self._now_ms + self._timeout_draw_ms
        self._send(message.sender, self._promise_page(message.ballot, message.from_slot))

    def _on_promise(self, message: Promise) -> None:
        ls = self._ls
        if ls is None or message.ballot != ls.ballot:
            return
        progress = ls.promises.get(message.sender)
        if progress is None or progress.complete or message.from_slot != progress.next_from:
            return
        if message.sender != self._id:
            self._peer(message.sender).last_contact_ms = self._now_ms
        for report in message.accepted:
            self._merge_report(ls, report)
        if message.commit_index > ls.max_promiser_commit:
            ls.max_promiser_commit = message.commit_index
            ls.max_promiser = message.sender
        if message.more_from is not None:
            progress.next_from = message.more_from
            self._send(message.sender, Prepare(self._id, ls.ballot, message.more_from))
        else:
            progress.complete = True
        if self._role == Role.PREPARING:
            # Phase 1 fails only when it stops making progress: a long open suffix
            # takes many pages, each a round trip.
            self._election_deadline_ms = max(
                self._election_deadline_ms, self._now_ms + self._timeout_draw_ms
            )
            self._check_phase1_complete()
        elif self._role == Role.LEADER:
            if ls.active and message.commit_index > self._commit:
                # Slots were chosen that this leader has not proposed and cannot fetch
                # without breaking "slots from base on are chosen at my ballot".
                self._step_down(StepDownReason.LAGGING)
                return
            self._leader_check_progress()

    def _merge_report(self, ls: _LeaderState, report: AcceptedSlot) -> None:
        if report.slot <= self._commit:
            return
        current = ls.reports.get(report.slot)
        if current is None or report.ballot > current.ballot:
            ls.reports[report.slot] = LogSlot(report.ballot, report.entry)
        if report.slot > ls.max_reported_slot:
            ls.max_reported_slot = report.slot

    def _on_nack(self, message: Nack) -> None:
        self._note_round(message.promised)
        ls = self._ls
        if ls is not None and message.rejected == ls.ballot and message.promised > ls.ballot:
            self._step_down(StepDownReason.PREEMPTED)

    def _on_accept(self, message: Accept) -> None:
        self._note_round(message.ballot)
        if message.ballot < self._promised:
            self._send(message.sender, Nack(self._id, message.ballot, self._promised))
            return
        if message.ballot > self._promised:
            self._set_promise(message.ballot)
        self._heard_leader(message.sender, message.ballot)
        acked = self._accept_votes(message.ballot, message.first_slot, message.entries)
        self._learn_commit(message.ballot, message.commit_base, message.commit_index)
        for first, last in acked:
            self._send(
                message.sender, Accepted(self._id, message.ballot, first, last, self._commit)
            )

    def _on_commit(self, message: Commit) -> None:
        self._note_round(message.ballot)
        if message.ballot < self._promised:
            self._send(message.sender, Nack(self._id, message.ballot, self._promised))
            return
        self._heard_leader(message.sender, message.ballot)
        self._learn_commit(message.ballot, message.commit_base, message.commit_index)

    def _on_heartbeat(self, message: Heartbeat) -> None:
        self._note_round(message.ballot)
        if message.ballot < self._promised:
            self._send(message.sender, Nack(self._id, message.ballot, self._promised))
            return
        self._heard_leader(message.sender, message.ballot)
        if self._options.read_mode == ReadMode.LEASE:
            self._lease_block_until_ms = max(
                self._lease_block_until_ms, self._now_ms + self._options.lease_ms
            )
        self._learn_commit(message.ballot, message.commit_base, message.commit_index)
        self._send(
            message.sender, HeartbeatAck(self._id, message.ballot, message.seq, self._commit)
        )

    def _heard_leader(self, sender: NodeId, ballot: Ballot) -> None:
        ls = self._ls
        if ls is not None and ls.ballot < ballot:
            self._step_down(StepDownReason.HIGHER_BALLOT)
        if self._role == Role.PROBING:
            self._role = Role.FOLLOWER
        self._set_leader(sender, ballot)
        self._leader_contact_ms = self._now_ms
        self._backoff_level = 0
        self._election_deadline_ms = self._now_ms + self._timeout_draw_ms

    def _on_accepted(self, message: Accepted) -> None:
        ls = self._ls
        if ls is None or not ls.active or message.ballot != ls.ballot:
            return
        sender = message.sender
        if sender != self._id:
            peer = self._peer(sender)
            peer.last_contact_ms = self._now_ms
            peer.commit_index = max(peer.commit_index, message.commit_index)
            peer.acked_slot = max(peer.acked_slot, message.last_slot)
        last = min(message.last_slot, ls.next_slot - 1)
        counted = False
        for slot in range(max(message.first_slot, self._commit + 1), last + 1):
            inflight = ls.inflight.get(slot)
            if inflight is None or sender in inflight.acked:
                continue
            inflight.acked.add(sender)
            if sender in inflight.voters:
                counted = counted or not inflight.chosen
                inflight.votes += 1
                if inflight.votes >= inflight.needed:
                    inflight.chosen = True
        if counted and sender != self._id:
            self._note_responder(ls, sender)
        self._advance_leader_commit()

    def _on_heartbeat_ack(self, message: HeartbeatAck) -> None:
        ls = self._ls
        if ls is None or self._role != Role.LEADER or message.ballot != ls.ballot:
            return
        peer = self._peer(message.sender)
        peer.last_contact_ms = self._now_ms
        peer.commit_index = max(peer.commit_index, message.commit_index)
        if message.seq > peer.heartbeat_seq:
            peer.heartbeat_seq = message.seq
            self._check_reads()

    def _on_catchup_request(self, message: CatchupRequest) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            return
        if not message.has_config or message.from_slot < self._log.first_slot:
            self._send(message.sender, SnapshotOffer(self._id, snapshot, self._snapshot_size_bytes))
            return
        values: list[ChosenValue] = []
        size_bytes = 0
        slot: int = message.from_slot
        while slot <= self._commit and len(values) < self._options.catchup_entries_max:
            vote = self._log.get(slot)
            invariant(vote is not None, f"committed slot {slot} missing")
            assert vote is not None
            size_bytes += vote.entry.size_bytes()
            if values and size_bytes > self._options.catchup_bytes_max:
                break
            values.append(ChosenValue(vote.ballot, vote.entry))
            slot += 1
        self._send(
            message.sender, CatchupReply(self._id, message.from_slot, tuple(values), self._commit)
        )

    def _leading_actively(self) -> bool:
        """An active leader learns chosen slots only from its own quorum: if its commit
        jumped past slots it proposed, commit news naming its ballot would lie."""
        return self._ls is not None and self._ls.active

    def _on_catchup_reply(self, message: CatchupReply) -> None:
        catchup = self._catchup
        if catchup is not None and catchup.source == message.sender:
            self._catchup = None
        if (
            message.first_slot != self._commit + 1
            or self._configs is None
            or self._leading_actively()
        ):
            return
        if message.values:
            for offset, value in enumerate(message.values):
                slot = Slot(message.first_slot + offset)
                self._log.put_if_not_older(slot, LogSlot(value.ballot, value.entry))
                stored = self._log.get(slot)
                invariant(
                    stored is not None and stored.entry == value.entry,
                    f"slot {slot}: a vote of a higher ballot disagrees with the chosen value",
                )
            self._out_records.append(ChosenRecord(message.first_slot, message.values))
            self._commit_through(Slot(message.first_slot + len(message.values) - 1))
        if message.commit_index > self._commit and message.values:
            self._request_catchup(message.sender)

    def _on_snapshot_offer(self, message: SnapshotOffer) -> None:
        meta = message.meta
        if (self._configs is not None and meta.index <= self._commit) or self._leading_actively():
            return
        transfer = self._transfer
        if transfer is not None and transfer.meta.index >= meta.index:
            return
        if message.size_bytes > self._options.snapshot_bytes_max or message.size_bytes < 0:
            return
        self._catchup = None
        self._transfer = _Transfer(
            source=message.sender,
            meta=meta,
            size_bytes=message.size_bytes,
            parts=[],
            received_bytes=0,
            progress_ms=self._now_ms,
            requested_ms=self._now_ms,
        )
        if message.size_bytes == 0:
            self._install_transfer()
        else:
            self._send(message.sender, SnapshotChunkRequest(self._id, meta.index, 0))

    def _on_snapshot_chunk_request(self, message: SnapshotChunkRequest) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            return
        if message.index != snapshot.index:
            self._send(message.sender, SnapshotOffer(self._id, snapshot, self._snapshot_size_bytes))
            return
        if not 0 <= message.offset < self._snapshot_size_bytes:
            return
        if self._snapshot_reads_pending >= self._options.snapshot_reads_pending_max:
            return  # the peer retries
        self._snapshot_reads_pending += 1
        length = min(self._options.snapshot_chunk_bytes, self._snapshot_size_bytes - message.offset)
        self._out_snapshot_reads.append(
            SnapshotRead(message.sender, snapshot.index, message.offset, length)
        )

    def _on_snapshot_chunk(self, message: SnapshotChunk) -> None:
        transfer = self._transfer
        if (
            transfer is None
            or message.sender != transfer.source
            or message.meta.index != transfer.meta.index
            or message.offset != transfer.received_bytes
        ):
            return
        if transfer.received_bytes + len(message.data) > transfer.size_bytes:
            self._transfer = None  # longer than announced: a broken source, start over
            return
        transfer.parts.append(message.data)
        transfer.received_bytes += len(message.data)
        transfer.progress_ms = transfer.requested_ms = self._now_ms
        if transfer.received_bytes == transfer.size_bytes:
            self._install_transfer()
        else:
            self._send(
                transfer.source,
                SnapshotChunkRequest(self._id, transfer.meta.index, transfer.received_bytes),
            )

    # ------------------------------------------------------------------ catch-up

    def _request_catchup(self, source: NodeId) -> None:
        if source == self._id or self._transfer is not None:
            return
        from_slot = Slot(self._commit + 1)
        current = self._catchup
        if (
            current is not None
            and current.source == source
            and current.from_slot == from_slot
            and self._now_ms - current.sent_ms < 2 * self._options.heartbeat_interval_ms
        ):
            return
        self._catchup = _Catchup(source, from_slot, self._now_ms)
        self._send(source, CatchupRequest(self._id, from_slot, self._configs is not None))

    def _catchup_tick(self) -> None:
        retry_ms = 2 * self._options.heartbeat_interval_ms
        catchup = self._catchup
        if catchup is not None and self._now_ms - catchup.sent_ms >= retry_ms:
            self._catchup = None
            self._request_catchup(catchup.source)
        transfer = self._transfer
        if transfer is None:
            return
        if self._now_ms - transfer.progress_ms >= 4 * self._options.election_timeout_ms:
            self._transfer = None  # the source is gone; commit news will name another
        elif self._now_ms - transfer.requested_ms >= retry_ms:
            transfer.requested_ms = self._now_ms
            self._send(
                transfer.source,
                SnapshotChunkRequest(self._id, transfer.meta.index, transfer.received_bytes),
            )

    def _install_transfer(self) -> None:
        transfer = self._transfer
        assert transfer is not None
        self._transfer = None
        meta = transfer.meta
        if (self._configs is not None and meta.index <= self._commit) or self._leading_actively():
            return
        self._snapshot = meta
        self._snapshot_size_bytes = transfer.size_bytes
        self._log.discard_through(meta.index)
        self._commit = meta.index
        self._applied = meta.index
        self._recorded_commit = max(self._recorded_commit, meta.index)
        self._configs = ConfigHistory(meta.configs)
        self._out_install = SnapshotInstall(meta, b"".join(transfer.parts))
        ls = self._ls
        if ls is not None:
            ls.reports = {s: v for s, v in ls.reports.items() if s > meta.index}
            self._on_leader_commit()
        elif self._commit_hint > self._commit:
            self._request_catchup(transfer.source)

    # ------------------------------------------------------------------ elections

    def _start_probe(self) -> None:
        self._timeout_draw_ms = self._draw_timeout()
        self._election_deadline_ms = self._now_ms + self._timeout_draw_ms
        if not self._is_voter():
            self._role = Role.FOLLOWER
            return
        if self._now_ms < self._lease_block_until_ms:
            self._election_deadline_ms = self._lease_block_until_ms
            return
        self._set_leader(None, None)
        self._role = Role.PROBING
        self._probe_id += 1
        self._probe_grants = {self._id}
        assert self._configs is not None
        voters = self._configs.for_slot(self._commit + 1).voters
        if _quorum.is_quorum(voters, self._probe_grants):
            self._start_phase1()
            return
        for voter in voters:
            if voter != self._id:
                self._send(voter, ProbeRequest(self._id, self._probe_id, self._commit))

    def _start_phase1(self) -> None:
        """Phase 1a with a fresh ballot, above every round seen and durable before use."""
        ballot = Ballot(max(self._promised.round, self._max_round_seen) + 1, self._id)
        self._set_promise(ballot)
        self._set_leader(None, None)
        self._role = Role.PREPARING
        self._timeout_draw_ms = self._draw_timeout()
        self._election_deadline_ms = self._now_ms + self._timeout_draw_ms
        ls = _LeaderState(ballot=ballot, now_ms=self._now_ms)
        ls.next_prepare_retry_ms = self._now_ms + self._options.heartbeat_interval_ms
        self._ls = ls
        from_slot = Slot(self._commit + 1)
        ls.promises[self._id] = _PromiseProgress(from_slot)
        self._send(self._id, self._promise_page(ballot, from_slot))
        for node in self._targets():
            ls.promises[node] = _PromiseProgress(from_slot)
            self._send(node, Prepare(self._id, ballot, from_slot))

    def _retry_prepares(self) -> None:
        ls = self._ls
        assert ls is not None and self._configs is not None
        ls.next_prepare_retry_ms = self._now_ms + self._options.heartbeat_interval_ms
        for membership in self._configs.relevant(self._commit):
            for node in membership.members:
                progress = ls.promises.get(node)
                if progress is None:
                    progress = ls.promises[node] = _PromiseProgress(Slot(self._commit + 1))
                if not progress.complete and node != self._id:
                    self._send(node, Prepare(self._id, ls.ballot, progress.next_from))

    def _covers(self, ls: _LeaderState, membership: Membership) -> bool:
        """Complete promises from a quorum of ``membership``."""
        done = [node for node, progress in ls.promises.items() if progress.complete]
        return _quorum.is_quorum(membership.voters, done)

    def _check_phase1_complete(self) -> None:
        ls = self._ls
        assert ls is not None and self._configs is not None
        if all(self._covers(ls, m) for m in self._configs.relevant(self._commit)):
            self._become_leader()

    def _become_leader(self) -> None:
        ls = self._ls
        assert ls is not None
        self._role = Role.LEADER
        self._backoff_level = 0
        self._set_leader(self._id, ls.ballot)
        for node in self._targets():
            self._peer(node).last_contact_ms = self._now_ms
        ls.heartbeat_due = True
        self._leader_check_progress()

    def _peer(self, node: NodeId) -> _PeerProgress:
        ls = self._ls
        assert ls is not None
        peer = ls.peers.get(node)
        if peer is None:
            # A peer met mid-ballot (a new learner) gets the slots proposed from now on;
            # earlier ones it fetches by catch-up, in bounded pages.
            sent = Slot(max(ls.next_slot - 1, 0))
            peer = ls.peers[node] = _PeerProgress(last_contact_ms=self._now_ms, sent_slot=sent)
        return peer

    def _step_down(self, reason: StepDownReason) -> None:
        ls = self._ls
        assert ls is not None
        if reason == StepDownReason.REMOVED and ls.active:
            # The last slots before the new membership takes over are chosen but only
            # this replica knows it; without this news the survivors would need a quorum
            # of the old membership to find out.
            for node in self._targets():
                self._send(node, Commit(self._id, ls.ballot, self._commit, ls.base_slot))
        self._notice(SteppedDown(ls.ballot, reason))
        self._ls = None
        was_leader = self._role == Role.LEADER
        self._role = Role.FOLLOWER
        if was_leader:
            self._set_leader(None, None)
        if self._queue:
            self._notice(ProposalsDropped(tuple(self._queue)))
            self._queue.clear()
            self._queue_bytes = 0
        self._membership_queued = None
        failed = list(self._reads_waiting) + [read.read_id for read in self._reads_pending]
        if failed:
            self._notice(ReadsFailed(tuple(failed)))
        self._reads_waiting.clear()
        self._reads_pending.clear()
        if reason == StepDownReason.PREEMPTED:
            self._backoff_level = min(self._backoff_level + 1, self._options.backoff_level_max)
        self._timeout_draw_ms = self._draw_timeout()
        extra = 0
        if self._backoff_level > 0:
            spread = self._options.election_timeout_ms * ((1 << self._backoff_level) - 1)
            extra = self._rng.randrange(0, spread + 1)
        self._election_deadline_ms = self._now_ms + self._timeout_draw_ms + extra

    # ------------------------------------------------------------------ leading

    def _leader_check_progress(self) -> None:
        """Catch up with the promisers, then start proposing; keep the read gate honest."""
        ls = self._ls
        assert ls is not None
        if not self._is_voter():
            # Catching up revealed that this replica left the group: a leader that cannot
            # propose would still hold off every election with its heartbeats.
            self._step_down(StepDownReason.REMOVED)
            return
        if not ls.active:
            if ls.max_promiser_commit > self._commit:
                assert ls.max_promiser is not None
                self._request_catchup(ls.max_promiser)
                return
            ls.active = True
            ls.base_slot = Slot(self._commit + 1)
            ls.next_slot = ls.base_slot
            ls.reports = {s: v for s, v in ls.reports.items() if s > self._commit}
            self._arm_news(ls)
        self._update_leader_ready()

    def _update_leader_ready(self) -> None:
        ls = self._ls
        assert ls is not None and self._configs is not None
        relevant = self._configs.relevant(self._commit)
        covered = True
        for membership in relevant:
            if not self._covers(ls, membership):
                covered = False
                self._prepare_members(ls, membership)
        ready = (
            ls.active
            and covered
            and self._commit >= ls.max_reported_slot
            and self._commit >= ls.max_promiser_commit
        )
        was_ready, ls.ready = ls.ready, ready
        if ready and not was_ready:
            while self._reads_waiting:
                self._start_read(self._reads_waiting.popleft())
        self._check_reads()

    def _prepare_members(self, ls: _LeaderState, membership: Membership) -> None:
        """Ask members we hold no promise from (new in a membership) for one."""
        for node in membership.members:
            if node not in ls.promises:
                ls.promises[node] = _PromiseProgress(Slot(self._commit + 1))
                self._send(node, Prepare(self._id, ls.ballot, Slot(self._commit + 1)))

    def _on_leader_commit(self) -> None:
        if self._role == Role.LEADER:
            self._leader_check_progress()

    def _advance_leader_commit(self) -> None:
        ls = self._ls
        assert ls is not None
        new_commit: int = self._commit
        while True:
            inflight = ls.inflight.get(new_commit + 1)
            if inflight is None or not inflight.chosen:
                break
            new_commit += 1
        if new_commit == self._commit:
            return
        for slot in range(self._commit + 1, new_commit + 1):
            inflight = ls.inflight.pop(slot)
            if inflight.entry.kind == EntryKind.MEMBERSHIP:
                ls.membership_inflight -= 1
        self._arm_news(ls)
        self._commit_through(Slot(new_commit))

    def _leader_tick(self) -> None:
        ls = self._ls
        assert ls is not None and self._configs is not None
        now = self._now_ms
        if now >= ls.next_heartbeat_ms:
            ls.heartbeat_due = True
        horizon = now - self._options.election_timeout_ms
        for membership in self._configs.relevant(self._commit):
            alive = [self._id]
            for node in membership.voters:
                peer = ls.peers.get(node)
                if peer is not None and peer.last_contact_ms >= horizon:
                    alive.append(node)
            if not _quorum.is_quorum(membership.voters, alive):
                self._step_down(StepDownReason.QUORUM_LOST)
                return
        if now >= ls.next_prepare_retry_ms and not all(
            self._covers(ls, m) for m in self._configs.relevant(self._commit)
        ):
            self._retry_prepares()
        if not ls.active:
            self._leader_check_progress()  # keeps asking the promiser ahead of us

    def _prepare_outputs(self, *, propose: bool = True) -> None:
        """Turn queued proposals into slots, and send heartbeats and due news."""
        ls = self._ls
        if self._role != Role.LEADER or ls is None:
            return
        if ls.active and propose:
            self._flush_proposals(ls)
        if ls.heartbeat_due:
            self._broadcast_heartbeat(ls)
        if ls.active:
            self._send_due_news(ls)

    def _send_due_news(self, ls: _LeaderState) -> None:
        """Once ``commit_delay_ms`` has passed: a lone Commit to peers no Accept or
        Heartbeat told of the commit index; and the slots held back from lazy voters
        (thrifty) when the oldest open slot has waited that long for its quorum, or when
        nothing was proposed for ``thrifty_quiet_ms`` (a quiet group converges soon)."""
        now = self._now_ms
        delay = self._options.commit_delay_ms
        oldest = ls.inflight.get(self._commit + 1)
        stalled = oldest is not None and now >= oldest.proposed_ms + delay
        due = ls.news_due_ms
        news_due = due is not None and now >= due
        if not (stalled or news_due):
            return
        if news_due:
            ls.news_due_ms = None
        quiet_at_ms = ls.proposed_ms + self._options.thrifty_quiet_ms
        quiet = now >= quiet_at_ms
        for node in self._targets():
            peer = self._peer(node)
            if self._first_unsent(ls, peer) < ls.next_slot:
                # Slots were held back from this peer: its commit news goes with them,
                # with the next heartbeat, or as soon as the group is quiet or slow.
                if stalled or quiet:
                    self._send_pending_accepts(ls, node)
                else:
                    ls.news_due_ms = quiet_at_ms
                continue
            if news_due and peer.commit_sent < self._commit:
                peer.commit_sent = self._commit
                self._send(node, Commit(self._id, ls.ballot, self._commit, ls.base_slot))

    def _arm_news(self, ls: _LeaderState) -> None:
        """The commit index moved: peers hear of it from the next Accept or Heartbeat,
        or from a lone Commit once ``commit_delay_ms`` has passed (see PaxosOptions)."""
        if ls.news_due_ms is None:
            ls.news_due_ms = self._now_ms + self._options.commit_delay_ms

    def _lazy_peers(self, ls: _LeaderState) -> frozenset[NodeId]:
        """Voters that get new slots only with the next heartbeat, or once the quorum is
        slow (``PaxosOptions.thrifty``): all but the quorum's worth whose votes counted
        last. None while a membership change is pending (two quorums to gather); never
        a learner (it must keep up to be promoted)."""
        configs = self._configs
        if not self._options.thrifty or configs is None:
            return frozenset()
        relevant = configs.relevant(self._commit)
        if len(relevant) != 1:
            return frozenset()
        voters = relevant[0].voters
        others = [node for node in voters if node != self._id]
        needed = _quorum.quorum_size(len(voters)) - (len(voters) - len(others))
        # Before any vote counted, those that promised this ballot: they were up lately.
        order = [node for node in ls.responders if node in others]
        order += [node for node in others if node not in order and self._promised_us(ls, node)]
        order += [node for node in others if node not in order]
        return frozenset(order[max(needed, 0) :])

    @staticmethod
    def _promised_us(ls: _LeaderState, node: NodeId) -> bool:
        progress = ls.promises.get(node)
        return progress is not None and progress.complete

    def _note_responder(self, ls: _LeaderState, node: NodeId) -> None:
        responders = ls.responders
        if responders and responders[0] == node:
            return
        if node in responders:
            responders.remove(node)
        responders.insert(0, node)

    def _first_unsent(self, ls: _LeaderState, peer: _PeerProgress) -> Slot:
        """The first slot of this ballot not sent to ``peer`` (``ls.next_slot``: none)."""
        return Slot(max(peer.sent_slot + 1, ls.base_slot, self._log.first_slot))

    def _send_pending_accepts(self, ls: _LeaderState, node: NodeId) -> bool:
        """Send ``node`` the slots of this ballot it was not sent yet; False if none."""
        first = self._first_unsent(ls, self._peer(node))
        if first >= ls.next_slot:
            return False
        entries: list[Entry] = []
        for slot in range(first, ls.next_slot):
            vote = self._log.get(slot)
            invariant(
                vote is not None and vote.ballot == ls.ballot,
                "a leader holds its own vote in every slot it proposed",
            )
            assert vote is not None
            entries.append(vote.entry)
        self._send_accepts(ls, node, Slot(first), tuple(entries))
        return True

    def _flush_proposals(self, ls: _LeaderState) -> None:
        configs = self._configs
        assert configs is not None
        if (
            not self._queue
            and self._membership_queued is None
            and ls.next_slot > ls.max_reported_slot
            and configs.pending(self._commit) is None
        ):
            return  # _next_entry has nothing for the next slot (the common, idle case)
        first_new = ls.next_slot
        limit = self._commit + self._options.window_slots
        while ls.next_slot <= limit:
            slot = ls.next_slot
            membership = configs.for_slot(slot)
            if self._id not in membership.voters:
                break
            if not self._covers(ls, membership):
                self._prepare_members(ls, membership)
                break
            entry = self._next_entry(ls, slot)
            if entry is None:
                break
            voters = frozenset(membership.voters)
            needed = _quorum.quorum_size(len(voters))
            ls.inflight[slot] = _InflightSlot(entry, voters, needed, self._now_ms)
            if entry.kind == EntryKind.MEMBERSHIP:
                ls.membership_inflight += 1
            ls.next_slot = Slot(slot + 1)
        if ls.next_slot == first_new:
            return
        ls.proposed_ms = self._now_ms
        entries = tuple(ls.inflight[s].entry for s in range(first_new, ls.next_slot))
        self._accept_votes(ls.ballot, first_new, entries)
        last = Slot(ls.next_slot - 1)
        self._send(self._id, Accepted(self._id, ls.ballot, first_new, last, self._commit))
        lazy = self._lazy_peers(ls)
        for node in self._targets():
            if node in lazy:
                continue
            peer = ls.peers.get(node)
            if peer is None or peer.sent_slot + 1 >= first_new:
                self._send_accepts(ls, node, first_new, entries)
            else:
                self._send_pending_accepts(ls, node)  # held back while it was lazy

    def _next_entry(self, ls: _LeaderState, slot: Slot) -> Entry | None:
        """The value for ``slot``: a reported vote, a no-op in a recovered hole, a queued
        membership or command batch, or a no-op that brings a chosen membership into
        force sooner."""
        report = ls.reports.pop(slot, None)
        if report is not None:
            return report.entry
        if slot <= ls.max_reported_slot:
            return NOOP_ENTRY
        if self._membership_queued is not None:
            membership, self._membership_queued = self._membership_queued, None
            return Entry.of_membership(membership)
        if self._queue:
            return self._take_batch()
        assert self._configs is not None
        pending = self._configs.pending(self._commit)
        if pending is not None and slot < pending.effective_slot:
            return NOOP_ENTRY
        return None

    def _take_batch(self) -> Entry:
        options = self._options
        commands: list[bytes] = []
        size_bytes = 0
        queue = self._queue
        while queue and len(commands) < options.batch_commands_max:
            command = queue[0]
            if commands and size_bytes + len(command) > options.batch_bytes_max:
                break
            queue.popleft()
            commands.append(command)
            size_bytes += len(command)
        self._queue_bytes -= size_bytes
        return Entry(EntryKind.COMMANDS, commands=tuple(commands))

    def _send_accepts(
        self, ls: _LeaderState, node: NodeId, first_slot: Slot, entries: tuple[Entry, ...]
    ) -> None:
        """Send votes requests for consecutive slots, split to bound message size."""
        peer = self._peer(node)
        peer.accept_sent_ms = self._now_ms
        peer.commit_sent = max(peer.commit_sent, self._commit)
        peer.sent_slot = Slot(max(peer.sent_slot, first_slot + len(entries) - 1))
        limit = self._options.message_bytes_max
        start = 0
        size_bytes = 0
        for index, entry in enumerate(entries):
            size_bytes += entry.size_bytes()
            if index > start and size_bytes > limit:
                self._send(node, self._accept_message(ls, first_slot + start, entries[start:index]))
                start, size_bytes = index, entry.size_bytes()
        self._send(node, self._accept_message(ls, first_slot + start, entries[start:]))

    def _accept_message(
        self, ls: _LeaderState, first_slot: int, entries: tuple[Entry, ...]
    ) -> Accept:
        return Accept(self._id, ls.ballot, Slot(first_slot), entries, self._commit, ls.base_slot)

    def _broadcast_heartbeat(self, ls: _LeaderState) -> None:
        now = self._now_ms
        ls.heartbeat_due = False
        ls.next_heartbeat_ms = now + self._options.heartbeat_interval_ms
        ls.heartbeat_seq += 1
        seq = ls.heartbeat_seq
        ls.heartbeat_sent_ms[seq] = now
        stale = seq - self._options.heartbeat_history_max
        if stale in ls.heartbeat_sent_ms:
            del ls.heartbeat_sent_ms[stale]
        if self._options.read_mode == ReadMode.LEASE:
            # The leader is one of the quorum that grants its lease: it too must not
            # promise anyone else while the lease runs.
            self._lease_block_until_ms = max(
                self._lease_block_until_ms, now + self._options.lease_ms
            )
        base = ls.base_slot if ls.active else Slot(self._commit + 1)
        for node in self._targets():
            peer = self._peer(node)
            if ls.active:
                # Slots held back go first: the heartbeat's commit index must not reach
                # the peer ahead of them (it would ask for a catch-up it does not need).
                self._send_pending_accepts(ls, node)
                peer.commit_sent = max(peer.commit_sent, self._commit)
            self._send(node, Heartbeat(self._id, ls.ballot, seq, self._commit, base))
            if ls.active:
                self._retransmit_accepts(ls, node, peer)
        self._check_reads()

    def _retransmit_accepts(self, ls: _LeaderState, node: NodeId, peer: _PeerProgress) -> None:
        if self._now_ms - peer.accept_sent_ms < self._options.heartbeat_interval_ms:
            return
        for slot in range(self._commit + 1, ls.next_slot):
            if node not in ls.inflight[slot].acked:
                entries = tuple(ls.inflight[s].entry for s in range(slot, ls.next_slot))
                self._send_accepts(ls, node, Slot(slot), entries)
                return

    # ------------------------------------------------------------------ reads

    def _start_read(self, read_id: ReadId) -> None:
        ls = self._ls
        assert ls is not None and ls.ready
        if self.lease_valid(self._now_ms):
            self._reads_confirmed.append(ReadReady(read_id, self._commit))
            return
        self._reads_pending.append(_PendingRead(read_id, self._commit, ls.heartbeat_seq + 1))
        ls.heartbeat_due = True

    def _quorum_heartbeat_seq(self, ls: _LeaderState) -> int:
        """The latest heartbeat a quorum of every relevant membership has answered."""
        assert self._configs is not None
        acked = {node: peer.heartbeat_seq for node, peer in ls.peers.items()}
        acked[self._id] = ls.heartbeat_seq
        return min(
            _quorum.quorum_value(m.voters, acked) for m in self._configs.relevant(self._commit)
        )

    def _check_reads(self) -> None:
        ls = self._ls
        if ls is None or self._role != Role.LEADER:
            return
        seq = self._quorum_heartbeat_seq(ls)
        if self._options.read_mode == ReadMode.LEASE:
            sent_ms = ls.heartbeat_sent_ms.get(seq)
            ls.lease_expires_ms = (
                sent_ms + self._options.lease_leader_ms if sent_ms is not None else None
            )
        while self._reads_pending and self._reads_pending[0].seq <= seq:
            read = self._reads_pending.popleft()
            self._reads_confirmed.append(ReadReady(read.read_id, read.index))

    # ------------------------------------------------------------------ membership

    def _changed_membership(
        self, current: Membership, change: MembershipChange
    ) -> tuple[MembershipResult, Membership | None]:
        node = change.node
        voters, learners, retired = current.voters, current.learners, current.retired
        if change.kind == MembershipChangeKind.ADD_LEARNER:
            if node in retired:
                return MembershipResult.ID_RETIRED, None
            if node in voters or node in learners:
                return MembershipResult.ALREADY_MEMBER, None
            if node <= 0:
                return MembershipResult.INVALID, None
            return MembershipResult.OK, Membership(voters, learners + (node,), retired)
        if change.kind == MembershipChangeKind.PROMOTE:
            if node not in learners:
                return MembershipResult.UNKNOWN_NODE, None
            if not self._caught_up(node):
                return MembershipResult.LEARNER_BEHIND, None
            return MembershipResult.OK, Membership(
                tuple(sorted(voters + (node,))), _without(learners, node), retired
            )
        if change.kind == MembershipChangeKind.REMOVE:
            if node in voters:
                if len(voters) == 1:
                    return MembershipResult.LAST_VOTER, None
                return MembershipResult.OK, Membership(
                    _without(voters, node), learners, retired + (node,)
                )
            if node in learners:
                return MembershipResult.OK, Membership(
                    voters, _without(learners, node), retired + (node,)
                )
            return MembershipResult.UNKNOWN_NODE, None
        old = change.old_node
        if old is None or old not in voters or node not in learners:
            return MembershipResult.UNKNOWN_NODE, None
        if not self._caught_up(node):
            return MembershipResult.LEARNER_BEHIND, None
        return MembershipResult.OK, Membership(
            tuple(sorted(_without(voters, old) + (node,))),
            _without(learners, node),
            retired + (old,),
        )

    def _caught_up(self, node: NodeId) -> bool:
        ls = self._ls
        assert ls is not None
        peer = ls.peers.get(node)
        return (
            peer is not None
            and peer.commit_index + self._options.learner_lag_slots_max >= self._commit
        )


def _without(nodes: tuple[NodeId, ...], node: NodeId) -> tuple[NodeId, ...]:
    return tuple(n for n in nodes if n != node)
