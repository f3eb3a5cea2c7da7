"""A peer that dies in the middle of a call: every caller gets a clear error, no hang.

The server side is faked where the test needs it to die at a precise point (after
the handshake, done by the real listener code): mid-way through a reply's header or
payload, or with a reset (``SO_LINGER`` 0, which sends RST instead of FIN).  The
other direction uses the real server: a client that vanishes while its handler runs
gets that handler cancelled.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from tests.wire_fixtures import (
    BULK,
    ECHO,
    KEY,
    SLEEP,
    EchoService,
    Value,
    authenticated_raw_socket,
    raw_frame,
    running_server,
)
from wire.address import Address
from wire.auth import authenticate_as_listener
from wire.errors import ConnectionLost
from wire.framing import HANDSHAKE_LIMITS, FrameLimits, FrameReader, FrameWriter
from wire.rpc import REPLY, REQUEST
from wire.transport import open_connection

WAIT_S = 5.0
"""Longer than any of these errors takes to arrive; a hang fails the test at once."""

Dying = Callable[[trio.SocketStream, int], Awaitable[None]]
"""What the fake server does after reading a request with the given call id."""


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST: SO_LINGER on with a zero timeout."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _call_a_dying_server(dying: Dying, call: Callable[..., Awaitable[object]]) -> str:
    """Call through a fake server that authenticates, reads one request and then does
    ``dying``; return the ConnectionLost message the caller got."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def fake_server() -> None:
        sock, _ = await listener.accept()
        stream = trio.SocketStream(sock)
        reader = FrameReader(stream, HANDSHAKE_LIMITS)
        await authenticate_as_listener(reader, FrameWriter(stream), KEY)
        reader.limits = FrameLimits()
        frame = await reader.receive()
        assert frame is not None and frame[0][0] == REQUEST
        await dying(stream, frame[0][1])

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            async with open_connection(Address("127.0.0.1", port), KEY, name="t") as conn:
                with trio.fail_after(WAIT_S), pytest.raises(ConnectionLost) as caught:
                    await call(conn)
                with pytest.raises(ConnectionLost):  # and the connection says so at once
                    await conn.call(ECHO, Value(1))
    finally:
        listener.close()
    return caught.value.message


async def _echo(conn: object) -> object:
    return await conn.call(ECHO, Value(1))  # type: ignore[attr-defined]


async def _bulk(conn: object) -> object:
    return await conn.call_with_payload(BULK, Value(0), payload=b"x" * 1000)  # type: ignore[attr-defined]


async def test_a_server_that_closes_after_the_request_is_connection_lost() -> None:
    async def die(stream: trio.SocketStream, _call_id: int) -> None:
        await stream.aclose()

    await _call_a_dying_server(die, _echo)


@pytest.mark.parametrize("cut", [1, 7, 8, 10])
async def test_a_reply_cut_off_in_its_prefix_or_header_is_connection_lost(cut: int) -> None:
    async def die(stream: trio.SocketStream, call_id: int) -> None:
        reply = raw_frame([REPLY, call_id, [2, "a text long enough to be cut"]])
        await stream.send_all(reply[:cut])
        await stream.aclose()

    message = await _call_a_dying_server(die, _echo)
    assert "middle of a frame" in message


async def test_a_reply_cut_off_in_its_payload_is_connection_lost() -> None:
    async def die(stream: trio.SocketStream, call_id: int) -> None:
        reply = raw_frame([REPLY, call_id, [1000, ""]], b"y" * 100_000)
        await stream.send_all(reply[: len(reply) - 50_000])
        await stream.aclose()

    message = await _call_a_dying_server(die, _bulk)
    assert "middle of a payload" in message


@pytest.mark.parametrize("sent", [0, 10])
async def test_a_connection_reset_mid_call_is_connection_lost(sent: int) -> None:
    async def die(stream: trio.SocketStream, call_id: int) -> None:
        if sent:
            await stream.send_all(raw_frame([REPLY, call_id, [2, "x" * 40]])[:sent])
            await trio.sleep(0.05)
        _reset(stream)

    message = await _call_a_dying_server(die, _echo)
    assert "Connection reset by peer" in message


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(0.01)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_that_vanishes_mid_call_gets_its_handler_cancelled(how: str) -> None:
    service = EchoService()
    async with running_server(service) as address:
        raw = await authenticated_raw_socket(address)
        await raw.send_all(
            raw_frame([REQUEST, 1, "test.sleep", [60_000, ""], None])
            + raw_frame([REQUEST, 2, "test.later", [5, ""], None])
        )
        await _until(lambda: service.sleeping == 1 and 5 in service.later)
        if how == "reset":
            _reset(raw)
        else:
            await raw.aclose()
        await _until(lambda: service.sleeps_cancelled == 1)
        # The deferred reply was detached: settling it now tells nobody and raises nothing.
        await _until(lambda: service.later[5]._callback is None)
        service.later[5].resolve(5)
        async with open_connection(address, KEY, name="after") as after:
            assert await after.call(ECHO, Value(1)) == Value(2)


async def test_a_caller_waiting_when_its_own_connection_is_closed_gets_connection_lost() -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        async with trio.open_nursery() as nursery:
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await conn.call(SLEEP, Value(60_000))
                except ConnectionLost as error:
                    outcome.append(error)

            nursery.start_soon(call)
            await _until(lambda: service.sleeping == 1)
            await conn.aclose()
        assert len(outcome) == 1 and "closed locally" in str(outcome[0])
        await _until(lambda: service.sleeps_cancelled == 1)
