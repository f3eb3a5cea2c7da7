"""Frame limits at and just past each edge, and fuzzing of the frame decoder."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire_fixtures import raw_frame
from wire.errors import ProtocolError
from wire.framing import (
    DEFAULT_LIMITS,
    RECEIVE_BYTES,
    RECYCLED_PAYLOAD_BYTES_MAX,
    RECYCLED_PAYLOAD_BYTES_MIN,
    FileRange,
    FrameLimits,
    FrameReader,
    FrameWriter,
    PayloadBuffers,
)

LIMITS = FrameLimits(
    header_bytes_max=4096,
    payload_bytes_max=1 << 20,
    container_items_max=100,
    string_bytes_max=1000,
    nesting_depth_max=8,
)


def _read_all(data: bytes, limits: FrameLimits = LIMITS) -> list[tuple[object, object]]:
    """Decode every frame in ``data``; ProtocolError propagates."""

    async def run() -> list[tuple[object, object]]:
        send, receive = trio.testing.memory_stream_pair()
        await send.send_all(data)
        await send.aclose()
        reader = FrameReader(receive, limits)
        frames = []
        while (frame := await reader.receive()) is not None:
            frames.append(frame)
        return frames

    return trio.run(run)


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth - 1):
        value = [value]
    return [value] if depth else 0


def test_a_frame_round_trips_with_its_payload() -> None:
    async def run() -> None:
        send, receive = trio.testing.memory_stream_pair()
        writer = FrameWriter(send)
        await writer.send([1, "x", b"y"], memoryview(b"payload" * 1000))
        await writer.send({"k": [1, 2]})
        reader = FrameReader(receive, LIMITS)
        assert await reader.receive() == ([1, "x", b"y"], bytearray(b"payload" * 1000))
        assert await reader.receive() == ({"k": [1, 2]}, None)

    trio.run(run)


def test_payload_at_the_limit_is_accepted_and_one_byte_more_is_refused() -> None:
    assert len(_read_all(raw_frame([0], bytes(LIMITS.payload_bytes_max)))) == 1
    with pytest.raises(ProtocolError, match="payload"):
        _read_all(raw_frame([0], bytes(LIMITS.payload_bytes_max + 1)))


def test_header_at_the_limit_is_accepted_and_one_byte_more_is_refused() -> None:
    # A bin of n bytes packs to n + 3 bytes (bin16), plus 1 for the list.
    fits = [bytes(LIMITS.header_bytes_max - 4)]
    assert len(msgpack.packb(fits)) == LIMITS.header_bytes_max
    wide = FrameLimits(header_bytes_max=4096, string_bytes_max=10_000)
    assert len(_read_all(raw_frame(fits), wide)) == 1
    with pytest.raises(ProtocolError, match="header"):
        _read_all(raw_frame([bytes(LIMITS.header_bytes_max - 3)]), wide)


def test_string_length_at_the_limit_is_accepted_and_one_more_is_refused() -> None:
    assert _read_all(raw_frame(["a" * 1000]))[0][0] == ["a" * 1000]
    with pytest.raises(ProtocolError):
        _read_all(raw_frame(["a" * 1001]))
    with pytest.raises(ProtocolError):
        _read_all(raw_frame([b"a" * 1001]))


def test_container_length_at_the_limit_is_accepted_and_one_more_is_refused() -> None:
    assert _read_all(raw_frame(list(range(100))))[0][0] == list(range(100))
    with pytest.raises(ProtocolError):
        _read_all(raw_frame(list(range(101))))
    with pytest.raises(ProtocolError):
        _read_all(raw_frame({str(i): i for i in range(101)}))


def test_nesting_at_the_limit_is_accepted_and_one_level_more_is_refused() -> None:
    assert len(_read_all(raw_frame(_nested(8)))) == 1
    with pytest.raises(ProtocolError, match="nested"):
        _read_all(raw_frame(_nested(9)))


def test_a_zero_length_header_is_refused() -> None:
    with pytest.raises(ProtocolError):
        _read_all(struct.pack(">II", 0, 0))


def test_a_frame_cut_short_is_refused_not_hung_on() -> None:
    data = raw_frame([1, 2, 3], b"abcdef")
    for cut in range(1, len(data)):
        with pytest.raises(ProtocolError, match="middle"):
            _read_all(data[:cut])


def test_trailing_bytes_inside_a_header_are_refused() -> None:
    packed = msgpack.packb([1]) + b"\x01"
    with pytest.raises(ProtocolError):
        _read_all(struct.pack(">II", len(packed), 0) + packed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_either_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        _read_all(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.binary(max_size=50)
        | st.text(max_size=50),
        lambda children: st.lists(children, max_size=5),
        max_leaves=40,
    ),
    st.integers(min_value=0, max_value=200),
)
def test_valid_frames_truncated_anywhere_raise_protocol_error(header: object, cut: int) -> None:
    data = raw_frame([header], b"p" * 10)
    truncated = data[: min(cut, len(data) - 1)]
    try:
        frames = _read_all(truncated)
    except ProtocolError:
        return
    assert frames == [] and truncated == b""


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    return 0


def _wrapped(value: object, levels: int) -> object:
    for level in range(levels):
        value = [value] if level % 2 else {"k": value, "n": 1}
    return value


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        _wrapped,
        st.recursive(
            st.integers(0, 300) | st.binary(max_size=8).map(lambda b: b + bytes([0x91, 0xDC])),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=3), children, max_size=2)
            ),
            max_leaves=20,
        ),
        st.integers(0, 12),
    )
)
def test_a_header_is_refused_exactly_when_nested_deeper_than_the_limit(header: object) -> None:
    """Whether the walk runs or is skipped (few container bytes), the verdict is the
    depth's; bytes that look like container headers inside strings change nothing."""
    deep = _depth(header) > LIMITS.nesting_depth_max
    try:
        frames = _read_all(raw_frame(header))
    except ProtocolError as error:
        assert deep, error
        return
    assert not deep and frames == [(header, None)]


def test_a_direct_send_in_progress_when_the_flusher_starts_is_not_interleaved() -> None:
    """A frame written before the flusher runs must finish before the flusher writes."""

    async def run() -> None:
        # Lockstep: send_all blocks until the reader takes the bytes, so the
        # direct send is still in progress when the flusher starts.
        send, receive = trio.testing.lockstep_stream_pair()
        writer = FrameWriter(send)
        big = bytes(range(256)) * 4096
        reader = FrameReader(receive, LIMITS)
        frames = []
        async with trio.open_nursery() as flusher_nursery:
            async with trio.open_nursery() as senders:
                senders.start_soon(writer.send, ["direct"], big)
                await trio.testing.wait_all_tasks_blocked()
                flusher_nursery.start_soon(writer.run_flusher)
                senders.start_soon(writer.send, ["queued"], b"x" * 100)
                for _ in range(2):
                    frames.append(await reader.receive())
            flusher_nursery.cancel_scope.cancel()
        first, second = frames
        assert first is not None and first[0] == ["direct"] and bytes(first[1]) == big
        assert second is not None and second[0] == ["queued"]

    trio.run(run)


# ---- receiving over a real socket (the readv path) and recycled payload buffers


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_frames_of_every_size_arrive_intact_over_a_socket() -> None:
    """Payloads shorter and longer than the receive buffer (and than the socket's), headers
    that straddle its end, and bursts of small frames: written with writev and read with
    readv on the descriptors, waiting whenever the socket is full or empty."""
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"PAXFS_SEED={seed}")
    rng = random.Random(seed)
    sizes = [0, 1, 100, RECEIVE_BYTES - 7, RECEIVE_BYTES + 13, 3 * RECEIVE_BYTES, 4 << 20]
    sizes += [rng.randrange(0, 3 * RECEIVE_BYTES) for _ in range(40)]
    sizes += [rng.randrange(0, 64) for _ in range(200)]
    frames = [
        ([index, "x" * rng.randrange(0, 300)], rng.randbytes(size))
        for index, size in enumerate(sizes)
    ]
    send, receive = await _socket_pair()
    reader = FrameReader(receive, DEFAULT_LIMITS, PayloadBuffers())
    received: list[tuple[object, bytes | None]] = []

    async def read_all() -> None:
        for _ in frames:
            frame = await reader.receive()
            assert frame is not None
            header, payload = frame
            received.append((header, None if payload is None else bytes(payload)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        writer = FrameWriter(send)
        for header, payload in frames:
            await writer.send(header, payload or None)
    assert received == [(header, payload or None) for header, payload in frames]


async def test_file_ranges_arrive_as_their_bytes_between_ordinary_frames(tmp_path: Path) -> None:
    """A FileRange payload goes out with sendfile, also when the socket fills up and the
    rest waits; frames before and after it keep their order, and the range's descriptor
    is closed once its bytes are sent."""
    content = os.urandom(6 << 20)
    path = tmp_path / "replica"
    path.write_bytes(content)
    spans = [(0, 1), (5, 4 << 20), (1 << 20, 2 << 20), (len(content) - 10, 10)]
    send, receive = await _socket_pair()
    reader = FrameReader(receive, DEFAULT_LIMITS, PayloadBuffers())
    received: list[tuple[object, bytes | None]] = []

    async def read_all() -> None:
        for _ in range(2 * len(spans)):
            frame = await reader.receive()
            assert frame is not None
            received.append((frame[0], None if frame[1] is None else bytes(frame[1])))

    ranges = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        writer = FrameWriter(send)
        for index, (offset, length) in enumerate(spans):
            ranges.append(FileRange(os.open(path, os.O_RDONLY), offset, length))
            await writer.send(["file", index], ranges[-1])
            await writer.send(["bytes", index], b"after")
    assert received == [
        frame
        for index, (offset, length) in enumerate(spans)
        for frame in (
            (["file", index], content[offset : offset + length]),
            (["bytes", index], b"after"),
        )
    ]
    assert all(sent.fd == -1 for sent in ranges)


async def test_a_file_shorter_than_its_range_breaks_the_writer(tmp_path: Path) -> None:
    """The frame's length was promised; a file that ends early cannot fill it, so the
    writer breaks (the owner closes the connection) instead of hanging or lying."""
    path = tmp_path / "short"
    path.write_bytes(b"x" * 1000)
    send, _receive = await _socket_pair()
    writer = FrameWriter(send)
    short = FileRange(os.open(path, os.O_RDONLY), 500, 1000)
    with pytest.raises(trio.BrokenResourceError):
        await writer.send(["file"], short)
    assert writer.broken


async def test_a_payload_held_by_its_receiver_is_never_overwritten() -> None:
    """The pool hands a buffer out again only after every reference to it is gone: a
    payload kept (or a view of it kept) reads the same after later payloads arrive."""
    size = 2 * RECEIVE_BYTES
    send, receive = await _socket_pair()
    buffers = PayloadBuffers()
    reader = FrameReader(receive, DEFAULT_LIMITS, buffers)
    writer = FrameWriter(send)
    kept: list[tuple[bytes, bytearray | memoryview]] = []
    async with trio.open_nursery() as nursery:
        for fill in range(8):
            content = bytes([fill]) * size
            nursery.start_soon(writer.send, [fill], content)
            frame = await reader.receive()
            assert frame is not None and isinstance(frame[1], bytearray)
            if fill % 3 == 0:
                kept.append((content, frame[1]))
            elif fill % 3 == 1:
                kept.append((content[size // 2 :], memoryview(frame[1])[size // 2 :]))
            del frame
    assert buffers.spare_bytes > 0
    for content, held in kept:
        assert bytes(held) == content


async def test_a_payload_buffer_is_reused_once_its_receiver_drops_it() -> None:
    size = 2 * RECEIVE_BYTES
    send, receive = await _socket_pair()
    buffers = PayloadBuffers()
    reader = FrameReader(receive, DEFAULT_LIMITS, buffers)
    writer = FrameWriter(send)
    identities = set()
    async with trio.open_nursery() as nursery:
        for fill in range(5):
            nursery.start_soon(writer.send, [fill], bytes([fill]) * size)
            frame = await reader.receive()
            assert frame is not None and frame[1] == bytes([fill]) * size
            identities.add(id(frame[1]))
            del frame
    assert len(identities) == 1
    assert buffers.spare_bytes == size


def test_payload_buffers_stay_within_their_limit() -> None:
    """Buffers beyond the limit are handed out but not kept; a free buffer of another
    size gives way to a new one; small and huge payloads are never pooled."""
    size = RECYCLED_PAYLOAD_BYTES_MIN
    buffers = PayloadBuffers(spare_bytes_max=3 * size)
    held = [buffers.take(size) for _ in range(5)]
    assert len({id(buffer) for buffer in held}) == 5
    assert buffers.spare_bytes == 3 * size
    assert len(buffers.take(size - 1)) == size - 1
    assert buffers.spare_bytes == 3 * size
    huge = PayloadBuffers()
    assert len(huge.take(RECYCLED_PAYLOAD_BYTES_MAX + 1)) == RECYCLED_PAYLOAD_BYTES_MAX + 1
    assert huge.spare_bytes == 0
    first = id(held.pop(0))
    again = buffers.take(size)
    assert id(again) == first
    del again
    assert len(buffers.take(2 * size)) == 2 * size
    assert buffers.spare_bytes == 2 * size
    few = PayloadBuffers(spares_max=2)
    held = [few.take(size) for _ in range(3)]
    assert few.spare_bytes == 2 * size
    held.clear()
    assert len(few.take(3 * size)) == 3 * size
    assert few.spare_bytes == 4 * size


async def test_a_peer_that_stops_reading_breaks_the_writer_at_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, _receive = await _socket_pair()
    writer = FrameWriter(send, send_timeout_s=5.0)
    started = trio.current_time()
    with pytest.raises(trio.BrokenResourceError, match="did not read for 5.0 s"):
        await writer.send(["big"], bytes(8 << 20))
    assert writer.broken and trio.current_time() - started >= 5.0
    with pytest.raises(trio.ClosedResourceError):
        await writer.send(["after"])


def test_bin_length_at_the_limit_is_accepted_and_one_more_is_refused() -> None:
    assert _read_all(raw_frame([b"\xff" * 1000]))[0][0] == [b"\xff" * 1000]
    with pytest.raises(ProtocolError, match="max_bin_len"):
        _read_all(raw_frame([b"\xff" * 1001]))


def test_map_length_at_the_limit_is_accepted_and_one_more_is_refused() -> None:
    at_limit = {i: str(i) for i in range(100)}
    assert _read_all(raw_frame(at_limit))[0][0] == at_limit
    with pytest.raises(ProtocolError, match="max_map_len"):
        _read_all(raw_frame({i: str(i) for i in range(101)}))


@pytest.mark.parametrize(
    "ext",
    [
        b"\xc7\x00\x05",  # ext 8 with no data: within max_ext_len 0, yet an ext
        b"\xc7\x00\xff",  # the same with the timestamp type
        b"\xd4\x05\x00",  # fixext 1
        b"\xd6\xff\x00\x00\x00\x00",  # a timestamp (fixext 4, type -1)
        b"\xd8\x05" + bytes(16),  # fixext 16
        b"\xc8\x00\x03\x05abc",  # ext 16
    ],
)
def test_msgpack_ext_types_are_refused_whatever_their_length(ext: bytes) -> None:
    header = b"\x92\x01" + ext  # [1, <ext>]
    with pytest.raises(ProtocolError, match="ext|timestamp"):
        _read_all(struct.pack(">II", len(header), 0) + header)


def test_each_handshake_limit_at_its_edge_and_just_past_it() -> None:
    from wire.framing import HANDSHAKE_LIMITS as HS

    assert (HS.header_bytes_max, HS.string_bytes_max, HS.container_items_max) == (512, 256, 8)
    assert (HS.payload_bytes_max, HS.nesting_depth_max) == (0, 2)
    # header bytes: one bin of n bytes packs to n + 2 (bin 8) or n + 3 (bin 16)
    assert len(_read_all(raw_frame(b"\xff" * 253), HS)) == 1  # 255 header bytes
    fits = ["a" * 256, "b" * 250]  # 1 + (3 + 256) + (2 + 250) = 512 header bytes
    assert len(msgpack.packb(fits)) == HS.header_bytes_max
    assert _read_all(raw_frame(fits), HS)[0][0] == fits
    with pytest.raises(ProtocolError, match=r"frame header of 513 bytes \(limit 512\)"):
        _read_all(raw_frame(["a" * 256, "b" * 251]), HS)
    # strings and bins
    assert _read_all(raw_frame(["a" * 256]), HS)[0][0] == ["a" * 256]
    assert _read_all(raw_frame([b"a" * 256]), HS)[0][0] == [b"a" * 256]
    with pytest.raises(ProtocolError, match="max_str_len"):
        _read_all(raw_frame(["a" * 257]), HS)
    with pytest.raises(ProtocolError, match="max_bin_len"):
        _read_all(raw_frame([b"a" * 257]), HS)
    # containers
    assert _read_all(raw_frame(list(range(8))), HS)[0][0] == list(range(8))
    assert _read_all(raw_frame({i: i for i in range(8)}), HS)[0][0] == {i: i for i in range(8)}
    with pytest.raises(ProtocolError, match="max_array_len"):
        _read_all(raw_frame(list(range(9))), HS)
    with pytest.raises(ProtocolError, match="max_map_len"):
        _read_all(raw_frame({i: i for i in range(9)}), HS)
    # nesting
    assert len(_read_all(raw_frame([[0], [1]]), HS)) == 1
    with pytest.raises(ProtocolError, match="nested deeper than 2"):
        _read_all(raw_frame([[[0]]]), HS)
    # payload: none at all
    with pytest.raises(ProtocolError, match=r"frame payload of 1 bytes \(limit 0\)"):
        _read_all(raw_frame([0], b"x"), HS)
