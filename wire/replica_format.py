"""On-disk format of one chunk replica file (format version 1): pure encoding, no I/O.

Rules of this module: it knows byte layouts, block checksums and the block codec, and
nothing else. It reads no clock and opens no file; its only state is the codec's zstd
contexts, one per thread. :mod:`dataserver.chunk_file` does the I/O. It lives in ``wire``
because the file is read by two parties: the dataserver, and a client on the same host
that the dataserver lets read a replica itself (:mod:`wire.local_reads`).

A replica file is laid out as::

    [0, 4096)                 header sector (64 used bytes, rest zero)
    [4096, data_offset)       index: one 32-byte entry per block, in block order
    [data_offset, ...)        slot region 0: block i's slot 0 at data_offset + i * 64 KiB
    [... + region, ...)       slot region 1: block i's slot 1 one region further on

Each block has two fixed 64 KiB slots so that an overwrite never touches the slot the last
durable index points to (the crash argument is in :mod:`dataserver.chunk_file`). Keeping the
slots of one kind in one contiguous region makes a sequential write of fresh blocks a single
``pwrite`` and lets unused slots stay holes in a sparse file.

The header and every index entry carry their own CRC32C, and an entry's CRC also covers its
block index, so an entry read from the wrong place or zeroed by a lost write is caught. An
absent block has an explicit, checksummed "absent" entry: a zeroed index sector is corruption,
never a hole.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import crc32c
import zstandard

from wire.ids import ChunkId
from wire.invariant import invariant

FORMAT_VERSION = 1
"""Version of the replica file format and of the data directory's FORMAT file."""

BLOCK_SIZE_BYTES = 64 * 1024
"""Fixed logical size of a block; the unit of checksumming, compression and slot placement."""

SLOT_COUNT = 2

HEADER_MAGIC = b"PAXFSCHK"
HEADER_SECTOR_BYTES = 4096
"""The header occupies the first 4 KiB; its 64 used bytes sit inside one 512-byte sector."""

INDEX_OFFSET_BYTES = HEADER_SECTOR_BYTES
ENTRY_SIZE_BYTES = 32
"""32 divides 512, so no entry straddles a disk sector."""

COMPRESSION_LEVEL_DEFAULT = 1
"""zstd level for new blocks: level 1 keeps compression near disk speed on one core."""

BLOCK_COUNT_MAX = 1 << 20
"""Upper bound on blocks per replica (64 GiB chunks); bounds the index read at open."""

_HEADER_FLAG_COMPRESSED = 1

_ENTRY_TAG = 0xB1
_ENTRY_FLAG_PRESENT = 1
_ENTRY_FLAG_COMPRESSED = 2

# magic, format version, block size, block count, flags, chunk id, length, reserved; then CRC.
_HEADER = struct.Struct("<8sIIIIQQ20x")
_HEADER_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _HEADER_CRC.size

# tag, flags, slot, reserved, stored length, data length, data CRC, reserved; then entry CRC.
_ENTRY = struct.Struct("<BBBxIII12x")
_ENTRY_CRC = struct.Struct("<I")
_BLOCK_INDEX = struct.Struct("<I")

invariant(HEADER_BYTES == 64, f"header is {HEADER_BYTES} bytes, expected 64")
invariant(_ENTRY.size + _ENTRY_CRC.size == ENTRY_SIZE_BYTES, "index entry size drifted")


class FormatMismatch(Exception):
    """The bytes are not a paxfs replica file of a format this code knows."""


class HeaderCorrupt(Exception):
    """The header has our magic but fails its checksum or its own consistency rules."""


class EntryCorrupt(Exception):
    """An index entry fails its checksum or holds impossible values."""


class BlockMismatch(Exception):
    """A block's stored bytes do not match its index entry (length, checksum, zstd)."""


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True, slots=True)
class Layout:
    """Byte offsets inside a replica file with room for ``block_count`` blocks."""

    block_count: int

    @property
    def capacity_bytes(self) -> int:
        return self.block_count * BLOCK_SIZE_BYTES

    @property
    def index_bytes(self) -> int:
        return self.block_count * ENTRY_SIZE_BYTES

    @property
    def data_offset(self) -> int:
        """Start of slot region 0, aligned to a block so slots are page- and extent-aligned."""
        return _align_up(INDEX_OFFSET_BYTES + self.index_bytes, BLOCK_SIZE_BYTES)

    def entry_offset(self, block_index: int) -> int:
        return INDEX_OFFSET_BYTES + block_index * ENTRY_SIZE_BYTES

    def slot_offset(self, block_index: int, slot: int) -> int:
        return self.data_offset + (slot * self.block_count + block_index) * BLOCK_SIZE_BYTES


def layout_for_capacity(capacity_bytes: int) -> Layout:
    """Layout for a chunk of ``capacity_bytes``, which must be a positive multiple of a block."""
    if capacity_bytes <= 0 or capacity_bytes % BLOCK_SIZE_BYTES:
        raise ValueError(
            f"chunk size must be a positive multiple of {BLOCK_SIZE_BYTES} bytes,"
            f" got {capacity_bytes}"
        )
    block_count = capacity_bytes // BLOCK_SIZE_BYTES
    if block_count > BLOCK_COUNT_MAX:
        raise ValueError(f"chunk size {capacity_bytes} exceeds {BLOCK_COUNT_MAX} blocks")
    return Layout(block_count)


@dataclass(frozen=True, slots=True)
class Header:
    """What a replica file says about itself; the version lives in the file name only."""

    chunk_id: ChunkId
    block_count: int
    compressed: bool
    length_bytes: int


def encode_header(header: Header) -> bytes:
    body = _HEADER.pack(
        HEADER_MAGIC,
        FORMAT_VERSION,
        BLOCK_SIZE_BYTES,
        header.block_count,
        _HEADER_FLAG_COMPRESSED if header.compressed else 0,
        header.chunk_id,
        header.length_bytes,
    )
    return body + _HEADER_CRC.pack(crc32c.crc32c(body))


def decode_header(raw: bytes) -> Header:
    """Decode a header; :class:`FormatMismatch` if not ours, :class:`HeaderCorrupt` if damaged."""
    if len(raw) < len(HEADER_MAGIC) or raw[: len(HEADER_MAGIC)] != HEADER_MAGIC:
        raise FormatMismatch("no paxfs chunk header (bad magic)")
    if len(raw) < HEADER_BYTES:
        raise HeaderCorrupt(f"header cut short at {len(raw)} bytes")
    body = raw[: _HEADER.size]
    (stored_crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
    if crc32c.crc32c(body) != stored_crc:
        raise HeaderCorrupt("header checksum mismatch")
    _, format_version, block_size, block_count, flags, chunk_id, length = _HEADER.unpack(body)
    if format_version != FORMAT_VERSION:
        raise FormatMismatch(
            f"chunk file format {format_version}; this paxfs knows format {FORMAT_VERSION}"
        )
    if block_size != BLOCK_SIZE_BYTES:
        raise FormatMismatch(f"block size {block_size}; this paxfs uses {BLOCK_SIZE_BYTES}")
    if not 0 < block_count <= BLOCK_COUNT_MAX or length > block_count * BLOCK_SIZE_BYTES:
        raise HeaderCorrupt(f"impossible header: {block_count} blocks, length {length}")
    if flags & ~_HEADER_FLAG_COMPRESSED:
        raise FormatMismatch(f"unknown header flags {flags:#x}")
    return Header(
        chunk_id=ChunkId(chunk_id),
        block_count=block_count,
        compressed=bool(flags & _HEADER_FLAG_COMPRESSED),
        length_bytes=length,
    )


@dataclass(frozen=True, slots=True)
class BlockEntry:
    """Where and how one present block is stored.

    ``data_len`` is how many leading bytes of the block are stored; the rest of the block
    reads as zeros. ``stored_len`` is the size in the slot (smaller when compressed) and
    ``crc`` the CRC32C of exactly those stored bytes.
    """

    slot: int
    compressed: bool
    stored_len: int
    data_len: int
    crc: int

    @property
    def is_full_raw(self) -> bool:
        """Uncompressed and a whole block: a run of such blocks in one slot region is one
        contiguous range of the file."""
        return not self.compressed and self.data_len == BLOCK_SIZE_BYTES


def _entry_crc(body: bytes, block_index: int) -> int:
    return crc32c.crc32c(_BLOCK_INDEX.pack(block_index), crc32c.crc32c(body))


def encode_entry(block_index: int, entry: BlockEntry | None) -> bytes:
    """The 32 index bytes for ``block_index``; ``None`` encodes an absent block (a hole)."""
    if entry is None:
        body = _ENTRY.pack(_ENTRY_TAG, 0, 0, 0, 0, 0)
    else:
        flags = _ENTRY_FLAG_PRESENT | (_ENTRY_FLAG_COMPRESSED if entry.compressed else 0)
        body = _ENTRY.pack(
            _ENTRY_TAG, flags, entry.slot, entry.stored_len, entry.data_len, entry.crc
        )
    return body + _ENTRY_CRC.pack(_entry_crc(body, block_index))


def decode_entry(block_index: int, raw: bytes | memoryview) -> BlockEntry | None:
    """Decode one entry; raise :class:`EntryCorrupt` if its checksum or fields are wrong."""
    body = bytes(raw[: _ENTRY.size])
    (stored_crc,) = _ENTRY_CRC.unpack_from(raw, _ENTRY.size)
    if _entry_crc(body, block_index) != stored_crc:
        raise EntryCorrupt(f"index entry of block {block_index} fails its checksum")
    tag, flags, slot, stored_len, data_len, crc = _ENTRY.unpack(body)
    if tag != _ENTRY_TAG or flags & ~(_ENTRY_FLAG_PRESENT | _ENTRY_FLAG_COMPRESSED):
        raise EntryCorrupt(f"index entry of block {block_index} has tag {tag}, flags {flags}")
    if not flags & _ENTRY_FLAG_PRESENT:
        return None
    if (
        slot >= SLOT_COUNT
        or not 0 < data_len <= BLOCK_SIZE_BYTES
        or not 0 < stored_len <= BLOCK_SIZE_BYTES
        or (not flags & _ENTRY_FLAG_COMPRESSED and stored_len != data_len)
    ):
        raise EntryCorrupt(
            f"index entry of block {block_index} is impossible:"
            f" slot {slot}, stored {stored_len}, data {data_len}"
        )
    return BlockEntry(
        slot=slot,
        compressed=bool(flags & _ENTRY_FLAG_COMPRESSED),
        stored_len=stored_len,
        data_len=data_len,
        crc=crc,
    )


@dataclass(frozen=True, slots=True)
class RawBlock:
    """One block exactly as stored, for copying a replica without recompressing it.

    ``payload`` is what the slot holds (zstd frame if ``compressed``), ``crc32c`` its
    checksum, ``data_len`` the logical bytes it stands for; the rest of the block is zeros.
    """

    block_index: int
    data_len: int
    compressed: bool
    crc32c: int
    payload: bytes


def block_crc(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of one block's stored bytes (at most 64 KiB), keeping the GIL.

    By default crc32c lets go of the GIL for 32 KiB and more: a thread checking a run of
    blocks then had to win the GIL back after every block, each time waiting up to the
    interpreter's switch interval while the event loop thread ran, which made a 4 MiB
    read take many times its ~0.2 ms of checksum work."""
    return crc32c.crc32c(data, gil_release_mode=0)


class BlockCodec:
    """zstd for single blocks, with one (de)compressor per thread: zstandard's are not
    thread-safe, and concurrent calls on different chunks run in different threads."""

    def __init__(self, level: int = COMPRESSION_LEVEL_DEFAULT) -> None:
        self._level = level
        self._local = threading.local()

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._level, write_content_size=True)
            self._local.compressor = compressor
        return compressor.compress(data)

    def decompress(self, payload: bytes | memoryview, data_len: int) -> bytes:
        """Decompress a block; raise :class:`zstandard.ZstdError` if it is not a valid frame."""
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            self._local.decompressor = decompressor
        return decompressor.decompress(payload, max_output_size=data_len)


def block_content(
    entry: BlockEntry, stored: bytes | memoryview, codec: BlockCodec
) -> bytes | memoryview:
    """The block's logical bytes (``entry.data_len`` of them) from its ``stored`` bytes,
    verified against ``entry``; :class:`BlockMismatch` says why they do not match."""
    if len(stored) != entry.stored_len:
        raise BlockMismatch("stored bytes are missing")
    if block_crc(stored) != entry.crc:
        raise BlockMismatch("checksum mismatch")
    if not entry.compressed:
        return stored
    try:
        content = codec.decompress(stored, entry.data_len)
    except zstandard.ZstdError as exc:
        raise BlockMismatch(f"stored bytes do not decompress: {exc}") from exc
    if len(content) != entry.data_len:
        raise BlockMismatch(f"decompresses to {len(content)} bytes, not {entry.data_len}")
    return content
