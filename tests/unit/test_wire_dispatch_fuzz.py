"""Hypothesis fuzzing of the RPC dispatcher: hostile frames never crash it.

Each example feeds frames (well-formed, malformed, truncated, oversized) into
one side of a real :class:`RpcConnection` and checks that ``run`` returns
without raising, having either answered or closed with a reason, and that a
second connection served by the same handlers still works.
"""

from __future__ import annotations

import struct

import msgpack
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire_fixtures import ECHO, EchoService, Value, raw_frame
from wire.framing import FrameLimits, FrameReader, FrameWriter
from wire.rpc import CANCEL, ERROR, NOTIFY, REPLY, REQUEST, RpcConnection

LIMITS = FrameLimits(header_bytes_max=2048, payload_bytes_max=4096)
METHODS = st.sampled_from(
    [
        "test.echo",
        "test.fail",
        "test.crash",
        "test.sleep",
        "test.note",
        "test.quick",
        "test.later",
        "test.elect",
        "test.elect_note",
        "nope",
        "",
    ]
)
SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
ERROR_CODES = st.one_of(
    st.integers(0, 200),
    # Every int msgpack carries: the full signed 64-bit range and beyond it (to 2**64 - 1);
    # most of these are too big for a C int, and no code may reach os.strerror unchecked.
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40, 2**63, 2**64 - 1]),
)
BODIES = st.recursive(
    SCALARS | st.binary(max_size=20), lambda c: st.lists(c, max_size=4), max_leaves=12
)
BALLOT_METHODS = st.sampled_from(["test.elect", "test.elect_note", "test.echo"])
BALLOTS = st.tuples(st.integers(0, 3), st.tuples(st.lists(st.integers(0, 3), max_size=2)))
ENVELOPES = st.one_of(
    st.tuples(
        st.just(REQUEST), st.integers(-5, 50), METHODS, BODIES, st.none() | st.integers(-5, 5)
    ),
    st.tuples(
        st.just(REQUEST),
        st.integers(0, 50),
        METHODS,
        st.tuples(st.integers(0, 3), st.text(max_size=5)),
    ),
    st.tuples(st.sampled_from([REPLY, ERROR, CANCEL, 9]), st.integers(-5, 50), BODIES),
    st.tuples(st.just(ERROR), st.integers(0, 50), ERROR_CODES, st.just("") | st.text(max_size=10)),
    st.tuples(st.just(NOTIFY), METHODS, BODIES),
    # Shaped like a Ballot, whose Voters' __post_init__ refuses an empty tuple.
    st.tuples(st.just(REQUEST), st.integers(0, 50), BALLOT_METHODS, BALLOTS, st.none()),
    st.tuples(st.just(NOTIFY), BALLOT_METHODS, BALLOTS),
    st.tuples(st.just(NOTIFY), METHODS, st.tuples(st.integers(-3, 3), st.text(max_size=5))),
    BODIES,
)


ENVELOPE_FRAMES = st.builds(
    lambda h, p: raw_frame(list(h) if isinstance(h, tuple) else h, p),
    ENVELOPES,
    st.binary(max_size=64),
)
FRAMES = st.one_of(
    ENVELOPE_FRAMES,
    st.binary(max_size=40),
    st.builds(lambda n: struct.pack(">II", n, 0), st.integers(0, 2**32 - 1)),
    st.builds(
        lambda n: struct.pack(">II", 4, n) + msgpack.packb([0, 1, "x", [], None]),
        st.integers(4097, 2**32 - 1),
    ),
)


async def _serve_then_feed(frames: list[bytes], service: EchoService) -> RpcConnection:
    ours, theirs = trio.testing.memory_stream_pair()
    connection = RpcConnection(
        ours,
        FrameReader(ours, LIMITS),
        FrameWriter(ours),
        service.handlers(),
        peer_name="fuzz",
    )

    async def drain() -> None:
        try:
            while await theirs.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        nursery.start_soon(drain)
        for data in frames:
            try:
                await theirs.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        with trio.move_on_after(0.05):
            await connection.wait_closed()
        await theirs.aclose()
        with trio.fail_after(5):
            await connection.wait_closed()
    return connection


async def _healthy_connection_still_works(service: EchoService) -> None:
    left, right = trio.testing.memory_stream_pair()
    server = RpcConnection(left, FrameReader(left), FrameWriter(left), service.handlers())
    client = RpcConnection(right, FrameReader(right), FrameWriter(right))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        nursery.start_soon(client.run)
        assert await client.call(ECHO, Value(1)) == Value(2)
        nursery.cancel_scope.cancel()


@settings(max_examples=150, deadline=None)
@given(
    # Well-framed envelopes only, half the time: a garbage frame ends the connection, and
    # frames behind it would never reach the dispatcher.
    st.lists(ENVELOPE_FRAMES, max_size=8) | st.lists(FRAMES, max_size=8)
)
def test_hostile_frames_never_crash_the_dispatcher(frames: list[bytes]) -> None:
    service = EchoService()

    async def run() -> None:
        connection = await _serve_then_feed(frames, service)
        assert connection.close_reason
        await _healthy_connection_still_works(service)

    trio.run(run)


def test_a_protocol_violation_is_logged_with_its_reason(caplog) -> None:  # type: ignore[no-untyped-def]
    async def run() -> RpcConnection:
        return await _serve_then_feed([raw_frame([7, 1], b"")], EchoService())

    connection = trio.run(run)
    assert "unknown envelope kind 7" in (connection.close_reason or "")
    assert "unknown envelope kind 7" in caplog.text
