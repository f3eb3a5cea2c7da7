"""Mutual authentication: the right key gets in; a wrong key or a replay does not."""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from tests.wire_fixtures import ECHO, KEY, Value, running_server
from wire.auth import authenticate_as_dialer, proof
from wire.errors import RpcError
from wire.framing import HANDSHAKE_LIMITS, FrameReader, FrameWriter
from wire.transport import open_connection

OTHER_KEY = b"another-cluster-key-0123456789ab"


async def test_both_sides_holding_the_key_connect() -> None:
    async with running_server() as address, open_connection(address, KEY, name="ok") as conn:
        assert await conn.call(ECHO, Value(1)) == Value(2)


async def test_a_dialer_with_the_wrong_key_is_refused_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_server() as address:
        with pytest.raises(RpcError) as caught:
            async with open_connection(address, OTHER_KEY, name="intruder"):
                pass
        assert caught.value.code == errno.EACCES
        with trio.fail_after(5):
            while "refused connection" not in caplog.text:
                await trio.sleep(0.01)
    refusals = [r for r in caplog.records if "refused connection" in r.getMessage()]
    assert len(refusals) == 1
    assert "cluster key" in refusals[0].getMessage()


async def test_a_listener_with_the_wrong_key_is_not_trusted_by_the_dialer() -> None:
    async with running_server(key=OTHER_KEY) as address:
        with pytest.raises(RpcError) as caught:
            async with open_connection(address, KEY, name="careful"):
                pass
        assert caught.value.code == errno.EACCES
        assert "listener does not hold the cluster key" in caught.value.message


async def test_a_replayed_handshake_is_refused() -> None:
    """Record a genuine dialer's messages, replay them on a new connection."""
    async with running_server() as address:
        recorded: list[object] = []

        class RecordingWriter(FrameWriter):
            async def send(self, header: object, payload: object = None) -> None:
                recorded.append(header)
                await super().send(header, payload)

        stream = await trio.open_tcp_stream(address.host, address.port)
        reader = FrameReader(stream, HANDSHAKE_LIMITS)
        await authenticate_as_dialer(reader, RecordingWriter(stream), KEY, "genuine")
        await stream.aclose()
        hello, dialer_proof = recorded

        replay = await trio.open_tcp_stream(address.host, address.port)
        reader = FrameReader(replay, HANDSHAKE_LIMITS)
        writer = FrameWriter(replay)
        await writer.send(hello)
        frame = await reader.receive()
        assert frame is not None
        listener_nonce = frame[0][0]
        old_nonce = hello[2]  # type: ignore[index]
        # The listener chose a fresh nonce, so the recorded proof no longer matches it.
        assert dialer_proof != [proof(KEY, b"dialer", old_nonce, listener_nonce)]
        await writer.send(dialer_proof)
        with trio.fail_after(5):
            assert await reader.receive() is None  # closed without "ok"


async def test_the_listeners_proof_cannot_be_reflected_as_a_dialers_proof() -> None:
    nonce_a, nonce_b = b"a" * 32, b"b" * 32
    assert proof(KEY, b"listener", nonce_a, nonce_b) != proof(KEY, b"dialer", nonce_a, nonce_b)


async def test_a_wrong_protocol_name_is_refused() -> None:
    async with running_server() as address:
        stream = await trio.open_tcp_stream(address.host, address.port)
        writer = FrameWriter(stream)
        await writer.send(["paxfs/0", "old", b"n" * 32])
        with trio.fail_after(5):
            assert await FrameReader(stream, HANDSHAKE_LIMITS).receive() is None


async def test_a_silent_dialer_is_dropped_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_server() as address:
        stream = await trio.open_tcp_stream(address.host, address.port)
        with trio.fail_after(60):
            assert await stream.receive_some(10) == b""


async def test_a_dialer_refuses_a_listener_that_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(10):
            await authenticate_as_dialer(
                FrameReader(left, HANDSHAKE_LIMITS), FrameWriter(left), KEY, "patient"
            )
