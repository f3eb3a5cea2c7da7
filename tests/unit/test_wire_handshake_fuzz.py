"""Hypothesis fuzzing of the handshake: hostile bytes before authentication.

Each example starts a real server, opens a well-behaved bystander connection, then
sends random, truncated or oversized bytes on a fresh TCP connection, half-closes it
and reads until the server hangs up.  The server must close that connection with
exactly one warning line (and no error), keep serving the bystander meanwhile, and
accept a new well-behaved client afterwards.
"""

from __future__ import annotations

import logging
import struct

import msgpack
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire_fixtures import ECHO, KEY, Value, raw_frame, running_server
from wire.auth import NONCE_BYTES, PROTOCOL
from wire.framing import HANDSHAKE_LIMITS
from wire.transport import open_connection

CLOSE_WAIT_S = 2.0
"""Well below the handshake timeout (5 s): the server must hang up because of what it
read, not because it gave up waiting."""


HELLO = raw_frame([PROTOCOL, "fuzz", b"n" * NONCE_BYTES])
INTS = st.integers(-(2**63), 2**64 - 1)
"""Every int msgpack can pack."""
VALUES = st.recursive(
    st.none() | st.booleans() | INTS | st.text(max_size=300) | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=10),
    max_leaves=20,
)
HOSTILE = st.one_of(
    st.binary(max_size=64),
    # Random msgpack values as whole frames, some past the handshake's string and
    # container limits (256 bytes, 8 items).
    st.builds(raw_frame, VALUES),
    # Hellos of the wrong shape: wrong protocol, name of the wrong type or too long,
    # nonces of the wrong length or type, extra fields.
    st.builds(
        lambda protocol, name, nonce, extra: raw_frame([protocol, name, nonce, *extra]),
        st.sampled_from([PROTOCOL, "paxfs/0", "", b"paxfs/1"]),
        st.text(max_size=300) | INTS | st.none(),
        st.binary(max_size=40) | st.text(max_size=40),
        st.lists(INTS, max_size=2),
    ),
    # A genuine hello cut anywhere, or followed by garbage where the proof belongs.
    st.builds(lambda cut: HELLO[:cut], st.integers(0, len(HELLO) - 1)),
    st.builds(lambda rest: HELLO + rest, st.binary(max_size=64) | st.builds(raw_frame, VALUES)),
    # Prefixes past the handshake's frame limits (512-byte header, no payload).
    st.builds(
        lambda length, tail: struct.pack(">II", length, 0) + tail,
        st.integers(HANDSHAKE_LIMITS.header_bytes_max + 1, 2**32 - 1),
        st.binary(max_size=16),
    ),
    st.builds(
        lambda length: struct.pack(">II", 4, length) + msgpack.packb([1, 2, 3]),
        st.integers(1, 2**32 - 1),
    ),
    # Oversized input: far more bytes than any handshake message.
    st.builds(
        lambda block, count: block * count,
        st.binary(min_size=1, max_size=64),
        st.integers(1024, 4096),
    ),
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _send_hostile(address: object, data: bytes) -> str:
    """Send ``data``, half-close, read until the server hangs up; our address."""
    stream = await trio.open_tcp_stream(address.host, address.port)  # type: ignore[attr-defined]
    host, port = stream.socket.getsockname()[:2]
    try:
        await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the server hung up before it had read everything
    with trio.fail_after(CLOSE_WAIT_S):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass  # reset: the server closed with our bytes still unread
    await stream.aclose()
    return f"{host}:{port}"


@settings(max_examples=60, deadline=None)
@given(HOSTILE)
def test_hostile_bytes_before_authentication_cost_one_warning_and_that_connection(
    data: bytes,
) -> None:
    records = _Records()
    logger = logging.getLogger("wire")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)

    async def run() -> str:
        async with running_server() as address:
            async with open_connection(address, KEY, name="bystander") as bystander:
                assert await bystander.call(ECHO, Value(1)) == Value(2)
                hostile = await _send_hostile(address, data)
                assert await bystander.call(ECHO, Value(2)) == Value(3)
            async with open_connection(address, KEY, name="after") as after:
                assert await after.call(ECHO, Value(3)) == Value(4)
        return hostile

    try:
        hostile = trio.run(run)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    loud = [r for r in records.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert loud[0].levelno == logging.WARNING
    message = loud[0].getMessage()
    assert message.startswith(f"refused connection from {hostile}: ")
    assert "\n" not in message and "\r" not in message
