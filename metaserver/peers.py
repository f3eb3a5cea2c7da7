"""Links between metaservers: Paxos messages out, Paxos messages in.

Each peer has a bounded outbox and one sender task that keeps an authenticated
connection open and ships whatever accumulated as one :class:`PaxosBatch` per call,
with up to ``BATCHES_IN_FLIGHT_MAX`` calls outstanding, so a busy leader sends few
large calls without waiting a round trip between them.  Losing messages is harmless
to Paxos (the core retransmits), so a full outbox drops its oldest messages and a
failed call drops its batch; the link then reconnects with back-off.  Peers can be
added while running (a replica that joined the group).

Inbound batches are accepted only from a connection whose authenticated peer name is
``metaserver-<sender>`` and whose every message names that sender: the cluster key
authenticates the process, the name binds it to one id.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from metaserver.codec import MESSAGES_PER_BATCH_MAX, PAXOS_DELIVER, PaxosBatch, PaxosBatchAck
from wire.address import Address
from wire.errors import RpcError
from wire.rpc import CallContext, RpcConnection
from wire.transport import connect

log = logging.getLogger(__name__)

OUTBOX_MESSAGES_MAX = 16_384
BATCHES_IN_FLIGHT_MAX = 4
CALL_TIMEOUT_S = 5.0
RECONNECT_DELAY_S_MIN = 0.05
RECONNECT_DELAY_S_MAX = 0.5


def peer_name(node_id: int) -> str:
    """The name a metaserver declares when it dials another."""
    return f"metaserver-{node_id}"


class _Link:
    """The outgoing side towards one peer."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.outbox: deque[Any] = deque()
        self.wakeup = trio.Event()
        self.connection: RpcConnection | None = None
        self.in_flight = trio.Semaphore(BATCHES_IN_FLIGHT_MAX)
        self.failed = trio.Event()


class PeerLinks:
    """Outgoing links from metaserver ``self_id`` to every other metaserver."""

    def __init__(self, self_id: int, addresses: dict[int, Address], key: bytes) -> None:
        self._self_id = self_id
        self._key = key
        self._links: dict[int, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self.dropped_messages = 0
        self.last_contact_s: dict[int, float] = {}
        for node, address in addresses.items():
            self.set_address(node, address)

    def set_address(self, peer: int, address: Address) -> None:
        """Send to ``peer`` at ``address`` from now on (adds a link for a new peer)."""
        if peer == self._self_id:
            return
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _Link(address)
            if self._nursery is not None:
                self._nursery.start_soon(self._peer_loop, peer)
        elif link.address != address:
            link.address = address
            link.failed.set()

    def send(self, peer: int, messages: list[Any]) -> None:
        """Queue ``messages`` for ``peer``; never blocks (drops the oldest when full)."""
        link = self._links.get(peer)
        if link is None:
            log.warning(
                "%d messages for metaserver %d (address unknown) dropped", len(messages), peer
            )
            return
        outbox = link.outbox
        outbox.extend(messages)
        while len(outbox) > OUTBOX_MESSAGES_MAX:
            outbox.popleft()
            self.dropped_messages += 1
        link.wakeup.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer in self._links:
                nursery.start_soon(self._peer_loop, peer)

    async def _peer_loop(self, peer: int) -> None:
        link = self._links[peer]
        delay_s = RECONNECT_DELAY_S_MIN
        while True:
            async with trio.open_nursery() as calls:
                try:
                    while True:
                        await link.wakeup.wait()
                        link.wakeup = trio.Event()
                        while link.outbox:
                            if link.failed.is_set():
                                raise _LinkBroken
                            connection = await self._connected(link, calls)
                            await link.in_flight.acquire()
                            count = min(len(link.outbox), MESSAGES_PER_BATCH_MAX)
                            batch = tuple(link.outbox.popleft() for _ in range(count))
                            calls.start_soon(self._ship, peer, link, connection, batch)
                        if link.failed.is_set():
                            raise _LinkBroken
                        delay_s = RECONNECT_DELAY_S_MIN
                except (_LinkBroken, RpcError) as error:
                    log.debug("link to metaserver %d: %r", peer, error)
                    calls.cancel_scope.cancel()
            if link.connection is not None:
                await link.connection.aclose()
                link.connection = None
            link.outbox.clear()  # stale by the time we reconnect; the core resends
            link.failed = trio.Event()
            link.in_flight = trio.Semaphore(BATCHES_IN_FLIGHT_MAX)
            await trio.sleep(delay_s)
            delay_s = min(delay_s * 2, RECONNECT_DELAY_S_MAX)

    async def _connected(self, link: _Link, nursery: trio.Nursery) -> RpcConnection:
        if link.connection is None or link.connection.closed:
            link.connection = await connect(
                link.address,
                self._key,
                nursery,
                name=peer_name(self._self_id),
                timeout_s=CALL_TIMEOUT_S,
            )
        return link.connection

    async def _ship(
        self, peer: int, link: _Link, connection: RpcConnection, batch: tuple[Any, ...]
    ) -> None:
        try:
            await connection.call(
                PAXOS_DELIVER, PaxosBatch(self._self_id, batch), timeout_s=CALL_TIMEOUT_S
            )
            self.last_contact_s[peer] = trio.current_time()
        except RpcError as error:
            log.debug("batch to metaserver %d lost: %s", peer, error)
            link.failed.set()
            link.wakeup.set()
        finally:
            link.in_flight.release()


class _LinkBroken(Exception):
    """A call on the link failed: reconnect."""


Deliver = Callable[[int, tuple[Any, ...]], Awaitable[None]]


def deliver_handler(
    may_send: Callable[[int], bool], deliver: Deliver
) -> Callable[[PaxosBatch, CallContext], Awaitable[PaxosBatchAck]]:
    """The server side of :data:`PAXOS_DELIVER`: authenticate the sender, hand its
    messages to ``deliver``.  ``may_send`` refuses ids that are not (or no longer)
    metaservers of this group."""

    async def handle(batch: PaxosBatch, context: CallContext) -> PaxosBatchAck:
        expected = peer_name(batch.sender) + "@"
        if not context.connection.peer_name.startswith(expected):
            raise RpcError(
                errno.EPERM,
                f"paxos batch from {context.connection.peer_name} claims sender {batch.sender}",
            )
        if not may_send(batch.sender):
            raise RpcError(errno.EPERM, f"metaserver {batch.sender} is not a member of this group")
        if any(message.sender != batch.sender for message in batch.messages):
            raise RpcError(errno.EPERM, "paxos batch carries a message of another sender")
        await deliver(batch.sender, batch.messages)
        return PaxosBatchAck(len(batch.messages))

    return handle
