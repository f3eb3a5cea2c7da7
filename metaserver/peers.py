"""Links between metaservers: Paxos messages out, Paxos messages in.

Each peer has a bounded outbox and one sender task that keeps an authenticated
connection open and ships whatever accumulated as one one-way :class:`PaxosBatch`
(``RpcConnection.notify``): no reply travels back, since the core's own messages
(Accepted, HeartbeatAck...) are the acknowledgements, and a reply frame per batch
would double the frames, wake-ups and CPU of every consensus round.  Frames that
several tasks queue in one scheduler pass leave in one write.  A batch stays well
under the receiver's frame header limit (:data:`BATCH_BYTES_MAX`): a frame beyond it
is refused by closing the link, and the core would resend the same messages forever.
Losing messages is harmless to Paxos (the core retransmits), so a full outbox drops
its oldest messages and a broken connection drops what it carried; the link then
reconnects with back-off.  Peers can be added while running (a replica that joined
the group).

Inbound batches are accepted only from a connection whose authenticated peer name is
``metaserver-<sender>`` and whose every message names that sender: the cluster key
authenticates the process, the name binds it to one id.  A batch that breaks this
closes the connection (a one-way message has no error reply), and the receiver logs
why.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from metaserver.codec import MESSAGES_PER_BATCH_MAX, PAXOS_DELIVER, PaxosBatch
from metaserver.paxos.messages import Accept, CatchupReply, Promise, SnapshotChunk
from wire.address import Address
from wire.errors import RpcError
from wire.framing import DEFAULT_LIMITS
from wire.rpc import CallContext, RpcConnection
from wire.transport import connect

log = logging.getLogger(__name__)

OUTBOX_MESSAGES_MAX = 16_384
CONNECT_TIMEOUT_S = 5.0
RECONNECT_DELAY_S_MIN = 0.05
RECONNECT_DELAY_S_MAX = 0.5
BATCH_BYTES_MAX = DEFAULT_LIMITS.header_bytes_max * 3 // 4
"""Estimated bytes of one batch (see :func:`estimated_bytes`): a quarter of the frame
header limit is left for what the estimate misses.  The core keeps every message below
``PaxosOptions.message_bytes_max``, which must fit here (the replica checks)."""
MESSAGE_OVERHEAD_BYTES = 64
"""Counted per message and per entry beyond the bytes of its commands."""


def estimated_bytes(message: Any) -> int:
    """About how many bytes ``message`` takes in a frame; never much below the truth."""
    if isinstance(message, Accept):
        entries = message.entries
    elif isinstance(message, Promise):
        entries = tuple(accepted.entry for accepted in message.accepted)
    elif isinstance(message, CatchupReply):
        entries = tuple(value.entry for value in message.values)
    elif isinstance(message, SnapshotChunk):
        return MESSAGE_OVERHEAD_BYTES * 4 + len(message.data)
    else:
        return MESSAGE_OVERHEAD_BYTES
    return MESSAGE_OVERHEAD_BYTES * (1 + len(entries)) + sum(e.size_bytes() for e in entries)


def take_batch(queue: deque[Any]) -> tuple[Any, ...]:
    """Take the longest run from the front of ``queue`` (not empty) that stays within
    BATCH_BYTES_MAX and MESSAGES_PER_BATCH_MAX -- at least one message."""
    batch = [queue.popleft()]
    batch_bytes = estimated_bytes(batch[0])
    while queue and len(batch) < MESSAGES_PER_BATCH_MAX:
        size = estimated_bytes(queue[0])
        if batch_bytes + size > BATCH_BYTES_MAX:
            break
        batch.append(queue.popleft())
        batch_bytes += size
    return tuple(batch)


def peer_name(node_id: int) -> str:
    """The name a metaserver declares when it dials another."""
    return f"metaserver-{node_id}"


class _Link:
    """The outgoing side towards one peer."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.outbox: deque[Any] = deque()
        self.wakeup = trio.Event()
        self.readdressed = False
        self.batches_sent = 0
        self.connection: RpcConnection | None = None
        """The connection while the sender task holds one (for direct sends)."""


class PeerLinks:
    """Outgoing links from metaserver ``self_id`` to every other metaserver."""

    def __init__(self, self_id: int, addresses: dict[int, Address], key: bytes) -> None:
        self._self_id = self_id
        self._key = key
        self._links: dict[int, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self.dropped_messages = 0
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
            link.readdressed = True
            link.wakeup.set()

    def send(self, peer: int, messages: list[Any]) -> None:
        """Send ``messages`` to ``peer``: written at once when the link is connected and
        idle, else queued; never blocks (a full outbox drops its oldest messages)."""
        link = self._links.get(peer)
        if link is None:
            log.warning(
                "%d messages for metaserver %d (address unknown) dropped", len(messages), peer
            )
            return
        connection = link.connection
        pending = deque(messages)
        if connection is not None and not link.outbox and not link.readdressed:
            while pending:
                batch = take_batch(pending)
                if not connection.notify_nowait(PAXOS_DELIVER, PaxosBatch(self._self_id, batch)):
                    pending.extendleft(reversed(batch))
                    break
                link.batches_sent += 1
            if not pending:
                return
        outbox = link.outbox
        outbox.extend(pending)
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
            link.readdressed = False
            shipped_before = link.batches_sent
            async with trio.open_nursery() as connection_nursery:
                try:
                    await self._ship_until_broken(link, connection_nursery)
                except (_LinkBroken, RpcError) as error:
                    log.debug("link to metaserver %d: %r", peer, error)
                connection_nursery.cancel_scope.cancel()
            link.outbox.clear()  # stale by the time we reconnect; the core resends
            if link.batches_sent != shipped_before:
                delay_s = RECONNECT_DELAY_S_MIN  # it worked until now: retry soon
            await trio.sleep(delay_s)
            delay_s = min(delay_s * 2, RECONNECT_DELAY_S_MAX)

    async def _ship_until_broken(self, link: _Link, nursery: trio.Nursery) -> None:
        """Ship the outbox in batches as it fills, until the link must be rebuilt."""
        connection: RpcConnection | None = None
        try:
            while True:
                while not link.outbox:
                    await link.wakeup.wait()
                    link.wakeup = trio.Event()
                if link.readdressed:
                    raise _LinkBroken("address changed")
                if connection is None:
                    connection = await connect(
                        link.address,
                        self._key,
                        nursery,
                        name=peer_name(self._self_id),
                        timeout_s=CONNECT_TIMEOUT_S,
                    )
                    link.connection = connection
                batch = take_batch(link.outbox)
                await connection.notify(PAXOS_DELIVER, PaxosBatch(self._self_id, batch))
                link.batches_sent += 1
        finally:
            link.connection = None
            if connection is not None:
                await connection.aclose()


class _LinkBroken(Exception):
    """The link must reconnect."""


Deliver = Callable[[int, tuple[Any, ...]], Awaitable[None]]


def deliver_handler(
    may_send: Callable[[int], bool], deliver: Deliver
) -> Callable[[PaxosBatch, CallContext], Awaitable[None]]:
    """The receiving side of :data:`PAXOS_DELIVER`: authenticate the sender, hand its
    messages to ``deliver``.  ``may_send`` refuses ids that are not (or no longer)
    metaservers of this group; a refusal closes the connection."""

    async def handle(batch: PaxosBatch, context: CallContext) -> None:
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

    return handle
