"""One open replica file: block I/O, checksums, per-block zstd, crash-safe index updates.

A :class:`ChunkFile` is not thread-safe; :class:`dataserver.chunk_store.ChunkStore` holds the
chunk's lock around every call. Layout and encodings are in :mod:`wire.replica_format`.

Why a crash never loses synced data and never yields torn data as good data:

1. *Writes never touch the durable copy.* Each block has two slots. ``_synced_slot[i]`` is
   the slot the durable (last synced) index points to; every write of block ``i`` goes to
   the other slot. However a data write tears, the block's durable bytes are untouched.
2. *The durable index never points at non-durable data.* Index entries and the header change
   only in memory between syncs. :meth:`ChunkFile.sync` does ``fdatasync`` (data durable),
   then writes the changed entries and header, then ``fdatasync`` again. A crash before the
   second step leaves the old index pointing at old, intact slots.
3. *Index writes cannot hurt other blocks.* An entry is 32 bytes at a 32-byte-aligned
   offset, so it never straddles a 512-byte sector; the header's 64 bytes sit in sector 0.
   We rely on sector writes being atomic (or at least "powersafe overwrite": a write does
   not change bytes outside its range, the assumption SQLite makes): an entry is old or new,
   and neighbouring entries keep their bytes. Each entry and the header carry a CRC32C,
   so a violated assumption shows up as a bad block, not as wrong data.
4. *A sync cut short is repaired at open.* If a crash lands inside step 2, some entries may
   be new and others old, and the header (holding the length) old or new. Each entry is
   still self-consistent; :meth:`ChunkFile.open` drops or trims blocks that reach past the
   recorded length, so the "bytes past the length read as zeros" rule holds again.
5. *Space is reclaimed only after it is unreferenced durably.* A slot released by an
   overwrite or a truncate is punched out of the sparse file after the sync that stopped
   referencing it, never before.
6. *Every read checks.* The CRC32C of the stored bytes is verified on every read, so bit rot,
   lost or misdirected writes surface as :class:`ChecksumError` naming the block.

7. *Write-behind changes no durability.* Written ranges are handed to writeback early and
   dropped from the page cache behind the writer (:mod:`dataserver.write_behind`), but
   only ``fdatasync`` in :meth:`ChunkFile.sync` makes anything durable, and a writeback
   error met early fails that sync as a failed ``fdatasync`` would.

So after a crash a replica reads back, block by block, as of its last sync or (for blocks
written since) with their new content; never torn bytes, never another block's loss.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeGuard

import crc32c

from dataserver.chunk_errors import ChecksumError, InvalidRequest, NoSpace
from dataserver.write_behind import WriteBehind
from wire.framing import PAYLOAD_BUFFERS, FileRange
from wire.ids import ChunkId, ChunkVersion
from wire.invariant import InvariantViolation, invariant
from wire.replica_format import (
    BLOCK_SIZE_BYTES,
    ENTRY_SIZE_BYTES,
    HEADER_BYTES,
    INDEX_OFFSET_BYTES,
    SLOT_COUNT,
    BlockCodec,
    BlockEntry,
    BlockMismatch,
    EntryCorrupt,
    Header,
    HeaderCorrupt,
    Layout,
    RawBlock,
    block_content,
    block_crc,
    decode_entry,
    decode_header,
    encode_entry,
    encode_header,
    layout_for_capacity,
)

_log = logging.getLogger(__name__)

Failpoint = Callable[[str], None]
"""Called with a point name at crash-relevant steps; tests use it to crash the process."""

_COMPRESSED_FRACTION_MAX_NUMERATOR = 15
_COMPRESSED_FRACTION_MAX_DENOMINATOR = 16
"""A block is stored compressed only if that saves at least 1/16 of it; else decompressing
it on every read would cost more than the space it saves."""

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset + length)`` keeping the file size; False if unsupported."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"disk full: {exc.strerror}") from exc
        raise


@dataclass(frozen=True, slots=True)
class _CorruptEntry:
    """Stands in memory for an index entry that failed its checksum."""

    reason: str


_Entry = BlockEntry | _CorruptEntry | None


def _no_failpoint(point: str) -> None:
    del point


class ChunkFile:
    """An open replica file. Not thread-safe: the owner serialises calls.

    Offsets are logical byte offsets inside the chunk. Writes and truncates become durable
    only when :meth:`sync` returns; until then they are visible to reads of this object.
    """

    def __init__(
        self,
        fd: int,
        *,
        chunk_id: ChunkId,
        version: ChunkVersion,
        header: Header,
        entries: list[_Entry],
        codec: BlockCodec,
        failpoint: Failpoint | None,
    ) -> None:
        self.fd = fd
        self.chunk_id = chunk_id
        self.version = version
        self.layout = Layout(header.block_count)
        self.compressed = header.compressed
        self.length_bytes = header.length_bytes
        self._codec = codec
        self._failpoint = failpoint or _no_failpoint
        self._entries = entries
        self._synced_slot: list[int | None] = [
            entry.slot if isinstance(entry, BlockEntry) else None for entry in entries
        ]
        self._dirty_blocks: set[int] = set()
        self._released_slots: set[tuple[int, int]] = set()
        self._header_dirty = False
        self._writes_unsynced = False
        self._punch_supported = True
        self._write_behind = WriteBehind(fd)

    # ---- opening and closing -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        dir_fd: int,
        name: str,
        *,
        chunk_id: ChunkId,
        version: ChunkVersion,
        capacity_bytes: int,
        compressed: bool,
        codec: BlockCodec,
        failpoint: Failpoint | None = None,
    ) -> ChunkFile:
        """Create an empty replica file ``name`` (which must not exist); durable after sync."""
        layout = layout_for_capacity(capacity_bytes)
        header = Header(chunk_id, layout.block_count, compressed, 0)
        image = bytearray(INDEX_OFFSET_BYTES)
        image[:HEADER_BYTES] = encode_header(header)
        image += b"".join(encode_entry(block, None) for block in range(layout.block_count))
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        chunk_file = cls(
            fd,
            chunk_id=chunk_id,
            version=version,
            header=header,
            entries=[None] * layout.block_count,
            codec=codec,
            failpoint=failpoint,
        )
        try:
            _pwrite_all(fd, image, 0)
        except BaseException:
            os.close(fd)
            raise
        chunk_file._writes_unsynced = True
        return chunk_file

    @classmethod
    def open(
        cls,
        dir_fd: int,
        name: str,
        *,
        chunk_id: ChunkId,
        version: ChunkVersion,
        codec: BlockCodec,
        failpoint: Failpoint | None = None,
    ) -> ChunkFile:
        """Open an existing replica file and load its index.

        Raises :class:`replica_format.FormatMismatch` if the file is not ours and
        :class:`replica_format.HeaderCorrupt` if its header is damaged or names another chunk.
        """
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            header = read_header(fd)
            if header.chunk_id != chunk_id:
                raise HeaderCorrupt(f"header names chunk {header.chunk_id:#x}")
            layout = Layout(header.block_count)
            index = os.pread(fd, layout.index_bytes, INDEX_OFFSET_BYTES)
            entries = _decode_index(index, layout.block_count)
            chunk_file = cls(
                fd,
                chunk_id=chunk_id,
                version=version,
                header=header,
                entries=entries,
                codec=codec,
                failpoint=failpoint,
            )
            chunk_file._cut_past_length()
        except BaseException:
            os.close(fd)
            raise
        return chunk_file

    def close(self) -> None:
        """Close the file descriptor; unsynced writes are dropped, as a crash would drop them."""
        os.close(self.fd)
        self.fd = -1

    # ---- queries --------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.layout.capacity_bytes

    @property
    def has_unsynced_changes(self) -> bool:
        return bool(self._dirty_blocks or self._header_dirty or self._writes_unsynced)

    def disk_bytes(self) -> int:
        """Bytes the file occupies on disk (allocated blocks; holes count nothing)."""
        return os.fstat(self.fd).st_blocks * 512

    # ---- reads ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes | memoryview:
        """Return up to ``size`` bytes at ``offset``, fewer at the end of the replica.

        Only the blocks in the range are read, and each is verified; holes read as zeros.
        Neighbouring whole uncompressed blocks in one slot region are fetched with one
        read into a reused payload buffer (see :class:`wire.framing.PayloadBuffers`), whose
        view is returned without a copy when it is the whole answer; the buffer goes back
        to the pool when the caller lets go of the view.
        """
        if offset < 0 or size < 0:
            raise InvalidRequest(f"negative offset {offset} or size {size}")
        end = min(offset + size, self.length_bytes)
        if offset >= end:
            return b""
        pieces: list[bytes | memoryview] = []
        first = offset // BLOCK_SIZE_BYTES
        for start, span_bytes, content in self._segments(first, (end - 1) // BLOCK_SIZE_BYTES):
            # content holds the leading bytes of [start, start + span_bytes); the rest are zeros.
            lo = max(offset, start) - start
            hi = min(end, start + span_bytes) - start
            if lo == 0 and hi == len(content):
                pieces.append(content)
                continue
            if lo < len(content):
                pieces.append(memoryview(content)[lo : min(hi, len(content))])
            if hi > len(content):
                pieces.append(bytes(hi - max(lo, len(content))))
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def read_to_send(self, offset: int, size: int) -> FileRange | bytes | memoryview:
        """:meth:`read` for a reply: a range inside one run of whole uncompressed blocks
        is verified where it lies (the blocks are mapped, not copied) and returned as a
        :class:`~wire.framing.FileRange` of this file, which the connection sends with
        ``sendfile``; any other range, or one that cannot be mapped, is :meth:`read`.

        The caller holds the chunk lock (shared), so the file does not shrink while it
        is mapped; what is sent after the lock is let go is what lay there when checked
        unless a writer changed it meanwhile, which a reader racing a writer may see
        with any read."""
        if offset < 0 or size < 0:
            raise InvalidRequest(f"negative offset {offset} or size {size}")
        end = min(offset + size, self.length_bytes)
        if offset >= end:
            return b""
        first, last = offset // BLOCK_SIZE_BYTES, (end - 1) // BLOCK_SIZE_BYTES
        run = [entry for entry in self._entries[first : last + 1] if _is_full_raw(entry)]
        if len(run) != last + 1 - first or any(entry.slot != run[0].slot for entry in run):
            return self.read(offset, size)
        start = self.layout.slot_offset(first, run[0].slot)
        span = len(run) * BLOCK_SIZE_BYTES
        try:
            # A mapping past the end of the file would fault (SIGBUS) when touched.
            if os.fstat(self.fd).st_size < start + span:
                return self.read(offset, size)
            os.posix_fadvise(self.fd, start, span, os.POSIX_FADV_WILLNEED)
            crcs = _mapped_block_crcs(self.fd, start, span)
            duplicate = os.dup(self.fd)
        except OSError:
            return self.read(offset, size)  # out of descriptors or mappings: copy instead
        try:
            self._check_crcs(first, run, crcs)
        except ChecksumError:
            os.close(duplicate)
            raise
        return FileRange(duplicate, start + offset - first * BLOCK_SIZE_BYTES, end - offset)

    def _segments(self, first: int, last: int) -> Iterator[tuple[int, int, bytes | memoryview]]:
        """Verified contents of blocks ``first..last`` as (logical start, span, content)."""
        block = first
        while block <= last:
            entry = self._entries[block]
            if not isinstance(entry, BlockEntry):
                yield block * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES, self._block_content(block)
                block += 1
                continue
            run = [entry]
            while block + len(run) <= last:
                following = self._entries[block + len(run)]
                if not isinstance(following, BlockEntry) or following.slot != entry.slot:
                    break
                run.append(following)
            offset = self.layout.slot_offset(block, entry.slot)
            span = (len(run) - 1) * BLOCK_SIZE_BYTES + run[-1].stored_len
            if all(_is_full_raw(member) for member in run):
                # Fresh multi-MiB memory faults in page by page, which cost more than the
                # kernel's copy; a recycled buffer is already mapped.
                buffer = PAYLOAD_BUFFERS.take(span)
                raw = memoryview(buffer)[: os.preadv(self.fd, [buffer], offset)]
                self._check_run(block, run, raw)
                yield block * BLOCK_SIZE_BYTES, len(raw), raw
            else:
                # Short stored blocks leave gaps in the slot region: one pread per block, but
                # announced first, or a cold strided read gets no readahead and waits per block.
                if len(run) > 1:
                    os.posix_fadvise(self.fd, offset, span, os.POSIX_FADV_WILLNEED)
                for position, member in enumerate(run):
                    stored = os.pread(
                        self.fd, member.stored_len, offset + position * BLOCK_SIZE_BYTES
                    )
                    content = self._checked_content(block + position, member, stored)
                    yield (block + position) * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES, content
            block += len(run)

    def _check_run(self, first: int, run: list[BlockEntry], raw: memoryview) -> None:
        """Verify whole uncompressed blocks read together into ``raw``."""
        whole_blocks_end = len(raw) - len(raw) % BLOCK_SIZE_BYTES
        crcs = [
            block_crc(raw[lo : lo + BLOCK_SIZE_BYTES])
            for lo in range(0, whole_blocks_end, BLOCK_SIZE_BYTES)
        ]
        self._check_crcs(first, run, crcs)

    def _check_crcs(self, first: int, run: list[BlockEntry], crcs: list[int]) -> None:
        """Compare the CRC32C of each stored block of ``run`` (``crcs``, in order; fewer
        than the run where its last blocks are missing) with its index entry."""
        for position, entry in enumerate(run):
            if position >= len(crcs):
                raise self._bad(first + position, "stored bytes are missing")
            if crcs[position] != entry.crc:
                raise self._bad(first + position, "checksum mismatch")

    def _block_content(self, block: int) -> bytes | memoryview:
        """The verified logical bytes stored for ``block`` (``data_len`` of them; b"" if hole)."""
        entry = self._entries[block]
        if entry is None:
            return b""
        if isinstance(entry, _CorruptEntry):
            raise self._bad(block, entry.reason)
        stored = os.pread(self.fd, entry.stored_len, self.layout.slot_offset(block, entry.slot))
        return self._checked_content(block, entry, stored)

    def _checked_content(
        self, block: int, entry: BlockEntry, stored: bytes | memoryview
    ) -> bytes | memoryview:
        """Verify ``stored`` against ``entry`` and return the block's logical bytes."""
        try:
            return block_content(entry, stored, self._codec)
        except BlockMismatch as exc:
            raise self._bad(block, str(exc)) from exc

    def _bad(self, block: int, reason: str) -> ChecksumError:
        return ChecksumError(self.chunk_id, self.version, block, reason)

    def verify(self, first_block: int, block_count: int) -> list[int]:
        """Indexes of the blocks in ``[first_block, first_block + block_count)`` that fail
        verification (checksum, decompression, or a damaged index entry)."""
        bad: list[int] = []
        for block in range(first_block, min(first_block + block_count, self.layout.block_count)):
            try:
                self._block_content(block)
            except ChecksumError:
                bad.append(block)
        return bad

    def read_raw_block(self, block: int) -> RawBlock | None:
        """The verified stored form of ``block``, or None for a hole."""
        self._check_block_index(block)
        entry = self._entries[block]
        if entry is None:
            return None
        if isinstance(entry, _CorruptEntry):
            raise self._bad(block, entry.reason)
        payload = os.pread(self.fd, entry.stored_len, self.layout.slot_offset(block, entry.slot))
        if len(payload) != entry.stored_len or block_crc(payload) != entry.crc:
            raise self._bad(block, "checksum mismatch")
        return RawBlock(block, entry.data_len, entry.compressed, entry.crc, payload)

    # ---- writes ---------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``, extending the length if it ends past it.

        Whole uncompressed blocks go straight from ``data`` to disk, one ``pwrite`` per run
        of blocks sharing a target slot; partial blocks are read, verified and merged. On an
        error a prefix of the write may have been applied, as with a short POSIX write.
        """
        view = memoryview(data).cast("B")
        size = len(view)
        if offset < 0 or offset + size > self.capacity_bytes:
            raise InvalidRequest(
                f"write of {size} bytes at {offset} outside chunk of {self.capacity_bytes} bytes"
            )
        if size == 0:
            return
        end = offset + size
        block = offset // BLOCK_SIZE_BYTES
        last = (end - 1) // BLOCK_SIZE_BYTES
        while block <= last:
            start = block * BLOCK_SIZE_BYTES
            lo = max(offset, start) - start
            hi = min(end, start + BLOCK_SIZE_BYTES) - start
            whole = lo == 0 and hi == BLOCK_SIZE_BYTES
            if whole and not self.compressed:
                slot = self._target_slot(block)
                stop = block + 1
                while (
                    stop <= last
                    and (stop + 1) * BLOCK_SIZE_BYTES <= end
                    and self._target_slot(stop) == slot
                ):
                    stop += 1
                run = view[start - offset : stop * BLOCK_SIZE_BYTES - offset]
                self._write_full_raw_run(block, stop, slot, run)
                block = stop
                continue
            piece = view[start + lo - offset : start + hi - offset]
            if whole:
                self._store_block(block, piece)
            else:
                self._store_block(block, self._merged(block, lo, piece))
            self._extend_length(start + hi)
            block += 1

    def _merged(self, block: int, lo: int, piece: memoryview) -> bytearray:
        old = self._block_content(block)
        merged = bytearray(max(len(old), lo + len(piece)))
        merged[: len(old)] = old
        merged[lo : lo + len(piece)] = piece
        return merged

    def _write_full_raw_run(self, first: int, stop: int, slot: int, run: memoryview) -> None:
        crcs = [
            crc32c.crc32c(run[lo : lo + BLOCK_SIZE_BYTES])
            for lo in range(0, len(run), BLOCK_SIZE_BYTES)
        ]
        self._writes_unsynced = True
        offset = self.layout.slot_offset(first, slot)
        _pwrite_all(self.fd, run, offset)
        self._write_behind.written(offset, len(run))
        for block, crc in zip(range(first, stop), crcs, strict=True):
            self._set_entry(block, BlockEntry(slot, False, BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES, crc))
        self._extend_length(stop * BLOCK_SIZE_BYTES)

    def _store_block(self, block: int, content: bytes | bytearray | memoryview) -> None:
        """Write ``content`` (1..64 KiB of logical bytes) as block ``block``'s new version."""
        data_len = len(content)
        invariant(0 < data_len <= BLOCK_SIZE_BYTES, f"block content of {data_len} bytes")
        payload: bytes | bytearray | memoryview = content
        compressed = False
        if self.compressed:
            packed = self._codec.compress(content)
            limit = data_len * _COMPRESSED_FRACTION_MAX_NUMERATOR
            if len(packed) * _COMPRESSED_FRACTION_MAX_DENOMINATOR <= limit:
                payload, compressed = packed, True
        self._put_payload(block, payload, compressed=compressed, data_len=data_len)

    def _put_payload(
        self,
        block: int,
        payload: bytes | bytearray | memoryview,
        *,
        compressed: bool,
        data_len: int,
    ) -> None:
        """Write ``payload`` into the block's target slot and point the entry at it."""
        slot = self._target_slot(block)
        crc = crc32c.crc32c(payload)
        self._writes_unsynced = True
        offset = self.layout.slot_offset(block, slot)
        _pwrite_all(self.fd, payload, offset)
        # The whole slot, so that the slots of neighbouring blocks make one range.
        self._write_behind.written(offset, BLOCK_SIZE_BYTES)
        self._set_entry(block, BlockEntry(slot, compressed, len(payload), data_len, crc))

    def write_raw_block(self, raw: RawBlock) -> None:
        """Store a block copied from another replica as is (no recompression).

        The payload is checked against its CRC first, so a block damaged in transit is
        refused with :class:`ChecksumError`. The length grows to cover the block.
        """
        self._check_block_index(raw.block_index)
        stored_len = len(raw.payload)
        if (
            not 0 < raw.data_len <= BLOCK_SIZE_BYTES
            or not 0 < stored_len <= BLOCK_SIZE_BYTES
            or (not raw.compressed and stored_len != raw.data_len)
        ):
            raise InvalidRequest(
                f"raw block {raw.block_index}: {stored_len} stored bytes for {raw.data_len}"
            )
        if crc32c.crc32c(raw.payload) != raw.crc32c:
            raise self._bad(raw.block_index, "copied payload does not match its checksum")
        self._put_payload(
            raw.block_index, raw.payload, compressed=raw.compressed, data_len=raw.data_len
        )
        self._extend_length(raw.block_index * BLOCK_SIZE_BYTES + raw.data_len)

    def truncate(self, length: int) -> None:
        """Set the length: shrinking drops whole blocks past it and rewrites a partial last
        block; growing leaves a hole that reads as zeros."""
        if not 0 <= length <= self.capacity_bytes:
            raise InvalidRequest(f"length {length} outside chunk of {self.capacity_bytes} bytes")
        if length < self.length_bytes:
            keep = length % BLOCK_SIZE_BYTES
            partial = length // BLOCK_SIZE_BYTES
            if keep:
                entry = self._entries[partial]
                if entry is not None and (
                    not isinstance(entry, BlockEntry) or entry.data_len > keep
                ):
                    content = self._block_content(partial)
                    if len(content) > keep:
                        self._store_block(partial, memoryview(content)[:keep])
            first_dropped = -(-length // BLOCK_SIZE_BYTES)
            last_block = -(-self.length_bytes // BLOCK_SIZE_BYTES)
            for block in range(first_dropped, last_block):
                if self._entries[block] is not None:
                    self._set_entry(block, None)
        if length != self.length_bytes:
            self.length_bytes = length
            self._header_dirty = True

    def _extend_length(self, end: int) -> None:
        if end > self.length_bytes:
            self.length_bytes = end
            self._header_dirty = True

    def _target_slot(self, block: int) -> int:
        """The slot a write of ``block`` goes to: never the one the durable index names."""
        synced = self._synced_slot[block]
        return 0 if synced is None else SLOT_COUNT - 1 - synced

    def _set_entry(self, block: int, entry: BlockEntry | None) -> None:
        old = self._entries[block]
        if isinstance(old, BlockEntry) and (entry is None or entry.slot != old.slot):
            self._released_slots.add((block, old.slot))
        if entry is not None:
            self._released_slots.discard((block, entry.slot))
        self._entries[block] = entry
        self._dirty_blocks.add(block)

    def _check_block_index(self, block: int) -> None:
        if not 0 <= block < self.layout.block_count:
            raise InvalidRequest(f"block {block} outside chunk of {self.layout.block_count}")

    # ---- durability -----------------------------------------------------------------------

    def sync(self) -> None:
        """Make every write and truncate so far durable (see the module docstring for order).

        An ``OSError`` from ``fdatasync`` leaves the file in an unknown state: the caller must
        stop using it (a failed fsync is never retried). So does a writeback error that
        write-behind met earlier (see :mod:`dataserver.write_behind`)."""
        failed = self._write_behind.error
        if failed is not None:
            raise OSError(failed.errno, f"writeback failed: {failed.strerror}")
        if not self.has_unsynced_changes:
            return
        if self._writes_unsynced:
            os.fdatasync(self.fd)
            self._writes_unsynced = False
            self._write_behind.synced()
        self._failpoint("sync:data_synced")
        if self._dirty_blocks or self._header_dirty:
            self._check_entries_within_length()
            self._write_index()
            self._failpoint("sync:index_written")
            os.fdatasync(self.fd)
            for block in self._dirty_blocks:
                entry = self._entries[block]
                self._synced_slot[block] = entry.slot if isinstance(entry, BlockEntry) else None
            self._dirty_blocks.clear()
            self._header_dirty = False
        self._punch_released()

    def _write_index(self) -> None:
        dirty = sorted(self._dirty_blocks)
        run_start = 0
        for position in range(1, len(dirty) + 1):
            if position < len(dirty) and dirty[position] == dirty[position - 1] + 1:
                continue
            first = dirty[run_start]
            encoded = b"".join(
                encode_entry(block, _durable_form(self._entries[block]))
                for block in dirty[run_start:position]
            )
            _pwrite_all(self.fd, encoded, self.layout.entry_offset(first))
            run_start = position
        if self._header_dirty:
            header = Header(
                self.chunk_id, self.layout.block_count, self.compressed, self.length_bytes
            )
            _pwrite_all(self.fd, encode_header(header), 0)

    def _punch_released(self) -> None:
        """Deallocate slots no durable entry references any more (coalesced into runs).

        Only space is at stake here, never data: a failure is logged and punching stops
        for this file rather than failing a sync that already succeeded."""
        released = sorted(self._released_slots, key=lambda pair: (pair[1], pair[0]))
        self._released_slots.clear()
        if not self._punch_supported:
            return
        position = 0
        while position < len(released):
            first, slot = released[position]
            stop = position + 1
            while (
                stop < len(released)
                and released[stop][1] == slot
                and released[stop][0] == released[stop - 1][0] + 1
            ):
                stop += 1
            offset = self.layout.slot_offset(first, slot)
            try:
                supported = punch_hole(self.fd, offset, (stop - position) * BLOCK_SIZE_BYTES)
            except OSError as exc:
                _log.warning("chunk %#x: cannot release unused slots: %s", self.chunk_id, exc)
                supported = False
            if not supported:
                self._punch_supported = False
                return
            position = stop

    def _cut_past_length(self) -> None:
        """Drop or trim blocks reaching past the length (left by a crash inside a sync)."""
        for block, entry in enumerate(self._entries):
            start = block * BLOCK_SIZE_BYTES
            if entry is None:
                continue
            if start >= self.length_bytes:
                self._set_entry(block, None)
                continue
            keep = self.length_bytes - start
            if isinstance(entry, BlockEntry) and entry.data_len > keep:
                try:
                    content = self._block_content(block)
                except ChecksumError as exc:
                    self._entries[block] = _CorruptEntry(exc.reason)
                    continue
                self._store_block(block, memoryview(content)[:keep])

    def _check_entries_within_length(self) -> None:
        for block in self._dirty_blocks:
            entry = self._entries[block]
            if isinstance(entry, BlockEntry):
                end = block * BLOCK_SIZE_BYTES + entry.data_len
                invariant(end <= self.length_bytes, f"block {block} ends past the length")


def read_header(fd: int) -> Header:
    """Read and decode the header of an open replica file (see :func:`decode_header`)."""
    return decode_header(os.pread(fd, HEADER_BYTES, 0))


def _decode_index(index: bytes, block_count: int) -> list[_Entry]:
    entries: list[_Entry] = []
    view = memoryview(index)
    for block in range(block_count):
        offset = block * ENTRY_SIZE_BYTES
        if offset + ENTRY_SIZE_BYTES > len(index):
            entries.append(_CorruptEntry("index entry is missing"))
            continue
        try:
            entries.append(decode_entry(block, view[offset : offset + ENTRY_SIZE_BYTES]))
        except EntryCorrupt as exc:
            entries.append(_CorruptEntry(str(exc)))
    return entries


def _durable_form(entry: _Entry) -> BlockEntry | None:
    if isinstance(entry, _CorruptEntry):
        raise InvariantViolation("a damaged index entry was marked for writing")
    return entry


def _mapped_block_crcs(fd: int, start: int, span: int) -> list[int]:
    """The CRC32C of each block of ``fd``'s ``[start, start + span)``, read through a
    mapping (the page cache itself, no copy) that is gone when this returns: mmap holds a
    descriptor of its own, which must not outlive the call."""
    mapped = mmap.mmap(fd, span, access=mmap.ACCESS_READ, offset=start)
    try:
        with memoryview(mapped) as view:
            return [
                block_crc(view[lo : lo + BLOCK_SIZE_BYTES])
                for lo in range(0, span, BLOCK_SIZE_BYTES)
            ]
    finally:
        mapped.close()


def _is_full_raw(entry: _Entry) -> TypeGuard[BlockEntry]:
    """A present, uncompressed, full block: readable in a run with its neighbours."""
    return isinstance(entry, BlockEntry) and entry.is_full_raw
