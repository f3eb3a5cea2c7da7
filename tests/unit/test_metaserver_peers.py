"""Peer links between metaservers, against a receiver on loopback.

Paxos tolerates lost messages but not forged ones, and a leader must never block on a
slow or dead peer: these tests pin that down.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from metaserver import peers
from metaserver.codec import PAXOS_DELIVER, PaxosBatch
from metaserver.paxos import Ballot, Entry, EntryKind, NodeId, Slot
from metaserver.paxos.messages import Accept, Heartbeat
from metaserver.peers import PeerLinks, deliver_handler, peer_name
from wire.address import Address
from wire.errors import RpcError
from wire.rpc import Handlers
from wire.transport import bound_port, open_connection, serve

KEY = bytes.fromhex("ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100")
BALLOT = Ballot(1, NodeId(1))
WAIT_S = 10.0


def heartbeat(seq: int, sender: int = 1) -> Heartbeat:
    return Heartbeat(NodeId(sender), BALLOT, seq, Slot(0), Slot(1))


class Receiver:
    """Metaserver 2's side: records what is delivered; ``hold`` stalls each delivery."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, tuple[Any, ...]]] = []
        self.in_progress = 0
        self.most_in_progress = 0
        self.hold = trio.Event()
        self.hold.set()

    async def deliver(self, sender: int, messages: tuple[Any, ...]) -> None:
        self.in_progress += 1
        self.most_in_progress = max(self.most_in_progress, self.in_progress)
        try:
            await self.hold.wait()
            self.batches.append((sender, messages))
        finally:
            self.in_progress -= 1

    @property
    def seqs(self) -> list[int]:
        return [m.seq for _s, batch in self.batches for m in batch]


@asynccontextmanager
async def receiver_at(
    may_send: Callable[[int], bool] = lambda node: node in (1, 3),
    port: int = 0,
) -> AsyncIterator[tuple[Receiver, Address, trio.CancelScope]]:
    receiver = Receiver()
    handlers = Handlers()
    handlers.register(PAXOS_DELIVER, deliver_handler(may_send, receiver.deliver))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(serve, handlers, KEY, Address("127.0.0.1", port)))
        yield receiver, Address("127.0.0.1", bound_port(listeners)), nursery.cancel_scope
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def links_to(address: Address) -> AsyncIterator[PeerLinks]:
    links = PeerLinks(1, {1: Address("127.0.0.1", 1), 2: address}, KEY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(links.run)
        yield links
        nursery.cancel_scope.cancel()


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT_S):
        while not condition():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def test_every_message_arrives_in_order_and_a_slow_receiver_holds_up_no_sender() -> None:
    async with receiver_at() as (receiver, address, _scope), links_to(address) as links:
        receiver.hold = trio.Event()
        for seq in range(50):  # before the link connects: they wait in the outbox
            links.send(NodeId(2), [heartbeat(seq)])
        await wait_for(lambda: receiver.in_progress == 1, "the first delivery")
        for seq in range(50, 200):  # connected: written at once, without blocking
            links.send(NodeId(2), [heartbeat(seq)])
            await trio.sleep(0)
        receiver.hold.set()
        await wait_for(lambda: len(receiver.seqs) == 200, "every message")
        assert receiver.seqs == list(range(200)), "one connection delivers in order"
        assert receiver.most_in_progress == 1, "a connection's batches are stepped one by one"
        assert len(receiver.batches[0][1]) == 50, "what waited for the connection left as one"


def big_accept(slot: int, command_bytes: int) -> Accept:
    entry = Entry(EntryKind.COMMANDS, (bytes([slot % 256]) * command_bytes,))
    return Accept(NodeId(1), BALLOT, Slot(slot), (entry,), Slot(0), Slot(1))


async def test_big_messages_leave_in_batches_the_receiver_accepts() -> None:
    # Frames past the receiver's header limit would close the link, and the core would
    # resend the same messages into the same wall forever.
    command_bytes = 300_000
    async with receiver_at() as (receiver, address, _scope), links_to(address) as links:
        links.send(NodeId(2), [big_accept(1, command_bytes), big_accept(2, command_bytes)])
        await wait_for(lambda: len(receiver.batches) >= 1, "the link to connect")
        links.send(NodeId(2), [big_accept(s, command_bytes) for s in range(3, 9)])
        delivered = lambda: [m.first_slot for _s, b in receiver.batches for m in b]  # noqa: E731
        await wait_for(lambda: len(delivered()) == 8, "every Accept")
        assert delivered() == list(range(1, 9))
        assert links._links[2].batches_sent == len(receiver.batches) >= 4
        for _sender, batch in receiver.batches:
            assert sum(peers.estimated_bytes(m) for m in batch) <= peers.BATCH_BYTES_MAX


def test_a_batch_is_cut_by_bytes_and_by_count() -> None:
    queue = deque([big_accept(s, 200_000) for s in range(1, 6)])
    assert [len(peers.take_batch(queue)) for _ in range(2)] == [3, 2]
    beats = deque(heartbeat(seq) for seq in range(5000))
    assert len(peers.take_batch(beats)) == peers.MESSAGES_PER_BATCH_MAX


async def test_a_full_outbox_drops_its_oldest_messages_without_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peers, "OUTBOX_MESSAGES_MAX", 10)
    async with receiver_at() as (_receiver, address, scope):
        scope.cancel()  # nobody listens there any more
    links = PeerLinks(1, {2: address}, KEY)
    for seq in range(25):
        links.send(NodeId(2), [heartbeat(seq)])
    assert links.dropped_messages == 15
    assert [m.seq for m in links._links[2].outbox] == list(range(15, 25))


async def test_a_link_reconnects_when_the_peer_comes_back() -> None:
    async with receiver_at() as (_receiver, address, scope):
        scope.cancel()
    async with links_to(address) as links:
        links.send(NodeId(2), [heartbeat(0)])
        await trio.sleep(0.2)  # refused; the link backs off
        async with receiver_at(port=address.port) as (receiver, _address, _scope):
            for seq in range(1, 40):
                links.send(NodeId(2), [heartbeat(seq)])
                await trio.sleep(0.05)
                if receiver.seqs:
                    break
            await wait_for(lambda: bool(receiver.seqs), "a delivery after reconnecting")


async def _deliver_as(address: Address, name: str, batch: PaxosBatch) -> bool:
    """Send ``batch`` one-way as ``name``; whether the receiver kept the connection open."""
    async with open_connection(address, KEY, name=name) as connection:
        await connection.notify(PAXOS_DELIVER, batch)
        with trio.move_on_after(0.5):
            await connection.wait_closed()
        return not connection.closed


async def test_a_batch_is_refused_unless_its_sender_is_the_authenticated_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with receiver_at() as (receiver, address, _scope):
        assert await _deliver_as(address, peer_name(1), PaxosBatch(1, (heartbeat(1),)))
        impostor = PaxosBatch(3, (heartbeat(1, sender=3),))
        assert not await _deliver_as(address, peer_name(1), impostor)
        smuggled = PaxosBatch(1, (heartbeat(1, sender=3),))
        assert not await _deliver_as(address, peer_name(1), smuggled)
        outsider = PaxosBatch(5, (heartbeat(1, sender=5),))
        assert not await _deliver_as(address, peer_name(5), outsider)
        assert len(receiver.batches) == 1
    assert "claims sender 3" in caplog.text
    assert "another sender" in caplog.text
    assert "not a member" in caplog.text


async def test_paxos_batches_are_one_way_and_a_call_is_refused() -> None:
    async with receiver_at() as (receiver, address, _scope):
        async with open_connection(address, KEY, name=peer_name(1)) as connection:
            with pytest.raises(RpcError) as caught:
                await connection.call(PAXOS_DELIVER, PaxosBatch(1, (heartbeat(1),)))
            assert caught.value.code == errno.EPROTO
        assert receiver.batches == []
