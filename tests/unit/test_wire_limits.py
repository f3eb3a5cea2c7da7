"""Every frame limit on a live connection: at its edge the frame is read, just past it
the connection is closed and the log line says which limit was broken.

The unit tests of :mod:`wire.framing` check the same edges on a bare reader; these
check what an operator sees: the reason logged for that connection, by a real server,
before and after authentication.
"""

from __future__ import annotations

import logging
import struct

import msgpack
import pytest
import trio

from tests.wire_fixtures import KEY, raw_frame, running_server
from wire.address import Address
from wire.auth import NONCE_BYTES, PROTOCOL, authenticate_as_dialer
from wire.framing import HANDSHAKE_LIMITS, FrameLimits, FrameReader, FrameWriter
from wire.rpc import ERROR, REPLY, REQUEST

LIMITS = FrameLimits(
    header_bytes_max=2048,
    payload_bytes_max=4096,
    container_items_max=16,
    string_bytes_max=64,
    nesting_depth_max=4,
)
WAIT_S = 5.0


def _raw_header_frame(packed: bytes) -> bytes:
    return struct.pack(">II", len(packed), 0) + packed


def _echo(body: object) -> list[object]:
    return [REQUEST, 1, "test.echo", body, None]


def _header_of(length: int) -> list[object]:
    """An echo request whose header packs to exactly ``length`` bytes, within the other
    limits (strings of at most 64 bytes, 16 items, 4 levels)."""
    for count in range(1, 17):
        for tail in range(65):
            body = [["a" * 64] * 16, ["b" * 64] * count + ["c" * tail]]
            if len(msgpack.packb(_echo(body))) == length:
                return _echo(body)
    raise AssertionError(f"no header of {length} bytes")


# name, frame at the limit, the envelope kind it is answered with, frame just past the
# limit, the reason logged for it
LIVE_CASES = [
    (
        "header",
        raw_frame(_header_of(2048)),
        ERROR,
        raw_frame(_header_of(2049)),
        "frame header of 2049 bytes (limit 2048)",
    ),
    (
        "payload",
        raw_frame([REQUEST, 1, "test.bulk", [0, ""], None], bytes(4096)),
        REPLY,
        raw_frame([REQUEST, 1, "test.bulk", [0, ""], None], bytes(4097)),
        "frame payload of 4097 bytes (limit 4096)",
    ),
    (
        "string",
        raw_frame(_echo([1, "a" * 64])),
        REPLY,
        raw_frame(_echo([1, "a" * 65])),
        "65 exceeds max_str_len(64)",
    ),
    (
        "bin",
        raw_frame(_echo([1, b"a" * 64])),
        ERROR,
        raw_frame(_echo([1, b"a" * 65])),
        "65 exceeds max_bin_len(64)",
    ),
    (
        "array",
        raw_frame(_echo(list(range(16)))),
        ERROR,
        raw_frame(_echo(list(range(17)))),
        "17 exceeds max_array_len(16)",
    ),
    (
        "map",
        raw_frame(_echo({i: i for i in range(16)})),
        ERROR,
        raw_frame(_echo({i: i for i in range(17)})),
        "17 exceeds max_map_len(16)",
    ),
    (
        "nesting",
        raw_frame(_echo([[[0]]])),
        ERROR,
        raw_frame(_echo([[[[0]]]])),
        "header nested deeper than 4",
    ),
    (
        "ext",
        raw_frame(_echo([1, b""])),
        ERROR,
        # [0, 1, "test.echo", [1, <ext 5 of no data>], nil]: max_ext_len 0 let it through
        _raw_header_frame(b"\x95\x00\x01\xa9test.echo\x92\x01\xc7\x00\x05\xc0"),
        "msgpack ext type 5 is not allowed",
    ),
]


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def _read_until_closed(reader: FrameReader) -> None:
    with trio.fail_after(WAIT_S):
        try:
            while await reader.receive() is not None:
                pass
        except trio.BrokenResourceError:
            pass  # reset: the server closed with our bytes unread


@pytest.mark.parametrize(
    "name,at_limit,answer,past_limit,reason", LIVE_CASES, ids=[c[0] for c in LIVE_CASES]
)
async def test_a_limit_at_its_edge_is_served_and_just_past_it_closes_with_the_reason_logged(
    name: str,
    at_limit: bytes,
    answer: int,
    past_limit: bytes,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_server(limits=LIMITS) as address:
        raw = await trio.open_tcp_stream(address.host, address.port)
        host, port = raw.socket.getsockname()[:2]
        reader = FrameReader(raw, HANDSHAKE_LIMITS)
        await authenticate_as_dialer(reader, FrameWriter(raw), KEY, "raw")
        reader.limits = FrameLimits()
        await raw.send_all(at_limit)
        with trio.fail_after(WAIT_S):
            frame = await reader.receive()
        assert frame is not None and frame[0][:2] == [answer, 1], frame
        assert _loud(caplog) == []
        await raw.send_all(past_limit)
        await _read_until_closed(reader)
        await raw.aclose()
    loud = _loud(caplog)
    assert len(loud) == 1, loud
    assert loud[0].startswith(f"closing connection from raw@{host}:{port}: ")
    assert reason in loud[0]


def _hello(name: object = "dialer", nonce: object = b"n" * NONCE_BYTES, *extra: object) -> list:
    return [PROTOCOL, name, nonce, *extra]


def _sized_hello(length: int) -> bytes:
    """A hello frame (with a fourth, unexpected field) whose header is ``length`` bytes."""
    for first in range(257):
        header = msgpack.packb(_hello("d", b"n" * 32, b"x" * first, b"y" * 250))
        if len(header) == length:
            return _raw_header_frame(header)
    raise AssertionError(f"no hello of {length} bytes")


# name, handshake frame at the limit, just past it, the reason logged for the latter
HANDSHAKE_CASES = [
    (
        "header",
        _sized_hello(512),
        _sized_hello(513),
        "frame header of 513 bytes (limit 512)",
    ),
    (
        "string",
        raw_frame(_hello("a" * 256)),
        raw_frame(_hello("a" * 257)),
        "257 exceeds max_str_len(256)",
    ),
    (
        "bin",
        raw_frame(_hello("d", b"n" * 256)),
        raw_frame(_hello("d", b"n" * 257)),
        "257 exceeds max_bin_len(256)",
    ),
    (
        "array",
        raw_frame(_hello("d", b"n" * 32, *range(5))),
        raw_frame(_hello("d", b"n" * 32, *range(6))),
        "9 exceeds max_array_len(8)",
    ),
    (
        "map",
        raw_frame({i: i for i in range(8)}),
        raw_frame({i: i for i in range(9)}),
        "9 exceeds max_map_len(8)",
    ),
    ("nesting", raw_frame([[0]]), raw_frame([[[0]]]), "header nested deeper than 2"),
    (
        "payload",
        raw_frame(_hello()),
        raw_frame(_hello(), b"x"),
        "frame payload of 1 bytes (limit 0)",
    ),
]


async def _send_before_authentication(address: Address, data: bytes) -> str:
    """Send ``data`` as a dialer's first bytes, half-close, read until the server hangs
    up; our own address."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    host, port = stream.socket.getsockname()[:2]
    try:
        await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass
    await _read_until_closed(FrameReader(stream, HANDSHAKE_LIMITS))
    await stream.aclose()
    return f"{host}:{port}"


@pytest.mark.parametrize(
    "name,at_limit,past_limit,reason", HANDSHAKE_CASES, ids=[c[0] for c in HANDSHAKE_CASES]
)
async def test_a_handshake_limit_broken_is_the_reason_logged_for_that_connection(
    name: str,
    at_limit: bytes,
    past_limit: bytes,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_server() as address:
        at = await _send_before_authentication(address, at_limit)
        past = await _send_before_authentication(address, past_limit)
    loud = _loud(caplog)
    assert len(loud) == 2, loud
    # At the limit the frame was read: the refusal is about what it says (or that the
    # dialer hung up), not about its size.
    assert loud[0].startswith(f"refused connection from {at}: ")
    assert "exceeds" not in loud[0] and "limit" not in loud[0] and "nested" not in loud[0]
    assert loud[1].startswith(f"refused connection from {past}: ")
    assert reason in loud[1]
