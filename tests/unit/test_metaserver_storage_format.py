"""Segment and snapshot formats, without any file: framing, torn tails, corruption.

Hypothesis examples are derived from ``PAXFS_SEED`` (printed); rerun with it to replay.
"""

from __future__ import annotations

import os
import random
import struct

import crc32c
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from metaserver.storage.errors import StorageCorruption, StorageFormatError
from metaserver.storage.record_format import (
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    RecordNumber,
    decode_segment_header,
    encode_records,
    encode_segment_header,
    scan_segment,
)
from metaserver.storage.snapshot_format import (
    SNAPSHOT_HEADER_BYTES,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
)

SEED = int(os.environ.get("PAXFS_SEED") or random.SystemRandom().randrange(2**32))
MAX_EXAMPLES = 150
PAYLOADS = st.lists(st.binary(max_size=300), min_size=1, max_size=12)


@pytest.fixture(autouse=True)
def _print_seed() -> None:
    print(f"PAXFS_SEED={SEED}")


def segment(payloads: list[bytes], first: int = 1, *, base: bool = False) -> bytes:
    return encode_segment_header(RecordNumber(first), base=base) + encode_records(payloads)


def record_offsets(payloads: list[bytes]) -> list[int]:
    offsets = []
    offset = SEGMENT_HEADER_BYTES
    for payload in payloads:
        offsets.append(offset)
        offset += RECORD_HEADER_BYTES + len(payload)
    return offsets


def test_round_trip_keeps_payloads_in_order() -> None:
    payloads = [b"promise", b"", b"accept" * 100, bytes(range(256))]
    scan = scan_segment(segment(payloads, 7, base=True), "seg", is_last=True)
    assert scan.payloads == payloads
    assert scan.header.first == 7 and scan.header.base
    assert scan.torn is None


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (RECORD_HEADER_BYTES - 5, "incomplete record header"),  # partial length field
        (RECORD_HEADER_BYTES + 3, "incomplete record"),  # partial payload
    ],
)
def test_truncated_last_record_is_a_torn_tail(cut: int, reason: str) -> None:
    payloads = [b"one", b"two" * 10, b"three" * 10]
    data = segment(payloads)
    last = record_offsets(payloads)[-1]
    scan = scan_segment(data[: last + cut], "seg", is_last=True)
    assert scan.payloads == payloads[:-1]
    assert scan.valid_bytes == last
    assert scan.torn is not None and reason in scan.torn.reason
    assert scan.torn.bytes_cut == cut


def test_bad_checksum_of_last_record_is_a_torn_tail() -> None:
    payloads = [b"one", b"two", b"three"]
    data = bytearray(segment(payloads))
    data[-1] ^= 0x40
    scan = scan_segment(bytes(data), "seg", is_last=True)
    assert scan.payloads == payloads[:2]
    assert scan.torn is not None and scan.torn.reason == "record checksum mismatch"


def test_zero_filled_tail_is_a_torn_tail() -> None:
    payloads = [b"one", b"two"]
    data = segment(payloads) + bytes(4096)
    scan = scan_segment(data, "seg", is_last=True)
    assert scan.payloads == payloads
    assert scan.torn is not None and scan.torn.bytes_cut == 4096


def test_bad_record_followed_by_a_valid_one_is_corruption() -> None:
    payloads = [b"one", b"two", b"three"]
    data = bytearray(segment(payloads))
    middle = record_offsets(payloads)[1]
    data[middle + RECORD_HEADER_BYTES] ^= 0x01
    with pytest.raises(StorageCorruption) as caught:
        scan_segment(bytes(data), "log-x.seg", is_last=True)
    assert caught.value.offset == middle
    assert "log-x.seg: corrupt at byte offset" in str(caught.value)
    assert "followed by a valid record" in str(caught.value)


def test_damaged_length_field_in_the_middle_is_corruption_not_a_tear() -> None:
    payloads = [b"one", b"two", b"three"]
    data = bytearray(segment(payloads))
    middle = record_offsets(payloads)[1]
    data[middle + 4] = 0xFF  # length now points far past the end of the file
    with pytest.raises(StorageCorruption) as caught:
        scan_segment(bytes(data), "seg", is_last=True)
    assert caught.value.offset == middle
    assert "header checksum" in caught.value.reason


def test_torn_tail_of_a_segment_that_is_not_the_last_is_corruption() -> None:
    payloads = [b"one", b"two"]
    data = segment(payloads)[:-1]
    with pytest.raises(StorageCorruption, match="not the last"):
        scan_segment(data, "seg", is_last=False)


def test_foreign_or_damaged_segment_header_is_refused() -> None:
    header = bytearray(encode_segment_header(RecordNumber(1), base=False))
    with pytest.raises(StorageFormatError, match="not a paxfs log segment"):
        decode_segment_header(b"hello world, this is not a segment", "f")
    header[9] = 9  # format version 9; header checksum no longer matches either
    with pytest.raises(StorageCorruption, match="header checksum"):
        decode_segment_header(bytes(header), "f")


def test_segment_of_a_newer_format_is_refused_by_name() -> None:
    prefix = struct.pack(">8sHHQ", b"PAXFSLOG", 2, 0, 1)
    data = prefix + struct.pack(">I", crc32c.crc32c(prefix))
    with pytest.raises(StorageFormatError, match="format 2; this paxfs knows format 1"):
        decode_segment_header(data, "f")


@seed(SEED)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(payloads=PAYLOADS, data=st.data())
def test_any_truncation_recovers_a_prefix(payloads: list[bytes], data: st.DataObject) -> None:
    """A crash can stop a write at any byte: recovery keeps exactly the complete records."""
    encoded = segment(payloads)
    cut = data.draw(st.integers(SEGMENT_HEADER_BYTES, len(encoded)))
    scan = scan_segment(encoded[:cut], "seg", is_last=True)
    complete = sum(
        1
        for o, p in zip(record_offsets(payloads), payloads, strict=True)
        if o + RECORD_HEADER_BYTES + len(p) <= cut
    )
    assert scan.payloads == payloads[:complete]
    assert (scan.torn is None) == (scan.valid_bytes == cut)


@seed(SEED)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(payloads=PAYLOADS, data=st.data())
def test_any_flipped_byte_is_caught(payloads: list[bytes], data: st.DataObject) -> None:
    """Damage before the last record is corruption; damage in the last one a torn tail."""
    encoded = bytearray(segment(payloads))
    position = data.draw(st.integers(SEGMENT_HEADER_BYTES, len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(1, 255))
    offsets = record_offsets(payloads)
    damaged = max(i for i, o in enumerate(offsets) if o <= position)
    if damaged == len(payloads) - 1:
        scan = scan_segment(bytes(encoded), "seg", is_last=True)
        assert scan.payloads == payloads[:-1]
        assert scan.torn is not None and scan.torn.offset == offsets[-1]
    else:
        with pytest.raises(StorageCorruption) as caught:
            scan_segment(bytes(encoded), "seg", is_last=True)
        assert caught.value.offset == offsets[damaged]


def test_snapshot_round_trip_and_compression() -> None:
    data = b"inode table " * 10_000
    header, body = encode_snapshot(42, data, zstd_level=3)
    assert len(body) < len(data) // 20
    assert decode_snapshot(header + body, "s", raw_bytes_max=10**6) == Snapshot(42, data)
    empty_header, empty_body = encode_snapshot(0, b"", zstd_level=3)
    assert decode_snapshot(empty_header + empty_body, "s", raw_bytes_max=10) == Snapshot(0, b"")


@pytest.mark.parametrize("position", [3, 20, SNAPSHOT_HEADER_BYTES + 2, -1])
def test_damaged_snapshot_is_refused(position: int) -> None:
    header, body = encode_snapshot(42, b"state " * 1000, zstd_level=3)
    blob = bytearray(header + body)
    blob[position] ^= 0x10
    with pytest.raises((StorageCorruption, StorageFormatError)):
        decode_snapshot(bytes(blob), "s", raw_bytes_max=10**6)


def test_truncated_snapshot_is_refused() -> None:
    header, body = encode_snapshot(1, b"state " * 1000, zstd_level=3)
    with pytest.raises(StorageCorruption, match="body of"):
        decode_snapshot(header + body[:-1], "s", raw_bytes_max=10**6)


def test_snapshot_over_the_size_limit_is_refused() -> None:
    header, body = encode_snapshot(1, bytes(1000), zstd_level=3)
    with pytest.raises(StorageCorruption, match="more than the limit"):
        decode_snapshot(header + body, "s", raw_bytes_max=999)
