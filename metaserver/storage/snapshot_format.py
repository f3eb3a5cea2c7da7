"""On-disk format of snapshot files: pure encoding and decoding, no I/O.

A snapshot file is a 48-byte header followed by one zstd frame::

    magic "PAXFSSNP" | format u16 | flags u16 (0) | log index u64 | raw bytes u64
    | body bytes u64 | CRC32C of the body u32 | CRC32C of the preceding 40 bytes u32
    | body: zstd frame (with content size and zstd's own checksum)

The index is the caller's (the last log position the snapshot covers); the storage only
keeps it. Big-endian integers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c
import zstandard

from metaserver.storage.errors import StorageCorruption, StorageFormatError

SNAPSHOT_FORMAT_VERSION = 1
SNAPSHOT_MAGIC = b"PAXFSSNP"
SNAPSHOT_ZSTD_LEVEL_DEFAULT = 3
"""zstd's own default: about 100 MiB/s on this machine, a few times smaller for msgpack."""
_PREFIX = struct.Struct(">8sHHQQQI")
_CRC = struct.Struct(">I")
SNAPSHOT_HEADER_BYTES = _PREFIX.size + _CRC.size
_INDEX_LIMIT = 2**64


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-machine snapshot: opaque ``data`` covering the caller's log up to ``index``."""

    index: int
    data: bytes


def encode_snapshot(index: int, data: bytes, *, zstd_level: int) -> tuple[bytes, bytes]:
    """The header and compressed body of a snapshot file (separate, to spare a copy)."""
    if not 0 <= index < _INDEX_LIMIT:
        raise ValueError(f"snapshot index {index} is outside 0..2**64-1")
    compressor = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True)
    body = compressor.compress(data)
    prefix = _PREFIX.pack(
        SNAPSHOT_MAGIC,
        SNAPSHOT_FORMAT_VERSION,
        0,
        index,
        len(data),
        len(body),
        crc32c.crc32c(body),
    )
    return prefix + _CRC.pack(crc32c.crc32c(prefix)), body


def decode_snapshot(blob: bytes, path: str, *, raw_bytes_max: int) -> Snapshot:
    """Verify and decompress a snapshot file's contents.

    Raises :class:`StorageFormatError` for a file that is not a snapshot of a known format and
    :class:`StorageCorruption` for a damaged one (snapshots appear by rename only once durable,
    so any damage is corruption, never a torn write).
    """
    if len(blob) < SNAPSHOT_HEADER_BYTES or blob[: len(SNAPSHOT_MAGIC)] != SNAPSHOT_MAGIC:
        raise StorageFormatError(f"{path} is not a paxfs snapshot (no snapshot header)")
    magic, version, flags, index, raw_bytes, body_bytes, body_crc = _PREFIX.unpack_from(blob)
    (header_crc,) = _CRC.unpack_from(blob, _PREFIX.size)
    if header_crc != crc32c.crc32c(blob[: _PREFIX.size]):
        raise StorageCorruption(path, 0, "snapshot header checksum mismatch")
    if version != SNAPSHOT_FORMAT_VERSION or flags != 0:
        raise StorageFormatError(
            f"{path}: snapshot format {version} (flags {flags:#x}); this paxfs knows format "
            f"{SNAPSHOT_FORMAT_VERSION}"
        )
    if raw_bytes > raw_bytes_max:
        raise StorageCorruption(
            path, 0, f"snapshot claims {raw_bytes} bytes, more than the limit {raw_bytes_max}"
        )
    body = blob[SNAPSHOT_HEADER_BYTES:]
    if len(body) != body_bytes:
        raise StorageCorruption(
            path, SNAPSHOT_HEADER_BYTES, f"body of {len(body)} bytes, header says {body_bytes}"
        )
    if crc32c.crc32c(body) != body_crc:
        raise StorageCorruption(path, SNAPSHOT_HEADER_BYTES, "snapshot body checksum mismatch")
    try:
        data = zstandard.ZstdDecompressor().decompress(body, max_output_size=raw_bytes)
    except zstandard.ZstdError as error:
        raise StorageCorruption(path, SNAPSHOT_HEADER_BYTES, f"zstd: {error}") from None
    if len(data) != raw_bytes:
        raise StorageCorruption(
            path, SNAPSHOT_HEADER_BYTES, f"{len(data)} bytes decompressed, header says {raw_bytes}"
        )
    return Snapshot(index, data)
