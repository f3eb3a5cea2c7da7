"""Opening and accepting authenticated RPC connections over TCP."""

from __future__ import annotations

import errno
import logging
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from wire.address import Address
from wire.auth import authenticate_as_dialer, authenticate_as_listener
from wire.errors import AuthenticationFailed, ProtocolError, RpcError
from wire.framing import DEFAULT_LIMITS, HANDSHAKE_LIMITS, FrameLimits, FrameReader, FrameWriter
from wire.rpc import NO_HANDLERS, Handlers, RpcConnection

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
ConnectionHook = Callable[[RpcConnection], Awaitable[None]]


def _peer_text(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{peer[0]}:{peer[1]}"


async def connect(
    address: Address,
    key: bytes,
    nursery: trio.Nursery,
    *,
    name: str,
    handlers: Handlers = NO_HANDLERS,
    limits: FrameLimits = DEFAULT_LIMITS,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> RpcConnection:
    """Dial ``address``, authenticate both ways, and start the connection in ``nursery``.

    Raises :class:`RpcError` (ECONNREFUSED, ETIMEDOUT, EACCES for a key
    mismatch) with one clear message; nothing is left open on failure.
    """
    connection = await _dial(address, key, name, handlers, limits, timeout_s)
    nursery.start_soon(connection.run)
    return connection


async def _dial(
    address: Address,
    key: bytes,
    name: str,
    handlers: Handlers,
    limits: FrameLimits,
    timeout_s: float,
) -> RpcConnection:
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise RpcError(errno.ETIMEDOUT, f"connecting to {address} timed out") from None
    except OSError as error:
        code = error.errno or errno.ECONNREFUSED
        raise RpcError(code, f"cannot connect to {address}: {error.strerror or error}") from None
    reader, writer = await handshake_as_dialer(stream, key, name, str(address))
    reader.limits = limits
    return RpcConnection(stream, reader, writer, handlers, peer_name=str(address))


async def handshake_as_dialer(
    stream: trio.SocketStream, key: bytes, name: str, where: str
) -> tuple[FrameReader, FrameWriter]:
    """Authenticate a freshly dialled ``stream`` to ``where`` both ways; return its frame
    reader (still under the handshake's limits) and writer.

    Raises :class:`RpcError` (EACCES for a key mismatch, ETIMEDOUT, ECONNRESET) with one
    clear message, after closing the stream."""
    reader = FrameReader(stream, HANDSHAKE_LIMITS)
    writer = FrameWriter(stream)
    try:
        await authenticate_as_dialer(reader, writer, key, name)
    except (AuthenticationFailed, ProtocolError) as error:
        await trio.aclose_forcefully(stream)
        raise RpcError(errno.EACCES, f"authentication with {where} failed: {error}") from None
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise RpcError(errno.ETIMEDOUT, f"handshake with {where} timed out") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        await trio.aclose_forcefully(stream)
        raise RpcError(errno.ECONNRESET, f"handshake with {where} broke: {error}") from None
    return reader, writer


async def handshake_as_listener(
    stream: trio.SocketStream, key: bytes, peer: str
) -> tuple[FrameReader, FrameWriter, str] | None:
    """Authenticate an accepted ``stream`` (from ``peer``, for the log) both ways; return
    its frame reader (still under the handshake's limits), writer and the dialer's name,
    or None after logging why and closing the stream."""
    reader = FrameReader(stream, HANDSHAKE_LIMITS)
    writer = FrameWriter(stream)
    try:
        peer_name = await authenticate_as_listener(reader, writer, key)
    except (AuthenticationFailed, ProtocolError) as error:
        log.warning("refused connection from %s: %s", peer, error)
    except trio.TooSlowError:
        log.warning("refused connection from %s: handshake timed out", peer)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        log.info("connection from %s broke during the handshake: %s", peer, error)
    else:
        return reader, writer, peer_name
    await trio.aclose_forcefully(stream)
    return None


@asynccontextmanager
async def open_connection(
    address: Address,
    key: bytes,
    *,
    name: str,
    handlers: Handlers = NO_HANDLERS,
    limits: FrameLimits = DEFAULT_LIMITS,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> AsyncIterator[RpcConnection]:
    """``async with open_connection(...) as connection:`` — closed on exit.

    Exceptions from the body propagate as themselves, not wrapped in an
    exception group by the nursery that runs the connection.
    """
    connection = await _dial(address, key, name, handlers, limits, timeout_s)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            try:
                yield connection
            finally:
                await connection.aclose()
    except BaseExceptionGroup as group:
        raise_single(group)


async def serve(
    handlers: Handlers,
    key: bytes,
    address: Address,
    *,
    limits: FrameLimits = DEFAULT_LIMITS,
    on_connection: ConnectionHook | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``address`` forever, serving ``handlers`` on each.

    ``task_status.started`` reports the listeners (so a caller that asked for
    port 0 learns the real one).  A peer that fails the handshake costs one
    log line and its own connection, nothing else.  Any other exception out of
    one connection (a bug: in the handshake, the RPC layer or ``on_connection``)
    is logged at error level with its traceback and the peer's address, and
    closes that connection only.
    """

    async def handle(stream: trio.SocketStream) -> None:
        peer = _peer_text(stream)
        try:
            await serve_one(stream, peer)
        except Exception as error:
            # The safety net: what a peer can cause is handled (and logged) below; what
            # still arrives here is a bug. It stays visible, with its traceback, but costs
            # this connection only: an exception out of handle() would end serve_listeners
            # and the process.
            log.error(
                "closing connection from %s after an unexpected error: %s",
                peer,
                _innermost(error),
                exc_info=True,
            )
            await trio.aclose_forcefully(stream)

    async def serve_one(stream: trio.SocketStream, peer: str) -> None:
        authenticated = await handshake_as_listener(stream, key, peer)
        if authenticated is None:
            return
        reader, writer, peer_name = authenticated
        reader.limits = limits
        connection = RpcConnection(
            stream, reader, writer, handlers, peer_name=f"{peer_name}@{peer}"
        )
        async with trio.open_nursery() as nursery:
            if on_connection is not None:
                nursery.start_soon(on_connection, connection)
            await connection.run()
            nursery.cancel_scope.cancel()

    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)


def _innermost(error: BaseException) -> str:
    """``repr`` of the exception inside nested one-exception groups (what a nursery adds)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return repr(error)


def raise_single(group: BaseExceptionGroup[BaseException]) -> typing.NoReturn:
    """Re-raise the only exception of ``group`` as itself; a true group stays a group."""
    if len(group.exceptions) == 1:
        single = group.exceptions[0]
        if isinstance(single, BaseExceptionGroup):
            raise_single(single)
        raise single.with_traceback(single.__traceback__) from None
    raise group


def bound_port(listeners: list[trio.SocketListener]) -> int:
    """The TCP port the first listener is bound to."""
    return int(listeners[0].socket.getsockname()[1])
