"""Reading replicas on this host from their files (HDFS's short-circuit reads).

The dataserver of a replica on this host hands over a read-only descriptor of the
replica's file (:mod:`wire.local_reads`); :class:`LocalReplica` reads it in the format
of :mod:`wire.replica_format` and verifies every block as the dataserver would. The bytes
then cost one process's CPU instead of two plus loopback TCP.

:class:`LocalReplicas` keeps, per client, a link to each local dataserver and the
descriptors it was given (at most :data:`OPEN_REPLICAS_MAX`, each until its token
expires), and remembers for a while which addresses have no dataserver here.

A local read that goes wrong in any way is read again through that replica's dataserver:
a checksum mismatch seen here may be a writer's rename racing this read, so only the
dataserver's own verification reports a replica as corrupt.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import OrderedDict

import trio

from wire.errors import RpcError
from wire.framing import PAYLOAD_BUFFERS, Payload
from wire.ids import ChunkId, ChunkVersion
from wire.local_reads import LocalReadLink, OpenReplicaRequest
from wire.replica_format import (
    BLOCK_SIZE_BYTES,
    ENTRY_SIZE_BYTES,
    HEADER_BYTES,
    BlockCodec,
    BlockEntry,
    BlockMismatch,
    EntryCorrupt,
    FormatMismatch,
    HeaderCorrupt,
    Layout,
    block_content,
    block_crc,
    decode_entry,
    decode_header,
)
from wire.tokens import ChunkToken

log = logging.getLogger(__name__)

OPEN_REPLICAS_MAX = 64
"""Descriptors of local replicas kept open per client."""
NOT_LOCAL_RETRY_S = 30.0
"""After finding no dataserver of an address on this host, go through the network for it
this long before looking again."""
REFUSED_RETRY_S = 1.0
"""After a local read of one replica failed or was refused (a replica being written, a
stale version), read it through its dataserver this long before trying locally again."""

_Key = tuple[str, ChunkId, ChunkVersion]


class LocalReadFailed(Exception):
    """The local file could not be read as this replica version; read it remotely."""


class LocalReplica:
    """A read-only descriptor of one replica's file, handed over by its dataserver.

    :meth:`read` runs in worker threads, several at once; :meth:`retire` closes the
    descriptor once no read uses it (never under a running read: its number could be
    reused for another file)."""

    def __init__(self, fd: int, file_name: str, expires_at_s: float) -> None:
        self._fd = fd
        self._file_name = file_name
        self.expires_at_s = expires_at_s
        self._users = 0
        self._retired = False

    def read(self, offset: int, length: int) -> Payload:
        """Up to ``length`` verified bytes at ``offset`` (fewer at the replica's end), read
        in a worker thread; :class:`LocalReadFailed` when anything is not as it should be."""
        try:
            data = _read_replica(self._fd, offset, length)
        except (OSError, EntryCorrupt, FormatMismatch, HeaderCorrupt) as e:
            raise LocalReadFailed(str(e)) from None
        # Checked after the read: a version is derived by renaming the file (before it is
        # written) and deleted by unlinking it, so the same name afterwards means the
        # bytes were this version's.
        try:
            current = os.readlink(f"/proc/self/fd/{self._fd}")
        except OSError as error:
            raise LocalReadFailed(f"cannot see the file's name: {error}") from None
        if os.path.basename(current) != self._file_name:
            raise LocalReadFailed(f"{self._file_name} is now {current!r}")
        return data

    async def read_in_thread(self, offset: int, length: int) -> Payload:
        self._users += 1
        try:
            return await trio.to_thread.run_sync(self.read, offset, length)
        finally:
            self._users -= 1
            if self._retired and not self._users:
                self._close()

    def retire(self) -> None:
        self._retired = True
        if not self._users:
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_CODEC = BlockCodec()


def _read_replica(fd: int, offset: int, length: int) -> Payload:
    """Bytes ``[offset, offset + length)`` of the replica file ``fd`` as its durable index
    says, every block verified; holes and the rest of short blocks read as zeros."""
    header = decode_header(os.pread(fd, HEADER_BYTES, 0))
    end = min(offset + length, header.length_bytes)
    if offset >= end:
        return b""
    layout = Layout(header.block_count)
    first, last = offset // BLOCK_SIZE_BYTES, (end - 1) // BLOCK_SIZE_BYTES
    index = os.pread(fd, (last + 1 - first) * ENTRY_SIZE_BYTES, layout.entry_offset(first))
    if len(index) < (last + 1 - first) * ENTRY_SIZE_BYTES:
        raise LocalReadFailed("the index is cut short")
    entries = [
        decode_entry(block, index[(block - first) * ENTRY_SIZE_BYTES :][:ENTRY_SIZE_BYTES])
        for block in range(first, last + 1)
    ]
    base = first * BLOCK_SIZE_BYTES
    buffer = PAYLOAD_BUFFERS.take((last + 1 - first) * BLOCK_SIZE_BYTES)
    view = memoryview(buffer)
    position = 0
    while position < len(entries):
        run = _run_at(entries, position)
        target = view[position * BLOCK_SIZE_BYTES : (position + len(run)) * BLOCK_SIZE_BYTES]
        _fill(fd, layout, first + position, run, target)
        position += len(run)
    if offset == base and end - base == len(buffer):
        return buffer
    return view[offset - base : end - base]


def _run_at(entries: list[BlockEntry | None], start: int) -> list[BlockEntry | None]:
    """The entries read together from ``start``: whole uncompressed blocks that follow
    each other in one slot region, or else the one block."""
    entry = entries[start]
    stop = start + 1
    if entry is not None and entry.is_full_raw:
        while stop < len(entries):
            following = entries[stop]
            if following is None or not following.is_full_raw or following.slot != entry.slot:
                break
            stop += 1
    return entries[start:stop]


def _fill(
    fd: int, layout: Layout, block: int, run: list[BlockEntry | None], target: memoryview
) -> None:
    """Put the verified bytes of ``run`` (blocks from ``block`` on, as :func:`_run_at`
    groups them) into ``target``."""
    entry = run[0]
    if entry is None:
        target[:] = bytes(len(target))
        return
    offset = layout.slot_offset(block, entry.slot)
    if entry.is_full_raw:
        if os.preadv(fd, [target], offset) != len(target):
            raise LocalReadFailed("the file ends inside a block")
        for position, member in enumerate(run):
            lo = position * BLOCK_SIZE_BYTES
            assert member is not None
            if block_crc(target[lo : lo + BLOCK_SIZE_BYTES]) != member.crc:
                raise LocalReadFailed(f"block {block + position}: checksum mismatch")
        return
    try:
        content = block_content(entry, os.pread(fd, entry.stored_len, offset), _CODEC)
    except BlockMismatch as error:
        raise LocalReadFailed(f"block {block}: {error}") from None
    target[: len(content)] = content
    target[len(content) :] = bytes(len(target) - len(content))


class LocalReplicas:
    """One client's links to the dataservers on its host and the replicas they handed over."""

    def __init__(self, key: bytes, *, name: str) -> None:
        self._key = key
        self._name = name
        self._links: dict[str, LocalReadLink] = {}
        self._linking: dict[str, trio.Lock] = {}
        self._not_local_until: dict[str, float] = {}
        self._refused_until: dict[_Key, float] = {}
        self._open: OrderedDict[_Key, LocalReplica] = OrderedDict()
        self.bytes_read = 0

    async def read(
        self,
        address: str,
        chunk_id: ChunkId,
        version: ChunkVersion,
        token: ChunkToken,
        offset: int,
        length: int,
    ) -> Payload | None:
        """The bytes, read from the file of the replica at ``address`` if it is on this
        host; None if it is not, if its dataserver refused (or the token has expired, as
        its dataserver would refuse it). Raises :class:`LocalReadFailed` when the file
        did not read well: the caller should read the piece through that dataserver, whose
        verification tells a corrupt replica from a race with a writer."""
        key = (address, chunk_id, version)
        now = time.monotonic()
        if self._refused_until.get(key, 0.0) > now or self._not_local_until.get(address, 0.0) > now:
            return None
        if token.expires_at_s <= time.time():
            return None
        replica = await self._replica(key, token)
        if replica is None:
            return None
        try:
            data = await replica.read_in_thread(offset, length)
        except LocalReadFailed as error:
            log.info(
                "chunk %#x v%d: local read of %s failed: %s", chunk_id, version, address, error
            )
            self._refuse(key)
            raise
        self.bytes_read += len(data)
        return data

    def _cached(self, key: _Key) -> LocalReplica | None:
        replica = self._open.get(key)
        if replica is None or replica.expires_at_s <= time.time():
            return None
        self._open.move_to_end(key)
        return replica

    async def _replica(self, key: _Key, token: ChunkToken) -> LocalReplica | None:
        replica = self._cached(key)
        if replica is not None:
            return replica
        address, chunk_id, version = key
        link = await self._link(address)
        if link is None:
            return None
        replica = self._cached(key)  # opened by another task while this one waited
        if replica is not None:
            return replica
        try:
            reply, fd = await link.open_replica(OpenReplicaRequest(chunk_id, version, token))
        except RpcError as error:
            log.debug("chunk %#x v%d: no local read from %s: %s", chunk_id, version, address, error)
            if error.code == errno.ECONNRESET:
                self._links.pop(address, None)
            self._refuse(key)
            return None
        self._retire(key)
        replica = self._open[key] = LocalReplica(fd, reply.file_name, token.expires_at_s)
        while len(self._open) > OPEN_REPLICAS_MAX:
            self._retire(next(iter(self._open)))
        return replica

    async def _link(self, address: str) -> LocalReadLink | None:
        link = self._links.get(address)
        if link is not None and not link.closed:
            return link
        async with self._linking.setdefault(address, trio.Lock()):
            link = self._links.get(address)
            if link is not None and not link.closed:
                return link
            if self._not_local_until.get(address, 0.0) > time.monotonic():
                return None
            try:
                link = await LocalReadLink.connect(address, self._key, name=self._name)
            except RpcError as error:
                log.debug("no local reads from %s: %s", address, error)
                self._not_local_until[address] = time.monotonic() + NOT_LOCAL_RETRY_S
                return None
            self._links[address] = link
            return link

    def _refuse(self, key: _Key) -> None:
        self._retire(key)
        self._refused_until[key] = time.monotonic() + REFUSED_RETRY_S
        if len(self._refused_until) > 4 * OPEN_REPLICAS_MAX:
            now = time.monotonic()
            self._refused_until = {k: t for k, t in self._refused_until.items() if t > now}

    def _retire(self, key: _Key) -> None:
        replica = self._open.pop(key, None)
        if replica is not None:
            replica.retire()

    def close(self) -> None:
        """Close every link and every descriptor no read is using (the rest close when
        their reads end)."""
        for key in list(self._open):
            self._retire(key)
        for link in self._links.values():
            link.close()
        self._links.clear()
