"""Links between metaservers: Paxos messages out, Paxos messages in.

Each peer has a bounded outbox and one sender task that keeps an authenticated
connection open and ships whatever accumulated as one :class:`PaxosBatch` per
call, so a busy leader sends few large calls.  Losing messages is harmless to
Paxos (the core retransmits), so a full outbox drops its oldest messages and a
failed call drops its batch; the link then reconnects with back-off.

Inbound batches are accepted only from a connection whose authenticated peer
name is ``metaserver-<sender>`` and whose every message names that sender:
the cluster key authenticates the process, the name binds it to one id.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from metaserver.codec import MESSAGES_PER_BATCH_MAX, PAXOS_DELIVER, PaxosBatch, PaxosBatchAck
from wire.address import Address
from wire.errors import RpcError
from wire.rpc import CallContext, RpcConnection
from wire.transport import connect

log = logging.getLogger(__name__)

OUTBOX_MESSAGES_MAX = 16_384
CALL_TIMEOUT_S = 5.0
RECONNECT_DELAY_S_MIN = 0.05
RECONNECT_DELAY_S_MAX = 1.0


def peer_name(node_id: int) -> str:
    """The name a metaserver declares when it dials another."""
    return f"metaserver-{node_id}"


class PeerLinks:
    """Outgoing links from metaserver ``self_id`` to every other metaserver."""

    def __init__(self, self_id: int, addresses: dict[int, Address], key: bytes) -> None:
        self._self_id = self_id
        self._addresses = {i: a for i, a in addresses.items() if i != self_id}
        self._key = key
        self._outboxes: dict[int, deque[Any]] = {i: deque() for i in self._addresses}
        self._wakeups: dict[int, trio.Event] = {i: trio.Event() for i in self._addresses}
        self.dropped_messages = 0
        self.last_contact_s: dict[int, float] = {}

    def send(self, peer: int, messages: list[Any]) -> None:
        """Queue ``messages`` for ``peer``; never blocks (drops the oldest when full)."""
        outbox = self._outboxes.get(peer)
        if outbox is None:
            log.warning("message for unknown metaserver %d dropped", peer)
            return
        outbox.extend(messages)
        while len(outbox) > OUTBOX_MESSAGES_MAX:
            outbox.popleft()
            self.dropped_messages += 1
        self._wakeups[peer].set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for peer in self._addresses:
                nursery.start_soon(self._peer_loop, peer)

    async def _peer_loop(self, peer: int) -> None:
        delay_s = RECONNECT_DELAY_S_MIN
        async with trio.open_nursery() as nursery:
            connection: RpcConnection | None = None
            while True:
                await self._wakeups[peer].wait()
                self._wakeups[peer] = trio.Event()
                outbox = self._outboxes[peer]
                while outbox:
                    try:
                        if connection is None or connection.closed:
                            connection = await connect(
                                self._addresses[peer],
                                self._key,
                                nursery,
                                name=peer_name(self._self_id),
                                timeout_s=CALL_TIMEOUT_S,
                            )
                        count = min(len(outbox), MESSAGES_PER_BATCH_MAX)
                        batch = tuple(outbox.popleft() for _ in range(count))
                        await connection.call(
                            PAXOS_DELIVER,
                            PaxosBatch(self._self_id, batch),
                            timeout_s=CALL_TIMEOUT_S,
                        )
                        self.last_contact_s[peer] = trio.current_time()
                        delay_s = RECONNECT_DELAY_S_MIN
                    except RpcError as error:
                        log.debug("link to metaserver %d: %s", peer, error)
                        if connection is not None:
                            await connection.aclose()
                            connection = None
                        outbox.clear()  # stale by the time we reconnect; the core resends
                        await trio.sleep(delay_s)
                        delay_s = min(delay_s * 2, RECONNECT_DELAY_S_MAX)


def deliver_handler(
    peer_ids: set[int], step: Callable[[tuple[Any, ...]], None]
) -> Callable[[PaxosBatch, CallContext], Any]:
    """The server side of :data:`PAXOS_DELIVER`: authenticate the sender, step its messages."""

    async def deliver(batch: PaxosBatch, context: CallContext) -> PaxosBatchAck:
        expected = peer_name(batch.sender) + "@"
        if batch.sender not in peer_ids or not context.connection.peer_name.startswith(expected):
            raise RpcError(
                errno.EPERM,
                f"paxos batch from {context.connection.peer_name} claims sender {batch.sender}",
            )
        if any(message.sender != batch.sender for message in batch.messages):
            raise RpcError(errno.EPERM, "paxos batch carries a message of another sender")
        step(batch.messages)
        return PaxosBatchAck(len(batch.messages))

    return deliver
