"""The replica's Ready loop in one process: real storage, messages passed in memory.

What a user of the group would notice if these broke: a vote or a promise that leaves
before it is on disk (an acknowledged operation lost in a crash), a replica that forgets
it heard from a peer (a wiped replica let back in), a snapshot that stalls the replica
(spurious elections), a read that misses an acknowledged write.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from metaserver.codec import (
    GroupState,
    HeardFromRecord,
    decode_record,
    encode_snapshot,
)
from metaserver.namespace import Namespace, NamespaceConfig
from metaserver.paxos import (
    NodeId,
    PaxosNode,
    PaxosOptions,
    ReadMode,
    Role,
    initial_snapshot_meta,
)
from metaserver.paxos.messages import Accept, Promise
from metaserver.replica import Replica, ReplicaOptions
from metaserver.storage import StorageOptions, open_storage
from wire.address import Address
from wire.errors import NOT_LEADER, RpcError
from wire.ids import ROOT_INODE, SequenceNumber
from wire.namespace_ops import (
    ROOT_CREDENTIALS,
    ClientCommand,
    EntryReply,
    Lookup,
    Mknod,
    MutationCall,
    OpenSession,
    RequestContext,
    SessionCommand,
    SessionReply,
)

CLUSTER = "paxfs-test-cluster"
OPTIONS = PaxosOptions(
    heartbeat_interval_ms=20, election_timeout_ms=100, read_mode=ReadMode.LEASE, lease_ms=40
)
WAIT_S = 20.0


class GatedSync:
    """An fdatasync that can be held shut: calls block while ``shut`` is set."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.waiting = 0

    def __call__(self, fd: int) -> None:
        if not self.open.is_set():
            self.waiting += 1
            self.open.wait(WAIT_S)
            self.waiting -= 1
        os.fdatasync(fd)


class Group:
    """Replicas of one group in this process; ``down`` ones receive nothing."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.replicas: dict[int, Replica] = {}
        self.down: set[int] = set()
        self.delivered: list[tuple[int, int, Any]] = []

    def sink(self, sender: int) -> Callable[[NodeId, list[Any]], None]:
        def send(peer: NodeId, messages: list[Any]) -> None:
            if peer in self.down or sender in self.down or peer not in self.replicas:
                return
            for message in messages:
                self.delivered.append((sender, peer, message))
            self.nursery.start_soon(self.replicas[peer].deliver, sender, tuple(messages))

        return send


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT_S):
        while not condition():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def replica_group(
    tmp_path: Path,
    voters: tuple[int, ...],
    *,
    syncs: dict[int, GatedSync] | None = None,
    namespace: Namespace | None = None,
    replica_options: ReplicaOptions | None = None,
) -> AsyncIterator[Group]:
    """Start one replica per voter, founded on ``namespace`` (empty by default)."""
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        group = Group(nursery)
        meta = initial_snapshot_meta(tuple(NodeId(v) for v in voters))
        founding = namespace or Namespace(NamespaceConfig())
        blob = encode_snapshot(meta, founding.snapshot(), GroupState())
        for node_id in voters:
            sync = (syncs or {}).get(node_id) or GatedSync()
            # Syncs on the event loop would let one stalled disk stall every replica here.
            options = StorageOptions(fdatasync=sync, append_on_caller_thread=syncs is None)
            storage = await stack.enter_async_context(
                open_storage(tmp_path / f"r{node_id}", CLUSTER, options)
            )
            node = PaxosNode(
                node_id=NodeId(node_id),
                options=OPTIONS,
                rng=random.Random(node_id),
                now_ms=Replica.now_ms(),
                snapshot=meta,
                snapshot_size_bytes=len(blob),
            )
            replica = Replica(
                node,
                Namespace.restore(founding.snapshot()),
                storage,
                founders={v: Address("127.0.0.1", 1) for v in voters},
                group=GroupState(),
                heard=set(),
                send_messages=group.sink(node_id),
                set_peer_address=lambda _node, _address: None,
                options=replica_options or ReplicaOptions(),
                snapshot_blob=blob,
            )
            group.replicas[node_id] = replica
            nursery.start_soon(replica.run)
        try:
            yield group
        finally:
            nursery.cancel_scope.cancel()


async def open_session(replica: Replica) -> int:
    reply: SessionReply = await replica.submit(SessionCommand(time.time_ns(), OpenSession()))
    return reply.client


def mknod(client: int, seq: int, name: bytes, ack_seq: int = 0) -> ClientCommand:
    """A create with sequence number ``seq``; ``ack_seq`` is the oldest unanswered one."""
    context = RequestContext(client, SequenceNumber(seq), SequenceNumber(ack_seq), ROOT_CREDENTIALS)
    return ClientCommand(time.time_ns(), MutationCall(context, Mknod(ROOT_INODE, name, 0o644)))


def leader_of(group: Group) -> Replica | None:
    leaders = [r for r in group.replicas.values() if r.node.role == Role.LEADER]
    return leaders[0] if len(leaders) == 1 else None


async def leader_with_session(
    group: Group, among: tuple[Replica, ...] = (), attempts: int = 5
) -> tuple[Replica, int]:
    """The leader (of ``among``, by default of the group) and a session opened through
    it.  On a loaded machine a fresh leader can still lose an election (a tick came
    late) before the session commits: then the next leader is asked."""
    replicas = among or tuple(group.replicas.values())

    def ready_leader() -> Replica | None:
        leaders = [r for r in replicas if r.node.role == Role.LEADER]
        if len(leaders) == 1 and leaders[0].node.is_leader_ready():
            return leaders[0]
        return None

    for _ in range(attempts):
        await wait_for(lambda: ready_leader() is not None, "a leader")
        leader = ready_leader()
        assert leader is not None
        try:
            return leader, await open_session(leader)
        except RpcError as error:
            if error.code != NOT_LEADER:
                raise
    raise AssertionError(f"no leader kept its leadership for a session in {attempts} elections")


async def test_a_single_replica_commits_applies_and_reads_its_writes(tmp_path: Path) -> None:
    async with replica_group(tmp_path, (1,)) as group:
        replica = group.replicas[1]
        await wait_for(lambda: replica.is_leader, "leadership")
        client = await open_session(replica)
        replies = []
        async with trio.open_nursery() as nursery:
            for seq in range(50):

                async def create(seq: int = seq) -> None:
                    replies.append(await replica.submit(mknod(client, seq, b"f%d" % seq)))

                nursery.start_soon(create)
        assert len(replies) == 50 and all(isinstance(r, EntryReply) for r in replies)
        await replica.confirm_read()
        found = replica.namespace.query(Lookup(ROOT_INODE, b"f49"), ROOT_CREDENTIALS)
        assert isinstance(found, EntryReply)
        # Group commit: far fewer log writes than commands.
        assert replica._storage.stats().data_syncs < 50


async def test_a_promise_waits_for_its_fsync_but_accept_requests_do_not(tmp_path: Path) -> None:
    gates = {i: GatedSync() for i in (1, 2, 3)}
    async with replica_group(tmp_path, (1, 2, 3), syncs=gates) as group:
        first, client = await leader_with_session(group)
        await first.submit(mknod(client, 0, b"before"))

        # The leader is gone and the disk of one of the others stalls: the promise it owes
        # the third must not leave before it is durable, so nobody can win yet.
        stalled, candidate = (r for i, r in sorted(group.replicas.items()) if r is not first)
        group.down.add(first.node.node_id)
        gates[stalled.node.node_id].open.clear()
        group.delivered.clear()
        candidate.node.campaign(candidate.now_ms())
        candidate._kick()
        await trio.sleep(0.3)
        promises = [
            m
            for s, _p, m in group.delivered
            if s == stalled.node.node_id and isinstance(m, Promise)
        ]
        assert not promises, "a promise left before its record was durable"
        assert not candidate.is_leader and not stalled.is_leader
        gates[stalled.node.node_id].open.set()
        await wait_for(
            lambda: any(r.node.is_leader_ready() for r in (stalled, candidate)),
            "a leader once the promise is durable",
        )
        leader, client = await leader_with_session(group, among=(stalled, candidate))
        follower = candidate if leader is stalled else stalled

        # The leader's own disk stalls: its Accept requests still reach the follower, so
        # their fsyncs run in parallel.
        gate = gates[leader.node.node_id]
        gate.open.clear()
        group.delivered.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader.submit, mknod(client, 0, b"during"))
            await wait_for(
                lambda: any(
                    isinstance(m, Accept) and m.entries and p == follower.node.node_id
                    for _s, p, m in group.delivered
                ),
                "Accept requests sent while the leader's own fsync is held",
            )
            assert gate.waiting >= 1
            gate.open.set()


async def test_followers_apply_every_acknowledged_write_once_writes_stop(tmp_path: Path) -> None:
    # Commit news rides on the next Accept; after the last write nothing carries it but
    # the lone Commit the core sends after its delay (or a heartbeat): the tick loop
    # must still wake the driver to send it, or the followers lag behind until then.
    async with replica_group(tmp_path, (1, 2, 3)) as group:
        leader, client = await leader_with_session(group)
        for seq in range(5):
            await leader.submit(mknod(client, seq, b"w%d" % seq))
        followers = [r for r in group.replicas.values() if r is not leader]
        target = leader.applied_index
        await wait_for(
            lambda: all(f.applied_index >= target for f in followers),
            "the followers to apply the last write",
        )
        for follower in followers:
            found = follower.namespace.query(Lookup(ROOT_INODE, b"w4"), ROOT_CREDENTIALS)
            assert isinstance(found, EntryReply)


async def test_the_first_message_of_a_peer_is_recorded_durably_before_it_is_used(
    tmp_path: Path,
) -> None:
    gate = GatedSync()
    gate.open.clear()
    async with replica_group(tmp_path, (1, 2), syncs={2: gate}) as group:
        one, two = group.replicas[1], group.replicas[2]
        one.node.campaign(one.now_ms())
        one._kick()
        await trio.sleep(0.3)
        assert two.node.promised.node != 1, "stepped a message before recording its sender"
        assert 1 not in two._heard
        assert not one.is_leader
        gate.open.set()
        await wait_for(lambda: leader_of(group) is not None, "a leader of the two")
        assert two.heard_from(1) and one.heard_from(2)
    async with open_storage(tmp_path / "r2", CLUSTER) as storage:
        records = [decode_record(r.payload) for r in storage.recovered.records]
        assert HeardFromRecord((1,)) in records


def _big_namespace(files: int) -> Namespace:
    namespace = Namespace(NamespaceConfig())
    session: SessionReply = namespace.apply(SessionCommand(1, OpenSession()))  # type: ignore[assignment]
    for index in range(files):
        namespace.apply(mknod(session.client, index, b"big-%d" % index, ack_seq=index))
    return namespace


async def test_a_snapshot_is_serialised_without_stalling_the_replica(tmp_path: Path) -> None:
    namespace = _big_namespace(60_000)
    options = ReplicaOptions(snapshot_interval_entries=5)
    async with replica_group(tmp_path, (1,), namespace=namespace, replica_options=options) as group:
        replica = group.replicas[1]
        await wait_for(lambda: replica.is_leader, "leadership")
        client = await open_session(replica)
        wakeups: list[float] = []

        async def watch_the_loop() -> None:
            while True:
                await trio.sleep(0.005)
                wakeups.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_the_loop)
            for seq in range(8):
                await replica.submit(mknod(client, seq, b"s%d" % seq))
            await wait_for(lambda: replica.snapshots_taken >= 1, "a snapshot")
            nursery.cancel_scope.cancel()
        # Commands applied after the serialisation began were held back, then applied.
        await wait_for(lambda: replica.applied_index == replica.node.commit_index, "the backlog")
        assert isinstance(
            replica.namespace.query(Lookup(ROOT_INODE, b"s7"), ROOT_CREDENTIALS), EntryReply
        )
        began, ended = replica.snapshot_serialised_at
        during = [t for t in wakeups if began < t < ended]
        print(f"serialised in {ended - began:.2f} s; the loop ran {len(during)} times meanwhile")
        # Serialised on the event loop, the loop would not have run at all meanwhile.
        assert len(during) >= 3
    async with open_storage(tmp_path / "r1", CLUSTER) as storage:
        assert storage.recovered.snapshot is not None
        assert storage.recovered.snapshot.index > 0
