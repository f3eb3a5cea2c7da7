"""The file-level client: open files with write-back buffers over the namespace and chunks.

Usable without FUSE (tests and tools drive it directly); the mount (:mod:`fuse_client.fs`)
is a thin layer over it.  One :class:`FileClient` serves one mount: a
:class:`~fuse_client.meta_client.MetaClient` session, a
:class:`~fuse_client.chunk_io.DataserverPool`, and the mount-wide write-back budget.

**Consistency is close-to-open**, as NFS: ``flush`` (close), ``fsync`` and ``release``
make every buffered write durable on every replica of its chunk and publish the chunk
lengths and the file size with one ``CommitWrite``; an ``open`` reads the namespace
afresh, so it sees everything another client closed before.

**Writes** land in a per-file buffer of dirty extents (per chunk, merged).  A chunk's
extents are pushed into a :class:`~fuse_client.chunk_io.ChunkWriter` (opened with
``OPEN_FOR_WRITE``: a new chunk version, the replica chain and a write token) once they
make a large piece, when the buffer budget ``write_buffer_bytes`` of the mount is
exhausted, and at flush.  A pipeline member failure reopens the chunk with ``exclude=``
the failed members (a new version on the survivors) and the writer re-sends what the old
chain did not acknowledge.

**Reads** use ``LOCATE`` (chunk versions, replicas, read tokens; cached per file and
refreshed on stale-version, token and missing-replica errors) and
:class:`~fuse_client.chunk_io.ChunkReader` (failover, read-ahead).  A chunk being
written is read from its writer's chain after the writer drained; unsent extents are laid
over what the replicas return, so a file reads its own unflushed writes.  Holes, and
bytes past a chunk's committed length, read as zeros.

**Unlinked open files** keep working: every open is counted in the namespace (``Open``;
``Create`` counts its own) and released at ``release``, so the inode and its chunks
live until the last open anywhere is released.  Releases are sent in batches by a
background task (nobody waits for them); when the metaserver session had to be reopened,
every open is counted again in the new one.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from fuse_client.chunk_io import (
    WRITE_PIECE_BYTES_DEFAULT,
    ChunkIoError,
    ChunkPlacement,
    ChunkReader,
    ChunkWriter,
    DataserverPool,
    PipelineFailed,
    ReplicasUnavailable,
    readahead_spill,
)
from fuse_client.meta_client import MetaClient, open_meta_client
from wire.config import Config
from wire.data_ops import (
    LOCATE,
    OPEN_FOR_WRITE,
    REPORT_BAD_REPLICA,
    SPACE,
    Locate,
    LocatedChunk,
    OpenForWrite,
    ReportBadReplica,
    Space,
    SpaceRequest,
    WritableChunk,
)
from wire.errors import STALE_VERSION, TOKEN_REFUSED, RpcError
from wire.framing import Payload
from wire.ids import ChunkId, ChunkVersion, InodeId
from wire.invariant import invariant
from wire.namespace_ops import (
    COMMIT_CHUNKS_MAX,
    RELEASE_MANY_MAX,
    ROOT_CREDENTIALS,
    Attr,
    AttrReply,
    ChunkWrite,
    CommitWrite,
    Create,
    Credentials,
    GetAttr,
    GetChunks,
    MadeReply,
    MutationCall,
    Open,
    OpenChunk,
    QueryCall,
    ReleaseMany,
    SetAttr,
    StatFs,
    StatFsReply,
)
from wire.transport import raise_single

log = logging.getLogger(__name__)

PUSH_PIECE_BYTES = WRITE_PIECE_BYTES_DEFAULT
"""A chunk's contiguous dirty extent is sent to its replicas once it is this large (or
covers the whole chunk): large pipelined pieces, and memory freed early."""
LOCATE_PAGE_CHUNKS = 64
"""Chunks asked for in one LOCATE (each carries a token and a replica list)."""
RETARGETS_MAX = 8
"""Pipeline failures one chunk recovers from within one operation before giving EIO."""
LOCATE_RETRIES_MAX = 2
"""Fresh locations fetched for one chunk read after stale-version or token errors."""
NO_REPLICA_DELAY_S_MIN = 0.05
NO_REPLICA_DELAY_S_MAX = 1.0
SYNCS_IN_FLIGHT_MAX = 16
"""Chunks synced at once when a file with many dirty chunks is flushed."""
SESSION_CHECK_INTERVAL_S = 0.5
"""How often the client looks whether its metaserver session was reopened."""
RELEASES_PENDING_MAX = 4096
"""Releases queued for the background sender; past it a release is sent at once."""
RELEASE_LINGER_S = 0.02
"""How long the sender waits for more releases to join a batch (one command)."""

_REFRESH_CODES = frozenset({STALE_VERSION, TOKEN_REFUSED, errno.ENOENT})
"""Read errors after which the chunk's location is fetched again (another writer bumped
the version, the token expired, or the replica moved)."""


class FileIoError(Exception):
    """A file operation failed; ``code`` is the POSIX errno to report."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def errno_of(error: BaseException) -> int:
    """The POSIX errno for an error of the client library: EIO for codes POSIX has no
    name for, and for ENOSYS (a server lacking a method), which a FUSE handler must never
    return (the kernel would disable that operation for the whole mount)."""
    code = getattr(error, "code", errno.EIO)
    if not isinstance(code, int) or not 0 < code < 4096 or code == errno.ENOSYS:
        return errno.EIO
    return code


@dataclass(frozen=True)
class FileClientSettings:
    """What one mount's file client needs to know."""

    write_buffer_bytes: int = 64 * 1024 * 1024
    readahead_bytes: int = 8 * 1024 * 1024
    push_piece_bytes: int = PUSH_PIECE_BYTES
    no_replica_wait_s: float = 60.0
    """How long a read or a write waits for the leader to know a replica (after a
    failover it rebuilds locations from dataserver reports) before failing."""

    @classmethod
    def from_config(cls, config: Config) -> FileClientSettings:
        return cls(
            write_buffer_bytes=max(1, config.mount.write_buffer_bytes),
            readahead_bytes=config.mount.readahead_bytes,
            no_replica_wait_s=config.client.no_quorum_timeout_s,
        )


# ---------------------------------------------------------------- dirty extents


class _DirtyChunk:
    """Unsent writes into one chunk: sorted, disjoint, non-adjacent extents."""

    def __init__(self) -> None:
        self.extents: list[tuple[int, bytearray]] = []
        self.bytes = 0

    def add(self, offset: int, data: memoryview) -> int:
        """Lay ``data`` at ``offset`` over what is buffered; return the growth in bytes."""
        end = offset + len(data)
        extents = self.extents
        if extents:
            last_start, last = extents[-1]
            if last_start + len(last) == offset:  # the common case: appending
                last += data
                self.bytes += len(data)
                return len(data)
        first = 0
        while first < len(extents) and extents[first][0] + len(extents[first][1]) < offset:
            first += 1
        stop = first
        while stop < len(extents) and extents[stop][0] <= end:
            stop += 1
        touched = extents[first:stop]
        if not touched:
            extents.insert(first, (offset, bytearray(data)))
            self.bytes += len(data)
            return len(data)
        start = min(offset, touched[0][0])
        merged_end = max(end, touched[-1][0] + len(touched[-1][1]))
        merged = bytearray(merged_end - start)
        for extent_start, extent in touched:
            merged[extent_start - start : extent_start - start + len(extent)] = extent
        merged[offset - start : end - start] = data
        old = sum(len(extent) for _, extent in touched)
        extents[first:stop] = [(start, merged)]
        self.bytes += len(merged) - old
        return len(merged) - old

    def overlay(self, target: memoryview, offset: int) -> None:
        """Copy the buffered bytes that fall in ``[offset, offset + len(target))``."""
        end = offset + len(target)
        for start, extent in self.extents:
            stop = start + len(extent)
            if stop <= offset or start >= end:
                continue
            low, high = max(start, offset), min(stop, end)
            target[low - offset : high - offset] = extent[low - start : high - start]


@dataclass
class _ActiveChunk:
    """A chunk version opened for writing since the last commit, and its writer."""

    index: int
    writer: ChunkWriter
    covered: int
    """Bytes from the chunk start that the replicas hold as file data: the committed
    length, then every pushed extent's end (past it: stale bytes or nothing)."""
    truncated: bool = False
    pushed_bytes: int = 0
    """Pushed since the last drain; counted against the write budget until drained."""

    def placement(self) -> ChunkPlacement:
        return self.writer.placement


@dataclass
class _FileState:
    """What the client knows and holds of one open inode; shared by its open handles."""

    inode: InodeId
    size: int
    chunk_size: int
    opens: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    dirty: dict[int, _DirtyChunk] = field(default_factory=dict)
    active: dict[int, _ActiveChunk] = field(default_factory=dict)
    located: dict[int, LocatedChunk] = field(default_factory=dict)
    located_ranges: list[tuple[int, int]] = field(default_factory=list)
    readers: dict[int, ChunkReader] = field(default_factory=dict)
    mtime_ns: int | None = None
    """Time of the newest write not yet committed."""
    writer_credentials: Credentials | None = None
    committed_attr: Attr | None = None
    """The attributes the last commit of this client returned."""
    stamp: tuple[int, int, int] = (0, 0, 0)
    """(mtime, ctime, size) of the file as its cached chunk locations know it."""
    error: FileIoError | None = None
    """A write-back failure not yet reported to a flush, fsync or close."""
    next_read_offset: int = 0
    """Where a sequential reader reads next (read-ahead runs on into the next chunk)."""

    def dirty_bytes(self) -> int:
        return sum(chunk.bytes for chunk in self.dirty.values())

    def buffered_bytes(self) -> int:
        """What this file holds against the mount's write budget."""
        return self.dirty_bytes() + sum(active.pushed_bytes for active in self.active.values())

    def has_unpublished(self) -> bool:
        return bool(self.dirty or self.active)

    def forget_locations(self) -> None:
        self.located.clear()
        self.located_ranges.clear()
        self.readers.clear()

    def is_located(self, index: int) -> bool:
        return any(low <= index < high for low, high in self.located_ranges)


# ---------------------------------------------------------------- the client


class FileClient:
    """Open files of one mount over one metaserver session and one dataserver pool."""

    def __init__(
        self,
        meta: MetaClient,
        pool: DataserverPool,
        chunk_size_bytes: int,
        settings: FileClientSettings,
    ) -> None:
        invariant(chunk_size_bytes > 0, "chunk size must be positive")
        self.meta = meta
        self.pool = pool
        self.chunk_size_bytes = chunk_size_bytes
        self.settings = settings
        self._files: dict[InodeId, _FileState] = {}
        self._buffered_bytes = 0
        self._room = trio.Lock()
        self._releases: list[InodeId] = []
        self._releases_queued = trio.Event()
        self._releases_sent_later = False

    # ------------------------------------------------------------ opening and closing

    async def open(
        self, inode: InodeId, credentials: Credentials, *, append: bool = False
    ) -> OpenFile:
        """Open an existing non-directory: counted in the namespace (EISDIR, ENOENT,
        EMFILE), its attributes read afresh (close-to-open)."""
        reply: AttrReply = await self.meta.mutate(Open(inode), credentials)
        return self._opened(reply.attr, credentials, append)

    async def create(
        self,
        parent: InodeId,
        name: bytes,
        mode: int,
        credentials: Credentials,
        *,
        exclusive: bool,
        append: bool = False,
    ) -> tuple[OpenFile, MadeReply]:
        """open(2) with O_CREAT (errors as :class:`~wire.namespace_ops.Create`): the open
        file, and the namespace's answer (the file's and the directory's attributes)."""
        reply: MadeReply = await self.meta.mutate(
            Create(parent, name, mode, exclusive), credentials
        )
        return self._opened(reply.attr, credentials, append), reply

    def _opened(self, attr: Attr, credentials: Credentials, append: bool) -> OpenFile:
        state = self._files.get(attr.ino)
        if state is None:
            state = _FileState(attr.ino, attr.size, self.chunk_size_bytes)
            state.stamp = _stamp(attr)
            self._files[attr.ino] = state
        elif not state.has_unpublished() and _stamp(attr) != state.stamp:
            # Close-to-open: another client changed the file since we cached its chunk
            # locations, which may name versions it replaced (and a replica left out of
            # its chain would still serve the old bytes).
            state.forget_locations()
            state.size = attr.size
            state.stamp = _stamp(attr)
        state.opens += 1
        return OpenFile(self, state, credentials, append, attr)

    async def _release(self, handle: OpenFile) -> None:
        state = handle.state
        try:
            await self._publish(state, handle.credentials)
        finally:
            state.opens -= 1
            if state.opens == 0:
                self._discard_buffers(state)
                self._files.pop(state.inode, None)
            if self._releases_sent_later and len(self._releases) < RELEASES_PENDING_MAX:
                self._releases.append(state.inode)
                self._releases_queued.set()
            else:
                await self._send_releases([state.inode])

    async def _send_releases(self, inodes: list[InodeId]) -> None:
        """One :class:`ReleaseMany` (no permission is checked: the session's opens are
        released, and those an ended session already released are skipped)."""
        try:
            await self.meta.mutate(ReleaseMany(tuple(inodes)))
        except RpcError as error:
            log.warning("%d releases not recorded: %s", len(inodes), error)

    async def send_releases_forever(self) -> None:
        """Run for the client's lifetime: send queued releases in concurrent batches.

        The kernel does not wait for a release, and a release changes nothing anyone can
        observe except when the last open of an unlinked file goes (its space is freed a
        moment later).  Sent together after a short linger, as one command, releases
        cost one slot share instead of competing one by one with the creates and opens
        that follow them."""
        self._releases_sent_later = True
        try:
            while True:
                await self._releases_queued.wait()
                self._releases_queued = trio.Event()
                await trio.sleep(RELEASE_LINGER_S)
                await self.drain_releases()
        finally:
            self._releases_sent_later = False

    async def drain_releases(self) -> None:
        """Send every queued release now (returns when all were answered)."""
        while self._releases:
            batch = self._releases[:RELEASE_MANY_MAX]
            del self._releases[:RELEASE_MANY_MAX]
            await self._send_releases(batch)

    async def keep_opens_registered(self) -> None:
        """Run for the client's lifetime: when the metaserver session had to be reopened
        (it expired during a long partition, which released its opens), count every
        open again in the new session, so that unlinked open files stay alive."""
        session = self.meta.client_id
        while True:
            await trio.sleep(SESSION_CHECK_INTERVAL_S)
            current = self.meta.client_id
            if current is None or current == session:
                continue
            session = current
            # Queued releases were for opens the ended session already released.
            self._releases.clear()
            await self.reregister_opens()

    async def reregister_opens(self) -> None:
        """Count every open of this client in the current session."""
        for state in list(self._files.values()):
            for _ in range(state.opens):
                try:
                    await self.meta.mutate(Open(state.inode), ROOT_CREDENTIALS)
                except RpcError as error:
                    log.error(
                        "inode %d could not be opened again in the new session: %s",
                        state.inode,
                        error,
                    )
                    break

    def _discard_buffers(self, state: _FileState) -> None:
        """Forget what could not be published (its error is kept for the next flush)."""
        self._account(-state.buffered_bytes())
        state.dirty.clear()
        state.active.clear()
        state.readers.clear()
        state.mtime_ns = None

    # ------------------------------------------------------------ attributes

    async def getattr(self, inode: InodeId, credentials: Credentials) -> Attr:
        """The namespace's attributes, with the size and mtime of unflushed writes."""
        reply: AttrReply = await self.meta.query(GetAttr(inode), credentials)
        return self.local_view(reply.attr)

    def local_view(self, attr: Attr) -> Attr:
        """``attr`` as this client sees it: unflushed writes count."""
        state = self._files.get(attr.ino)
        if state is None or not state.has_unpublished():
            if state is not None:
                state.size = attr.size
            return attr
        mtime_ns = state.mtime_ns if state.mtime_ns is not None else attr.mtime_ns
        return replace(attr, size=state.size, mtime_ns=mtime_ns)

    async def setattr(self, op: SetAttr, credentials: Credentials) -> Attr:
        """Change attributes.  Buffered writes of the file are published first, so that
        their commit can neither undo an explicit mtime (``cp -a``, ``tar x``) nor land
        past a truncation; a size change then truncates through the namespace (which
        cuts or drops the chunks)."""
        state = self._files.get(op.inode)
        if state is None:
            reply: AttrReply = await self.meta.mutate(op, credentials)
            return self.local_view(reply.attr)
        async with state.lock:
            await self._publish_locked(state, credentials)
            reply = await self.meta.mutate(op, credentials)
            if op.size is not None:
                state.size = reply.attr.size
                state.forget_locations()
            state.stamp = _stamp(reply.attr)
            return reply.attr

    async def statfs(self, credentials: Credentials) -> tuple[StatFsReply, Space | None]:
        """Namespace counters and the space live dataservers report (None when the
        leader serves no cluster manager)."""
        counters: StatFsReply = await self.meta.query(StatFs(), credentials)
        try:
            space: Space = await self.meta.call(SPACE, SpaceRequest())
        except RpcError as error:
            if error.code != errno.ENOSYS:
                raise
            return counters, None
        return counters, space

    async def flush_all(self) -> None:
        """Publish every file's buffered writes (before unmounting); errors are logged."""
        for state in list(self._files.values()):
            if state.has_unpublished():
                try:
                    await self._publish(state, state.writer_credentials)
                except (RpcError, ChunkIoError, FileIoError) as error:
                    log.error("inode %d: buffered writes lost at unmount: %s", state.inode, error)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held against ``write_buffer_bytes`` across the mount."""
        return self._buffered_bytes

    # ------------------------------------------------------------ writing

    def _account(self, delta: int) -> None:
        self._buffered_bytes += delta
        invariant(self._buffered_bytes >= 0, "write buffer accounting went negative")

    async def _write(self, handle: OpenFile, offset: int, data: bytes | memoryview) -> int:
        state = handle.state
        view = memoryview(data).cast("B")
        async with state.lock:
            if handle.append:
                offset = state.size
            state.writer_credentials = handle.credentials
            position = 0
            while position < len(view):
                start = offset + position
                index = start // state.chunk_size
                within = start - index * state.chunk_size
                size = min(len(view) - position, state.chunk_size - within)
                dirty = state.dirty.get(index)
                if dirty is None:
                    dirty = state.dirty[index] = _DirtyChunk()
                self._account(dirty.add(within, view[position : position + size]))
                position += size
                if self._ready_to_push(dirty, state.chunk_size):
                    await self._push_chunk(state, index, handle.credentials)
            state.size = max(state.size, offset + len(view))
            state.mtime_ns = time.time_ns()
        if self._buffered_bytes > self.settings.write_buffer_bytes:
            await self._make_room()
        return len(view)

    def _ready_to_push(self, dirty: _DirtyChunk, chunk_size: int) -> bool:
        if not dirty.extents:
            return False
        start, extent = dirty.extents[-1]
        return len(extent) >= min(self.settings.push_piece_bytes, chunk_size)

    async def _make_room(self) -> None:
        """Bring the mount's buffered bytes under the budget: send the largest files'
        buffers to their replicas and wait for the acknowledgements (one file at a time,
        never holding two file locks)."""
        async with self._room:
            while self._buffered_bytes > self.settings.write_buffer_bytes:
                candidates = [s for s in self._files.values() if s.buffered_bytes() > 0]
                if not candidates:
                    return
                state = max(candidates, key=lambda s: s.buffered_bytes())
                async with state.lock:
                    try:
                        await self._push_all(state, state.writer_credentials)
                        await self._drain(state, state.writer_credentials)
                    except (RpcError, ChunkIoError, FileIoError) as error:
                        # As the kernel does with write-back errors: the file's next
                        # flush, fsync or close reports it.
                        log.error("inode %d: write-back failed: %s", state.inode, error)
                        state.error = FileIoError(errno_of(error), str(error))
                        self._discard_buffers(state)

    async def _push_all(self, state: _FileState, credentials: Credentials | None) -> None:
        for index in sorted(state.dirty):
            await self._push_chunk(state, index, credentials)

    async def _push_chunk(
        self, state: _FileState, index: int, credentials: Credentials | None
    ) -> None:
        """Send chunk ``index``'s dirty extents into its writer (opening it if needed)."""
        dirty = state.dirty.pop(index, None)
        if dirty is None or not dirty.extents:
            return
        active = await self._active_chunk(state, index, credentials)
        for start, extent in dirty.extents:
            if start > active.covered and not active.truncated:
                # Past ``covered`` the replicas may hold bytes that are not file data (a
                # truncate cut them only in the namespace): drop them before a write
                # leaves a gap that would expose them.  Up to ``covered`` every byte is
                # file data (pushes so far were contiguous with it).
                await self._recovering(
                    state, active, credentials, lambda w, a=active: w.truncate(a.covered)
                )
                active.truncated = True
            await self._recovering(
                state, active, credentials, lambda w, s=start, e=extent: w.write(s, e)
            )
            active.covered = max(active.covered, start + len(extent))
            active.pushed_bytes += len(extent)
        state.readers.pop(index, None)

    async def _active_chunk(
        self, state: _FileState, index: int, credentials: Credentials | None
    ) -> _ActiveChunk:
        active = state.active.get(index)
        if active is None:
            writable = await self._open_for_write_waiting(state.inode, index, credentials, ())
            writer = ChunkWriter(self.pool, _placement_of(writable))
            active = _ActiveChunk(index, writer, writable.length)
            state.active[index] = active
        return active

    async def _open_for_write(
        self,
        inode: InodeId,
        index: int,
        credentials: Credentials | None,
        exclude: tuple[str, ...],
    ) -> WritableChunk:
        def envelope(call: MutationCall) -> OpenForWrite:
            return OpenForWrite(call, exclude)

        writable: WritableChunk = await self.meta.mutate(
            OpenChunk(inode, index),
            credentials or ROOT_CREDENTIALS,
            method=OPEN_FOR_WRITE,
            envelope=envelope,
        )
        if not writable.replicas:
            raise FileIoError(
                errno.ENOSPC, f"inode {inode} chunk {index}: no dataserver can take it"
            )
        return writable

    async def _open_for_write_waiting(
        self,
        inode: InodeId,
        index: int,
        credentials: Credentials | None,
        exclude: tuple[str, ...],
    ) -> WritableChunk:
        """:meth:`_open_for_write`, waiting (bounded) while the leader knows no live
        dataserver: after a failover it learns them from their next heartbeats."""
        wait = _NoReplicaWait(self.settings.no_replica_wait_s)
        while True:
            try:
                return await self._open_for_write(inode, index, credentials, exclude)
            except FileIoError as error:
                if error.code != errno.ENOSPC or wait.expired():
                    raise
            await wait.pause()

    async def _recovering(
        self,
        state: _FileState,
        active: _ActiveChunk,
        credentials: Credentials | None,
        operation: Callable[[ChunkWriter], Awaitable[object]],
    ) -> None:
        """Run ``operation`` on the chunk's writer; after a pipeline failure reopen the
        chunk without the failed members (a new version on the survivors) and go on."""
        writer = active.writer
        for _attempt in range(RETARGETS_MAX):
            try:
                await operation(writer)
                return
            except PipelineFailed as failure:
                log.warning("inode %d chunk %d: %s; reopening", state.inode, active.index, failure)
                if failure.code == errno.ENOSPC and not failure.failed:
                    raise FileIoError(errno.ENOSPC, str(failure)) from None
                excluded = tuple(failure.failed)
                writable = await self._open_for_write_waiting(
                    state.inode, active.index, credentials, excluded
                )
                await writer.retarget(_placement_of(writable))
        raise FileIoError(errno.EIO, f"inode {state.inode} chunk {active.index}: pipeline failed")

    async def _drain(self, state: _FileState, credentials: Credentials | None) -> None:
        """Wait until every pushed piece is acknowledged by its whole chain."""
        for active in list(state.active.values()):
            await self._recovering(state, active, credentials, lambda w: w.flush())
            self._account(-active.pushed_bytes)
            active.pushed_bytes = 0

    async def _publish(self, state: _FileState, credentials: Credentials | None) -> None:
        async with state.lock:
            await self._publish_locked(state, credentials)

    async def _publish_locked(self, state: _FileState, credentials: Credentials | None) -> None:
        """Push, sync on every replica, and commit: the close-to-open guarantee."""
        if state.error is not None:
            error, state.error = state.error, None
            raise error
        if not state.has_unpublished():
            return
        credentials = credentials or state.writer_credentials
        await self._push_all(state, credentials)
        actives = sorted(state.active.values(), key=lambda a: a.index)
        ends: dict[int, int] = {}

        async def sync_one(active: _ActiveChunk, slots: trio.Semaphore) -> None:
            async with slots:
                await self._recovering(state, active, credentials, lambda w: w.sync())
                ends[active.index] = active.covered

        slots = trio.Semaphore(SYNCS_IN_FLIGHT_MAX)
        try:
            async with trio.open_nursery() as nursery:
                for active in actives:
                    nursery.start_soon(sync_one, active, slots)
        except BaseExceptionGroup as group:
            raise_single(group)
        writes = [
            ChunkWrite(
                a.index,
                a.placement().chunk_id,
                a.placement().version,
                min(ends[a.index], state.chunk_size),
            )
            for a in actives
        ]
        reply: AttrReply | None = None
        for first in range(0, len(writes), COMMIT_CHUNKS_MAX):
            reply = await self.meta.mutate(
                CommitWrite(state.inode, tuple(writes[first : first + COMMIT_CHUNKS_MAX]), None),
                credentials or ROOT_CREDENTIALS,
            )
        for active in actives:
            self._account(-active.pushed_bytes)
            placement = active.placement()
            state.located[active.index] = LocatedChunk(
                active.index,
                placement.chunk_id,
                placement.version,
                ends[active.index],
                placement.replicas,
                placement.token,
            )
            state.readers.pop(active.index, None)
        state.active.clear()
        state.mtime_ns = None
        if reply is not None:
            state.size = reply.attr.size
            state.committed_attr = reply.attr
            state.stamp = _stamp(reply.attr)

    # ------------------------------------------------------------ truncating

    async def _truncate(self, handle: OpenFile, size: int) -> Attr:
        return await self.setattr(SetAttr(handle.state.inode, size=size), handle.credentials)

    # ------------------------------------------------------------ reading

    async def _read(self, handle: OpenFile, offset: int, length: int) -> Payload:
        state = handle.state
        async with state.lock:
            end = min(offset + length, state.size)
            if end <= offset:
                return b""
            index = offset // state.chunk_size
            if (end - 1) // state.chunk_size == index and index not in state.dirty:
                result = await self._read_clean(handle, index, offset, end)
            else:
                result = await self._read_merged(handle, offset, end)
            if offset == state.next_read_offset and end < state.size:
                self._read_ahead_into_next_chunk(state, end)
            state.next_read_offset = end
            return result

    async def _read_clean(self, handle: OpenFile, index: int, offset: int, end: int) -> Payload:
        """``[offset, end)`` inside chunk ``index``, which holds no write of this client: the
        reader's bytes as they are (a view of the received piece, no copy), zero-filled
        where the data ends early.  Most reads (a FUSE read is at most 1 MiB) take this
        path."""
        state = handle.state
        within = offset - index * state.chunk_size
        data = await self._read_chunk(state, handle.credentials, index, within, end - offset)
        if len(data) < end - offset:
            return b"".join((data, bytes(end - offset - len(data))))
        return data

    async def _read_merged(self, handle: OpenFile, offset: int, end: int) -> bytes:
        """``[offset, end)`` assembled chunk by chunk, with this client's unsent writes laid
        over what the replicas hold."""
        state = handle.state
        result = bytearray(end - offset)
        position = offset
        while position < end:
            index = position // state.chunk_size
            within = position - index * state.chunk_size
            size = min(end - position, state.chunk_size - within)
            data = await self._read_chunk(state, handle.credentials, index, within, size)
            target = memoryview(result)[position - offset : position - offset + size]
            target[: len(data)] = data
            dirty = state.dirty.get(index)
            if dirty is not None:
                dirty.overlay(target, within)
            position += size
        return bytes(result)

    def _read_ahead_into_next_chunk(self, state: _FileState, position: int) -> None:
        """Start the next chunk's read-ahead once a sequential reader at ``position`` is
        within a read-ahead window of it (only where its location is already known and
        no write of this client is open on it), so chunk boundaries do not drain the
        pipeline of reads."""
        spill = readahead_spill(position, state.chunk_size, self.settings.readahead_bytes)
        if spill is None:
            return
        following, length_bytes = spill
        located = state.located.get(following)
        if following in state.active or located is None or not located.replicas:
            return
        reader = self._reader(state, following, _placement_of_located(located), located.length)
        reader.start_readahead(0, length_bytes)

    async def _read_chunk(
        self, state: _FileState, credentials: Credentials, index: int, within: int, size: int
    ) -> Payload:
        """Bytes ``[within, within + size)`` of chunk ``index`` as the replicas hold them
        (short where the chunk's data ends; the caller zero-fills)."""
        active = state.active.get(index)
        if active is not None:
            await self._recovering(state, active, credentials, lambda w: w.flush())
            length = min(size, active.covered - within)
            if length <= 0:
                return b""
            return await self._reader(state, index, active.placement()).read(within, length)
        attempt = 0
        wait = _NoReplicaWait(self.settings.no_replica_wait_s)
        while True:
            located = await self._locate(state, credentials, index)
            if located is None or within >= located.length:
                return b""
            if not located.replicas:
                # A new leader rebuilds replica locations from dataserver reports: wait
                # for them rather than fail the read.
                if wait.expired():
                    raise FileIoError(
                        errno.EIO, f"inode {state.inode} chunk {index}: no replica known"
                    )
                await wait.pause()
                state.forget_locations()
                continue
            placement = _placement_of_located(located)
            try:
                return await self._reader(state, index, placement, located.length).read(
                    within, min(size, located.length - within)
                )
            except ReplicasUnavailable as error:
                codes = {e.code for e in error.errors.values()}
                if attempt == LOCATE_RETRIES_MAX or not codes & _REFRESH_CODES:
                    raise
                attempt += 1
                log.info("inode %d chunk %d: %s; locating again", state.inode, index, error)
                state.forget_locations()

    def _reader(
        self,
        state: _FileState,
        index: int,
        placement: ChunkPlacement,
        end_bytes: int | None = None,
    ) -> ChunkReader:
        """The chunk's reader; ``end_bytes`` (the committed length) keeps its read-ahead
        from asking for bytes past the chunk's data."""
        reader = state.readers.get(index)
        if reader is None or reader.placement != placement:
            reader = ChunkReader(
                self.pool,
                placement,
                on_corrupt=self._report_corrupt,
                readahead_bytes=self.settings.readahead_bytes,
                end_bytes=end_bytes,
            )
            state.readers[index] = reader
        return reader

    async def _locate(
        self, state: _FileState, credentials: Credentials, index: int
    ) -> LocatedChunk | None:
        if not state.is_located(index):
            reply = await self.meta.call(
                LOCATE,
                Locate(QueryCall(credentials, GetChunks(state.inode, index, LOCATE_PAGE_CHUNKS))),
            )
            for chunk in reply.chunks:
                state.located[chunk.index] = chunk
            high = reply.chunks[-1].index + 1 if reply.more and reply.chunks else 1 << 62
            state.located_ranges.append((index, high))
        return state.located.get(index)

    async def _report_corrupt(
        self, chunk: ChunkId, version: ChunkVersion, address: str, reason: str
    ) -> None:
        try:
            await self.meta.call(
                REPORT_BAD_REPLICA, ReportBadReplica(chunk, version, address, reason)
            )
        except RpcError as error:
            log.warning("could not report a corrupt replica of chunk %#x: %s", chunk, error)


class _NoReplicaWait:
    """Doubling pauses (``NO_REPLICA_DELAY_S_MIN`` up to ``..._MAX``) for at most
    ``wait_s`` while the leader knows no replica of a chunk: after a failover it learns
    them from the dataservers' next reports.  Shared by reads and writes."""

    def __init__(self, wait_s: float) -> None:
        self._deadline = trio.current_time() + wait_s
        self._delay_s = NO_REPLICA_DELAY_S_MIN

    def expired(self) -> bool:
        return trio.current_time() > self._deadline

    async def pause(self) -> None:
        await trio.sleep(self._delay_s)
        self._delay_s = min(2 * self._delay_s, NO_REPLICA_DELAY_S_MAX)


def _stamp(attr: Attr) -> tuple[int, int, int]:
    return (attr.mtime_ns, attr.ctime_ns, attr.size)


def _placement_of(writable: WritableChunk) -> ChunkPlacement:
    """Where to write; replicas deriving the new version drop what lies past the base
    version's committed length (bytes an earlier writer left uncommitted)."""
    return ChunkPlacement(
        writable.chunk,
        writable.version,
        writable.base_version,
        writable.replicas,
        writable.token,
        writable.compress,
        base_length_bytes=writable.length if writable.base_version is not None else None,
    )


def _placement_of_located(located: LocatedChunk) -> ChunkPlacement:
    return ChunkPlacement(located.chunk, located.version, None, located.replicas, located.token)


class OpenFile:
    """One open of a file (a file descriptor's worth); shares buffers with other opens
    of the same inode in this client."""

    def __init__(
        self,
        client: FileClient,
        state: _FileState,
        credentials: Credentials,
        append: bool,
        attr: Attr,
    ) -> None:
        self.client = client
        self.attr = attr
        """The attributes when opened."""
        self.state = state
        self.credentials = credentials
        self.append = append
        self.released = False

    @property
    def inode(self) -> InodeId:
        return self.state.inode

    @property
    def size(self) -> int:
        return self.state.size

    async def read(self, offset: int, length: int) -> Payload:
        """Up to ``length`` bytes at ``offset``; fewer only at the end of the file.  A
        read-only view where the bytes came in one piece: do not hold on to it longer
        than needed (its receive buffer is not reused meanwhile)."""
        self._check_open()
        if offset < 0 or length < 0:
            raise FileIoError(errno.EINVAL, f"read of {length} bytes at {offset}")
        return await self.client._read(self, offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        """Buffer ``data`` at ``offset`` (at the end of the file when opened for append);
        every byte is taken.  Durable and visible to others after :meth:`flush`."""
        self._check_open()
        if offset < 0:
            raise FileIoError(errno.EINVAL, f"write at {offset}")
        return await self.client._write(self, offset, data)

    async def flush(self) -> None:
        """Make every buffered write of this file durable on all replicas and publish it."""
        self._check_open()
        await self.client._publish(self.state, self.credentials)

    async def fsync(self) -> None:
        await self.flush()

    async def truncate(self, size: int) -> Attr:
        self._check_open()
        return await self.client._truncate(self, size)

    async def release(self) -> None:
        """Flush and give back the open (the last release of an unlinked file frees it)."""
        if self.released:
            return
        self.released = True
        await self.client._release(self)

    def _check_open(self) -> None:
        if self.released:
            raise FileIoError(errno.EBADF, "file was released")


@asynccontextmanager
async def open_file_client(
    config: Config, *, name: str = "mount", settings: FileClientSettings | None = None
) -> AsyncIterator[FileClient]:
    """A file client connected to the cluster of ``config``; flushes on the way out."""
    addresses = list(config.metaserver_addresses().values())
    key = config.cluster_key()
    try:
        async with (
            open_meta_client(
                addresses,
                key,
                name=name,
                call_timeout_s=config.client.call_timeout_s,
                no_quorum_timeout_s=config.client.no_quorum_timeout_s,
            ) as meta,
            DataserverPool.open(key, name=name, local_reads=config.client.local_reads) as pool,
        ):
            counters: StatFsReply = await meta.query(StatFs(), ROOT_CREDENTIALS)
            client = FileClient(
                meta, pool, counters.chunk_size, settings or FileClientSettings.from_config(config)
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.keep_opens_registered)
                nursery.start_soon(client.send_releases_forever)
                try:
                    yield client
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(30):
                        await client.flush_all()
                        await client.drain_releases()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)
