"""The namespace half of the client library: calls to the metaserver group.

:class:`MetaClient` hides the group behind single calls.  It finds the
leader (following ``NOT_LEADER`` redirects, trying every metaserver when none
is known), keeps a session open (keep-alives in the background), gives each
mutation a sequence number and retries it with *the same* number across
timeouts, lost connections and leader changes, so that the namespace applies
it exactly once.  A normal failover is invisible to the caller; only when no
leader answers for ``no_quorum_timeout_s`` does a call fail, with ETIMEDOUT.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from wire.address import Address, parse_address
from wire.dataserver_ops import PeerConnections
from wire.errors import NOT_LEADER, RpcError
from wire.ids import ClientId, SequenceNumber
from wire.namespace_ops import (
    CLOSE_SESSION,
    KEEP_ALIVE,
    OPEN_SESSION,
    REPLY_WINDOW,
    ROOT_CREDENTIALS,
    SESSION_EXPIRED_ERRNO,
    CloseSession,
    Credentials,
    KeepAlive,
    MutationCall,
    OpenSession,
    QueryCall,
    RequestContext,
    SessionReply,
    method_for,
)
from wire.rpc import RpcConnection
from wire.schema import Method
from wire.transport import raise_single

log = logging.getLogger(__name__)

# Failures after which the same request may simply be sent again (elsewhere).
RETRYABLE_CODES = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EPIPE,
    }
)
RETRY_DELAY_S_MIN = 0.02
RETRY_DELAY_S_MAX = 0.5
REDIRECTS_WITHOUT_PAUSE_MAX = 3


class MetaClient:
    """Calls into the metaserver group; create with :func:`open_meta_client`."""

    def __init__(
        self,
        addresses: list[Address],
        key: bytes,
        nursery: trio.Nursery,
        *,
        name: str = "client",
        call_timeout_s: float = 5.0,
        no_quorum_timeout_s: float = 60.0,
    ) -> None:
        if not addresses:
            raise ValueError("no metaserver addresses")
        self._addresses = list(addresses)
        self._nursery = nursery
        self._call_timeout_s = call_timeout_s
        self._no_quorum_timeout_s = no_quorum_timeout_s
        self._peers = PeerConnections(key, nursery, name=name, connect_timeout_s=call_timeout_s)
        self._leader: Address | None = None
        self._next_try = 0
        self._client: ClientId | None = None
        self._session_timeout_s = 60.0
        self._session_lock = trio.Lock()
        self._next_seq = 0
        self._outstanding: set[int] = set()
        self._window = trio.Semaphore(REPLY_WINDOW)

    @property
    def client_id(self) -> ClientId | None:
        return self._client

    @property
    def leader(self) -> Address | None:
        """The metaserver that answered last as leader."""
        return self._leader

    # ------------------------------------------------------------ sessions

    async def open_session(self) -> ClientId:
        """Open a new session (a fresh client id with fresh sequence numbers)."""
        async with self._session_lock:
            reply: SessionReply = await self.call(OPEN_SESSION, OpenSession())
            self._client = reply.client
            self._session_timeout_s = reply.timeout_ns / 1e9
            self._next_seq = 0
            self._outstanding.clear()
            return reply.client

    async def keep_alive_forever(self) -> None:
        """Renew the session a few times per timeout; reopen it if it expired."""
        while True:
            await trio.sleep(max(0.1, self._session_timeout_s / 4))
            if self._client is None:
                continue
            try:
                await self.call(KEEP_ALIVE, KeepAlive(self._client))
            except RpcError as error:
                if error.code == SESSION_EXPIRED_ERRNO:
                    log.warning("session %x expired; opening a new one", self._client)
                    await self.open_session()
                else:
                    log.warning("keep-alive failed: %s", error)

    async def close_session(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await self.call(CLOSE_SESSION, CloseSession(client))
            except RpcError as error:
                log.info("closing session %x: %s", client, error)

    # ------------------------------------------------------------ namespace calls

    async def mutate(
        self,
        op: Any,
        credentials: Credentials = ROOT_CREDENTIALS,
        *,
        method: Method[Any, Any] | None = None,
        envelope: Callable[[MutationCall], Any] | None = None,
    ) -> Any:
        """Apply a mutating namespace op exactly once; return its reply.

        By default the op travels as its own namespace method.  A call that
        wraps the mutation in a larger request (``wire.data_ops.OPEN_FOR_WRITE``)
        passes that ``method`` and an ``envelope`` that builds its request from
        the :class:`MutationCall`.  Namespace errors raise :class:`RpcError`
        with their errno.
        """
        method = method or method_for(op)
        wrap = envelope or (lambda call: call)
        async with self._window:
            if self._client is None:
                await self.open_session()
            for _attempt in range(2):
                client = self._client
                assert client is not None
                seq = self._next_seq
                self._next_seq += 1
                self._outstanding.add(seq)
                try:
                    ack_seq = min(self._outstanding)
                    context = RequestContext(
                        client, SequenceNumber(seq), SequenceNumber(ack_seq), credentials
                    )
                    return await self.call(method, wrap(MutationCall(context, op)))
                except RpcError as error:
                    if error.code != SESSION_EXPIRED_ERRNO or self._client != client:
                        raise
                    # The session ended under us (a long partition): start a new one.
                    log.warning("session %x expired during a call; reopening", client)
                    await self.open_session()
                finally:
                    self._outstanding.discard(seq)
            raise RpcError(SESSION_EXPIRED_ERRNO, "session keeps expiring")

    async def query(self, op: Any, credentials: Credentials = ROOT_CREDENTIALS) -> Any:
        """A linearizable read-only namespace op."""
        return await self.call(method_for(op), QueryCall(credentials, op))

    async def call(self, method: Method[Any, Any], request: Any) -> Any:
        """Call ``method`` at the leader, retrying the identical request until it is
        answered or no leader has answered for ``no_quorum_timeout_s``.

        Follows up to ``REDIRECTS_WITHOUT_PAUSE_MAX`` redirects at once, then backs off
        between attempts (``RETRY_DELAY_S_MIN`` doubling to ``RETRY_DELAY_S_MAX``).
        Raises the server's :class:`RpcError` for an answer that is not a failover
        symptom, and ETIMEDOUT (naming the last failure) at the deadline.
        """
        deadline = trio.current_time() + self._no_quorum_timeout_s
        delay_s = RETRY_DELAY_S_MIN
        last_error: RpcError | None = None
        redirects = 0
        while trio.current_time() < deadline:
            address = self._leader or self._rotate()
            try:
                connection = await self._connection(address)
                timeout_s = min(self._call_timeout_s, max(0.01, deadline - trio.current_time()))
                reply = await connection.call(method, request, timeout_s=timeout_s)
                self._leader = address
                return reply
            except RpcError as error:
                last_error = error
                if error.code == NOT_LEADER:
                    hint = _parse_hint(error.message)
                    self._leader = hint if hint != address else None
                    if self._leader is not None and redirects < REDIRECTS_WITHOUT_PAUSE_MAX:
                        redirects += 1
                        continue
                elif error.code == errno.EAGAIN:
                    pass  # the leader is busy: ask it again after a pause
                elif error.code in RETRYABLE_CODES or _closed_during_handshake(error):
                    await self._forget(address)
                    self._leader = None
                else:
                    raise
            redirects = 0
            await trio.sleep(max(0.0, min(delay_s, deadline - trio.current_time())))
            delay_s = min(delay_s * 2, RETRY_DELAY_S_MAX)
        raise RpcError(
            errno.ETIMEDOUT,
            f"no metaserver leader answered within {self._no_quorum_timeout_s:g} s"
            + (f" (last error: {last_error})" if last_error else ""),
        )

    # ------------------------------------------------------------ connections

    def _rotate(self) -> Address:
        address = self._addresses[self._next_try % len(self._addresses)]
        self._next_try += 1
        return address

    async def _connection(self, address: Address) -> RpcConnection:
        return await self._peers.get(str(address))

    async def _forget(self, address: Address) -> None:
        await self._peers.close(str(address))

    async def aclose(self) -> None:
        await self._peers.aclose()


def _closed_during_handshake(error: RpcError) -> bool:
    """A dial that failed because the server went away mid-handshake (it is restarting,
    or a proxy dropped us), not because the key is wrong: worth another try."""
    return error.code == errno.EACCES and "closed the connection" in error.message


def _parse_hint(text: str) -> Address | None:
    if not text:
        return None
    try:
        return parse_address(text)
    except ValueError:
        return None


@asynccontextmanager
async def open_meta_client(
    addresses: list[Address],
    key: bytes,
    *,
    name: str = "client",
    call_timeout_s: float = 5.0,
    no_quorum_timeout_s: float = 60.0,
    session: bool = True,
) -> AsyncIterator[MetaClient]:
    """A connected client; with ``session`` it opens one and keeps it alive until exit."""
    try:
        async with _client_nursery(
            addresses, key, name, call_timeout_s, no_quorum_timeout_s, session
        ) as client:
            yield client
    except BaseExceptionGroup as group:
        raise_single(group)


@asynccontextmanager
async def _client_nursery(
    addresses: list[Address],
    key: bytes,
    name: str,
    call_timeout_s: float,
    no_quorum_timeout_s: float,
    session: bool,
) -> AsyncIterator[MetaClient]:
    async with trio.open_nursery() as nursery:
        client = MetaClient(
            addresses,
            key,
            nursery,
            name=name,
            call_timeout_s=call_timeout_s,
            no_quorum_timeout_s=no_quorum_timeout_s,
        )
        try:
            if session:
                await client.open_session()
                nursery.start_soon(client.keep_alive_forever)
            yield client
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                if session:
                    await client.close_session()
                await client.aclose()
            nursery.cancel_scope.cancel()
