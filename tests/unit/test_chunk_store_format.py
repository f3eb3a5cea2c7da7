"""The replica file format as pure encodings: what is accepted, what is refused and why."""

from __future__ import annotations

import struct

import crc32c
import pytest

from wire.ids import ChunkId
from wire.replica_format import (
    BLOCK_SIZE_BYTES,
    ENTRY_SIZE_BYTES,
    HEADER_BYTES,
    BlockEntry,
    EntryCorrupt,
    FormatMismatch,
    Header,
    HeaderCorrupt,
    decode_entry,
    decode_header,
    encode_entry,
    encode_header,
    layout_for_capacity,
)

HEADER = Header(
    chunk_id=ChunkId(0x1234_5678_9ABC), block_count=16, compressed=True, length_bytes=99
)


def test_header_round_trips_and_fits_one_sector() -> None:
    encoded = encode_header(HEADER)
    assert len(encoded) == HEADER_BYTES <= 512
    assert decode_header(encoded) == HEADER


def test_header_refusals_distinguish_foreign_files_from_damage() -> None:
    encoded = bytearray(encode_header(HEADER))
    with pytest.raises(FormatMismatch, match="bad magic"):
        decode_header(b"\x7fELF" + bytes(60))
    with pytest.raises(FormatMismatch):
        decode_header(b"")
    damaged = bytearray(encoded)
    damaged[40] ^= 1
    with pytest.raises(HeaderCorrupt, match="checksum"):
        decode_header(bytes(damaged))
    with pytest.raises(HeaderCorrupt, match="cut short"):
        decode_header(bytes(encoded[:20]))


def test_header_of_a_newer_format_is_refused_by_name() -> None:
    body = bytearray(encode_header(HEADER)[:-4])
    struct.pack_into("<I", body, 8, 2)
    future = bytes(body) + struct.pack("<I", crc32c.crc32c(bytes(body)))
    with pytest.raises(FormatMismatch, match="format 2; this paxfs knows format 1"):
        decode_header(future)


def test_header_with_a_length_beyond_capacity_is_damage() -> None:
    too_long = Header(HEADER.chunk_id, 1, False, BLOCK_SIZE_BYTES + 1)
    with pytest.raises(HeaderCorrupt, match="impossible"):
        decode_header(encode_header(too_long))


@pytest.mark.parametrize(
    "entry",
    [
        None,
        BlockEntry(
            slot=0, compressed=False, stored_len=BLOCK_SIZE_BYTES, data_len=BLOCK_SIZE_BYTES, crc=7
        ),
        BlockEntry(slot=1, compressed=True, stored_len=100, data_len=5000, crc=0xFFFFFFFF),
        BlockEntry(slot=1, compressed=False, stored_len=1, data_len=1, crc=0),
    ],
)
def test_entry_round_trips(entry: BlockEntry | None) -> None:
    encoded = encode_entry(17, entry)
    assert len(encoded) == ENTRY_SIZE_BYTES
    assert decode_entry(17, encoded) == entry


def test_entry_read_from_the_wrong_place_or_zeroed_is_refused() -> None:
    entry = BlockEntry(slot=1, compressed=False, stored_len=10, data_len=10, crc=5)
    with pytest.raises(EntryCorrupt):
        decode_entry(18, encode_entry(17, entry))
    with pytest.raises(EntryCorrupt):
        decode_entry(0, bytes(ENTRY_SIZE_BYTES))
    flipped = bytearray(encode_entry(3, entry))
    flipped[5] ^= 0x80
    with pytest.raises(EntryCorrupt):
        decode_entry(3, bytes(flipped))


def test_layout_keeps_slots_apart_and_aligned() -> None:
    layout = layout_for_capacity(64 * 1024 * 1024)
    assert layout.block_count == 1024
    assert layout.data_offset % BLOCK_SIZE_BYTES == 0
    assert layout.data_offset >= layout.entry_offset(layout.block_count)
    offsets = {
        layout.slot_offset(block, slot) for block in range(layout.block_count) for slot in (0, 1)
    }
    assert len(offsets) == 2 * layout.block_count
    assert layout.slot_offset(1, 0) - layout.slot_offset(0, 0) == BLOCK_SIZE_BYTES
    assert max(offsets) + BLOCK_SIZE_BYTES == layout.data_offset + 2 * layout.capacity_bytes


@pytest.mark.parametrize("capacity", [0, -BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES + 1, 1 << 40])
def test_chunk_sizes_that_are_not_whole_blocks_or_too_big_are_refused(capacity: int) -> None:
    with pytest.raises(ValueError):
        layout_for_capacity(capacity)
