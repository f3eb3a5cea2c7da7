"""On-disk format of log segments: pure encoding and scanning, no I/O.

A segment file is a 24-byte header followed by records::

    segment header  magic "PAXFSLOG" | format u16 | flags u16 | first record number u64
                    | CRC32C of the preceding 20 bytes (u32)
    record          marker "\\xc1PXR" | payload length u32 | CRC32C of payload u32
                    | CRC32C of the preceding 12 header bytes (u32) | payload

All integers are big-endian. Records are numbered implicitly: the first record of a segment
carries the header's first number, each next one the number after.

Why the record header has its own checksum: a verified length tells a torn write (the payload
runs past the end of the file) from a damaged length field, which must not be taken for one.
Why a marker: after a bad record, :func:`scan_segment` looks for a valid record further on
(``bytes.find`` on the marker) to tell a torn tail, which may be cut, from damage in the
middle, which must not. ``0xc1`` is the one byte msgpack never uses as a type, so the marker
rarely occurs inside the msgpack payloads the metaserver logs.

The BASE flag marks a segment that starts the log: written by compaction (or at creation), it
makes every segment with a lower first number obsolete.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import crc32c

from metaserver.storage.errors import StorageCorruption, StorageFormatError

RecordNumber = NewType("RecordNumber", int)
"""Position of a record in the log, assigned by the storage: 1, 2, 3, ... never reused, not
even by compaction (kept records get fresh, higher numbers)."""

FIRST_RECORD_NUMBER = RecordNumber(1)
LOG_FORMAT_VERSION = 1
SEGMENT_MAGIC = b"PAXFSLOG"
SEGMENT_FLAG_BASE = 0x0001
_SEGMENT_FLAGS_KNOWN = SEGMENT_FLAG_BASE
_SEGMENT_PREFIX = struct.Struct(">8sHHQ")
SEGMENT_HEADER_BYTES = _SEGMENT_PREFIX.size + 4

RECORD_MARKER = b"\xc1PXR"
_RECORD_PREFIX = struct.Struct(">4sII")
_CRC = struct.Struct(">I")
RECORD_HEADER_BYTES = _RECORD_PREFIX.size + _CRC.size
RECORD_PAYLOAD_BYTES_LIMIT = 2**32 - 1
"""What the u32 length field can describe; the configured limit is far lower."""


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """What a segment's header says: where its numbering starts, whether it starts the log."""

    first: RecordNumber
    base: bool


@dataclass(frozen=True, slots=True)
class TornTail:
    """An incomplete or damaged last record that :func:`scan_segment` found cuttable."""

    offset: int
    reason: str
    bytes_cut: int


@dataclass(frozen=True, slots=True)
class SegmentScan:
    """The valid records of one segment; ``valid_bytes`` is where the valid part ends."""

    header: SegmentHeader
    payloads: list[bytes]
    valid_bytes: int
    torn: TornTail | None


def encode_segment_header(first: RecordNumber, *, base: bool) -> bytes:
    """The header of a segment whose first record will be numbered ``first``."""
    prefix = _SEGMENT_PREFIX.pack(
        SEGMENT_MAGIC, LOG_FORMAT_VERSION, SEGMENT_FLAG_BASE if base else 0, first
    )
    return prefix + _CRC.pack(crc32c.crc32c(prefix))


def decode_segment_header(data: bytes, path: str) -> SegmentHeader:
    """Parse the header at the start of ``data`` (a segment file named ``path``).

    Raises :class:`StorageFormatError` for a file that is not a segment or has a format we do
    not know, :class:`StorageCorruption` for a damaged header (segments appear by rename only
    once their header is durable, so a bad header is never a torn write).
    """
    if len(data) < SEGMENT_HEADER_BYTES or data[: len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
        raise StorageFormatError(f"{path} is not a paxfs log segment (no segment header)")
    magic, version, flags, first = _SEGMENT_PREFIX.unpack_from(data)
    (stored_crc,) = _CRC.unpack_from(data, _SEGMENT_PREFIX.size)
    if stored_crc != crc32c.crc32c(data[: _SEGMENT_PREFIX.size]):
        raise StorageCorruption(path, 0, "segment header checksum mismatch")
    if version != LOG_FORMAT_VERSION:
        raise StorageFormatError(
            f"{path}: log segment format {version}; this paxfs knows format {LOG_FORMAT_VERSION}"
        )
    if flags & ~_SEGMENT_FLAGS_KNOWN or first < FIRST_RECORD_NUMBER:
        raise StorageFormatError(f"{path}: unknown segment flags {flags:#x} or first {first}")
    return SegmentHeader(RecordNumber(first), bool(flags & SEGMENT_FLAG_BASE))


def encode_records(payloads: Sequence[bytes]) -> bytes:
    """The frames of ``payloads``, concatenated, ready to append to a segment."""
    parts: list[bytes] = []
    for payload in payloads:
        prefix = _RECORD_PREFIX.pack(RECORD_MARKER, len(payload), crc32c.crc32c(payload))
        parts.append(prefix)
        parts.append(_CRC.pack(crc32c.crc32c(prefix)))
        parts.append(payload)
    return b"".join(parts)


def _check_record(data: bytes, offset: int) -> int | tuple[str, int]:
    """The offset after the valid record at ``offset``; else why it is bad and where a search
    for a valid record after it may start (past its extent when its header, hence its length,
    is intact, so that a payload is never searched for records inside it)."""
    remaining = len(data) - offset
    if remaining < RECORD_HEADER_BYTES:
        return f"incomplete record header ({remaining} of {RECORD_HEADER_BYTES} bytes)", len(data)
    marker, length, payload_crc = _RECORD_PREFIX.unpack_from(data, offset)
    if marker != RECORD_MARKER:
        return "no record marker", offset + 1
    (header_crc,) = _CRC.unpack_from(data, offset + _RECORD_PREFIX.size)
    if header_crc != crc32c.crc32c(data[offset : offset + _RECORD_PREFIX.size]):
        return "record header checksum mismatch", offset + 1
    start = offset + RECORD_HEADER_BYTES
    end: int = start + length
    if end > len(data):
        return f"incomplete record ({length} payload bytes, {len(data) - start} present)", end
    if payload_crc != crc32c.crc32c(data[start:end]):
        return "record checksum mismatch", end
    return end


def _find_valid_record(data: bytes, start: int) -> int | None:
    """Offset of the first valid record that begins at or after ``start``, if any."""
    position = data.find(RECORD_MARKER, start)
    while position != -1:
        if isinstance(_check_record(data, position), int):
            return position
        position = data.find(RECORD_MARKER, position + 1)
    return None


def scan_segment(data: bytes, path: str, *, is_last: bool) -> SegmentScan:
    """Parse a whole segment file's contents.

    The first bad record ends the scan. In the last segment it is a torn tail (returned in
    ``torn``, for the caller to cut) unless a valid record follows it anywhere further on;
    in any other segment, or with a valid record after it, it is damage in the middle of the
    log and raises :class:`StorageCorruption` naming the file and offset.
    """
    header = decode_segment_header(data, path)
    payloads: list[bytes] = []
    offset = SEGMENT_HEADER_BYTES
    while offset < len(data):
        checked = _check_record(data, offset)
        if isinstance(checked, int):
            payloads.append(data[offset + RECORD_HEADER_BYTES : checked])
            offset = checked
            continue
        reason, search_from = checked
        if not is_last:
            raise StorageCorruption(path, offset, f"{reason}, in a segment that is not the last")
        following = _find_valid_record(data, search_from)
        if following is not None:
            raise StorageCorruption(
                path, offset, f"{reason}, followed by a valid record at offset {following}"
            )
        return SegmentScan(header, payloads, offset, TornTail(offset, reason, len(data) - offset))
    return SegmentScan(header, payloads, offset, None)
