"""A TCP proxy that a test can cut and heal: network partitions between real processes.

Each :class:`FaultProxy` listens on a free loopback port and forwards every connection
to one target address.  :meth:`FaultProxy.cut` closes the connections it carries and
refuses new ones (they are accepted and closed at once) until :meth:`FaultProxy.heal`.

:class:`ProxyMesh` puts one proxy on every directed link of a group of servers, so that
server ``i`` reaches server ``j`` only through proxy ``(i, j)``; give each server the
address map of :meth:`ProxyMesh.view_of` (its own address, the proxies for the others)
and cut the links of a minority with :meth:`ProxyMesh.isolate`.  Clients keep dialling
the servers' real addresses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from wire.address import Address

log = logging.getLogger(__name__)

PUMP_BYTES_MAX = 64 * 1024


class FaultProxy:
    """Forwards connections from its own port to ``target`` unless cut."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.address: Address | None = None
        self._cut = False
        self._live: set[trio.CancelScope] = set()
        self.connections_refused = 0

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Break every connection through this proxy and refuse new ones."""
        self._cut = True
        for scope in list(self._live):
            scope.cancel()

    def heal(self) -> None:
        self._cut = False

    async def run(self, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        async with downstream:
            if self._cut:
                self.connections_refused += 1
                return
            try:
                upstream = await trio.open_tcp_stream(self.target.host, self.target.port)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self._live.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_pump, downstream, upstream, nursery.cancel_scope)
                            nursery.start_soon(_pump, upstream, downstream, nursery.cancel_scope)
                    finally:
                        self._live.discard(scope)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope) -> None:
    """Copy ``source`` to ``sink`` until either side closes; then end both directions."""
    try:
        while True:
            data = await source.receive_some(PUMP_BYTES_MAX)
            if not data:
                break
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        both.cancel()


class ProxyMesh:
    """One :class:`FaultProxy` per directed link between the servers of ``addresses``."""

    def __init__(self, addresses: Mapping[int, Address]) -> None:
        self.addresses = dict(addresses)
        self.proxies: dict[tuple[int, int], FaultProxy] = {
            (i, j): FaultProxy(addresses[j]) for i in addresses for j in addresses if i != j
        }

    async def start(self, nursery: trio.Nursery) -> None:
        """Start every proxy in ``nursery`` (they run until it is cancelled)."""
        for proxy in self.proxies.values():
            await nursery.start(proxy.run)

    def view_of(self, node: int) -> dict[int, Address]:
        """The address map server ``node`` should use: itself, and proxies for the others."""
        view: dict[int, Address] = {}
        for other, address in self.addresses.items():
            if other == node:
                view[other] = address
            else:
                proxied = self.proxies[(node, other)].address
                assert proxied is not None, "start the mesh first"
                view[other] = proxied
        return view

    def isolate(self, nodes: set[int]) -> None:
        """Cut every link between ``nodes`` and the rest (both directions)."""
        for (source, target), proxy in self.proxies.items():
            if (source in nodes) != (target in nodes):
                proxy.cut()

    def heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()
