"""The trio face of the metaserver storage: open, recover, append, snapshot, truncate.

Threads: the log writer thread (:mod:`metaserver.storage.log_writer`) owns the segments;
snapshots are compressed and written in a ``trio.to_thread`` worker, one at a time; the
event loop only queues requests and wakes tickets, so it never waits for the disk.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from metaserver.storage.data_dir import DataDirectory, Sync, snapshot_file_name
from metaserver.storage.errors import (
    FatalStorageError,
    StorageClosed,
    StorageError,
)
from metaserver.storage.log_writer import (
    AppendRequest,
    CompactRequest,
    DropRequest,
    FailureLatch,
    LogStats,
    LogWriter,
)
from metaserver.storage.record_format import (
    RECORD_PAYLOAD_BYTES_LIMIT,
    RecordNumber,
)
from metaserver.storage.recovery import RecoveredState, Recovery, recover
from metaserver.storage.snapshot_format import SNAPSHOT_ZSTD_LEVEL_DEFAULT, encode_snapshot
from wire.invariant import invariant

_log = logging.getLogger(__name__)

EXIT_STORAGE_FAILURE = 74
"""Exit status after a fatal storage error (EX_IOERR from sysexits.h)."""

QUEUE_RECORDS_MAX_DEFAULT = 16_384
QUEUE_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
RECORD_BYTES_MAX_DEFAULT = 16 * 1024 * 1024
WRITE_BATCH_BYTES_MAX_DEFAULT = 8 * 1024 * 1024
SEGMENT_BYTES_TARGET_DEFAULT = 64 * 1024 * 1024
SNAPSHOT_BYTES_MAX_DEFAULT = 16 * 1024 * 1024 * 1024
APPEND_NOW_SLOW_S = 0.002
"""An :meth:`MetaStorage.append_now` slower than this (a loaded disk) blocked the event
loop too long: the next appends go to the writer thread for ``APPEND_NOW_PAUSE_S``."""
APPEND_NOW_PAUSE_S = 1.0


def exit_process(error: FatalStorageError) -> None:
    """The default fatal handler: one line on stderr, then ``os._exit`` at once.

    ``os._exit`` rather than an exception, so that no ``except`` anywhere can keep a process
    running whose durable state is unknown, and no reply goes out after the failure.
    """
    message = f"paxfs metaserver: fatal storage error, exiting ({EXIT_STORAGE_FAILURE}): {error}\n"
    try:
        os.write(2, message.encode("utf-8", errors="replace"))
    finally:
        os._exit(EXIT_STORAGE_FAILURE)


@dataclass(frozen=True)
class StorageOptions:
    """Limits and seams of one storage; the defaults suit a metaserver.

    ``queue_records_max``/``queue_bytes_max`` bound what is submitted but not yet durable:
    beyond them :meth:`MetaStorage.submit` waits (back-pressure). ``fsync``, ``fdatasync`` and
    ``on_fatal`` are seams for fault injection and counting in tests.
    """

    queue_records_max: int = QUEUE_RECORDS_MAX_DEFAULT
    queue_bytes_max: int = QUEUE_BYTES_MAX_DEFAULT
    record_bytes_max: int = RECORD_BYTES_MAX_DEFAULT
    write_batch_bytes_max: int = WRITE_BATCH_BYTES_MAX_DEFAULT
    segment_bytes_target: int = SEGMENT_BYTES_TARGET_DEFAULT
    snapshot_bytes_max: int = SNAPSHOT_BYTES_MAX_DEFAULT
    snapshot_zstd_level: int = SNAPSHOT_ZSTD_LEVEL_DEFAULT
    create_if_empty: bool = True
    append_on_caller_thread: bool = True
    """Allow :meth:`MetaStorage.append_now` (off where one event loop runs several
    replicas whose disks a test stalls: a stalled sync would stall them all)."""
    fsync: Sync = field(default=os.fsync)
    fdatasync: Sync = field(default=os.fdatasync)
    on_fatal: Callable[[FatalStorageError], None] = field(default=exit_process)

    def __post_init__(self) -> None:
        for name in (
            "queue_records_max",
            "queue_bytes_max",
            "record_bytes_max",
            "write_batch_bytes_max",
            "segment_bytes_target",
            "snapshot_bytes_max",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"storage option {name} must be positive")
        if not self.record_bytes_max <= min(self.queue_bytes_max, RECORD_PAYLOAD_BYTES_LIMIT):
            raise ValueError("record_bytes_max must fit in queue_bytes_max and in 4 GiB")


class AppendTicket:
    """Durability of one submitted batch of records (or of one compaction).

    Once :meth:`wait_durable` returns, these records and every record submitted before them
    are on disk (their fdatasync returned). Cancelling the wait does not withdraw the records.
    """

    __slots__ = ("numbers", "payload_bytes", "_event", "_error")

    def __init__(self, numbers: range, payload_bytes: int) -> None:
        self.numbers = numbers
        """The record numbers (:data:`RecordNumber`) given to the records, in order."""
        self.payload_bytes = payload_bytes
        self._event = trio.Event()
        self._error: FatalStorageError | None = None

    @property
    def durable(self) -> bool:
        """True once the records are on disk."""
        return self._event.is_set() and self._error is None

    def _settle(self, error: FatalStorageError | None) -> None:
        self._error = error
        self._event.set()

    async def wait_durable(self) -> None:
        """Return once the records are on disk; raise :class:`FatalStorageError` if they
        never will be (possible only with a non-exiting ``on_fatal``)."""
        await self._event.wait()
        if self._error is not None:
            raise self._error


class MetaStorage:
    """An open storage; obtain it from :func:`open_storage`. Use from one trio run only.

    ``recovered`` is what the directory held at open.
    """

    def __init__(
        self,
        directory: DataDirectory,
        options: StorageOptions,
        recovered: RecoveredState,
        next_number: RecordNumber,
        first_retained: RecordNumber,
        latch: FailureLatch,
        writer: LogWriter,
    ) -> None:
        self.recovered = recovered
        self._directory = directory
        self._options = options
        self._next_number = next_number
        self._first_retained = first_retained
        self._latch = latch
        self._writer = writer
        self._outstanding: deque[AppendTicket] = deque()
        self._queued_records = 0
        self._queued_bytes = 0
        self._blocked_submitters = 0
        self._space_lock = trio.Lock()
        self._space_freed = trio.Event()
        self._failure: FatalStorageError | None = None
        self._closed = False
        self._snapshot_index = None if recovered.snapshot is None else recovered.snapshot.index
        self._snapshot_lock = trio.Lock()
        self._append_now_paused_until = 0.0

    @property
    def directory(self) -> Path:
        return self._directory.path

    @property
    def next_record_number(self) -> RecordNumber:
        """The number the next submitted record will get."""
        return self._next_number

    @property
    def first_retained_record_number(self) -> RecordNumber:
        """The lowest record number still on disk (as of the last completed write)."""
        return self._first_retained

    @property
    def snapshot_index(self) -> int | None:
        """Index of the newest durable snapshot, None if there is none."""
        return self._snapshot_index

    def stats(self) -> LogStats:
        """Write and sync counters of the log since open."""
        return self._writer.stats()

    def submit_nowait(self, records: Sequence[bytes]) -> AppendTicket:
        """Queue ``records`` for appending and return at once with their ticket.

        Raises ``trio.WouldBlock`` if the queue is full (or others wait for room; order is
        kept), ``ValueError`` for a record or batch that exceeds the limits, and
        :class:`StorageClosed`/:class:`FatalStorageError` for a storage that cannot write.
        An empty batch is allowed: its ticket is durable once everything before it is.
        """
        payloads, payload_bytes = self._validated(records)
        if self._blocked_submitters or not self._has_room(len(payloads), payload_bytes):
            raise trio.WouldBlock
        return self._enqueue_records(AppendRequest, payloads, payload_bytes)

    async def submit(self, records: Sequence[bytes]) -> AppendTicket:
        """Like :meth:`submit_nowait`, but wait for room in the queue (FIFO among waiters).

        Returns once the records are queued, not once they are durable: await the ticket.
        If cancelled, nothing was queued.
        """
        payloads, payload_bytes = self._validated(records)
        return await self._enqueue_when_room(AppendRequest, payloads, payload_bytes)

    def append_now(self, records: Sequence[bytes]) -> AppendTicket | None:
        """Append ``records`` and make them durable before returning, on the calling
        (event loop) thread, if nothing else is queued or being written; None, doing
        nothing, otherwise (then :meth:`submit` them).

        This blocks the event loop for one write and fdatasync (about 0.1 ms here), in
        exchange for the two thread wake-ups and GIL hand-offs of the writer thread on
        the critical path of a commit (measured: CPU per commit about halved, p50 of a
        lone create 2.9 -> 2.1 ms).  After one slower than ``APPEND_NOW_SLOW_S`` it
        declines for ``APPEND_NOW_PAUSE_S``.  Raises like :meth:`submit_nowait`.
        """
        payloads, payload_bytes = self._validated(records)
        if (
            self._outstanding
            or self._blocked_submitters
            or not self._options.append_on_caller_thread
        ):
            return None
        started = time.monotonic()
        if started < self._append_now_paused_until:
            return None
        first = self._next_number
        if not self._writer.append_now(AppendRequest(first, payloads, payload_bytes)):
            self._check_usable()
            return None
        if time.monotonic() - started > APPEND_NOW_SLOW_S:
            # A slow disk would stall this loop on every commit (and a leader could not
            # even count its followers' votes meanwhile): let the thread take the syncs.
            self._append_now_paused_until = time.monotonic() + APPEND_NOW_PAUSE_S
        self._next_number = RecordNumber(first + len(payloads))
        ticket = AppendTicket(range(first, first + len(payloads)), payload_bytes)
        ticket._settle(None)
        return ticket

    async def append(self, records: Sequence[bytes]) -> range:
        """Append ``records`` and return their numbers once they are durable."""
        ticket = await self.submit(records)
        await ticket.wait_durable()
        return ticket.numbers

    async def compact(self, records: Sequence[bytes]) -> range:
        """Replace the whole log submitted so far by ``records``, atomically; return their
        (new, higher) numbers once durable.

        ``records`` must stand for everything submitted before this call (the Paxos core's
        minimal record set after a snapshot); records submitted after it stay after them.
        The new segment is written and renamed into place before the old ones are removed,
        so a crash leaves either the old log or the compacted one.
        """
        payloads, payload_bytes = self._validated(records)
        ticket = await self._enqueue_when_room(CompactRequest, payloads, payload_bytes)
        await ticket.wait_durable()
        return ticket.numbers

    async def drop_records_before(self, number: RecordNumber) -> RecordNumber:
        """Remove whole segments whose records are all numbered below ``number``; return the
        lowest record number still on disk (it may be below ``number``: a segment is kept
        whole, and the active segment always)."""
        self._check_usable()
        ticket = AppendTicket(range(0), 0)
        self._enqueue(DropRequest(number), ticket)
        await ticket.wait_durable()
        return self._first_retained

    async def save_snapshot(self, index: int, data: bytes) -> None:
        """Make ``data`` the durable snapshot covering the caller's log up to ``index``.

        Compressed with zstd and written off the event loop: temporary file, fsync, rename,
        directory fsync; then older snapshots are removed. Snapshots are saved one at a
        time; ``index`` must not go below the current one. It does not touch the log: call
        :meth:`compact` or :meth:`drop_records_before` afterwards.
        """
        self._check_usable()
        if len(data) > self._options.snapshot_bytes_max:
            raise ValueError(
                f"snapshot of {len(data)} bytes exceeds {self._options.snapshot_bytes_max}"
            )
        async with self._snapshot_lock:
            if self._snapshot_index is not None and index < self._snapshot_index:
                raise ValueError(f"snapshot {index} is older than snapshot {self._snapshot_index}")
            previous = self._snapshot_index
            await trio.to_thread.run_sync(self._write_snapshot, index, bytes(data), previous)
            self._check_usable()
            self._snapshot_index = index

    def _write_snapshot(self, index: int, data: bytes, previous: int | None) -> None:
        header, body = encode_snapshot(index, data, zstd_level=self._options.snapshot_zstd_level)
        name = snapshot_file_name(index)
        with self._latch.fatal_on_error(self._directory, f"writing snapshot {name}"):
            self._directory.write_file_atomically(name, [header, body])
            if previous is not None and previous != index:
                self._directory.remove([snapshot_file_name(previous)])
        _log.info(
            "%s: saved %s (%d bytes, %d compressed)", self.directory, name, len(data), len(body)
        )

    def _validated(self, records: Sequence[bytes]) -> tuple[tuple[bytes, ...], int]:
        self._check_usable()
        payloads = tuple(bytes(record) for record in records)
        payload_bytes = 0
        for payload in payloads:
            if len(payload) > self._options.record_bytes_max:
                raise ValueError(
                    f"record of {len(payload)} bytes exceeds {self._options.record_bytes_max}"
                )
            payload_bytes += len(payload)
        if (
            len(payloads) > self._options.queue_records_max
            or payload_bytes > self._options.queue_bytes_max
        ):
            raise ValueError(
                f"batch of {len(payloads)} records, {payload_bytes} bytes exceeds the queue "
                f"({self._options.queue_records_max} records, {self._options.queue_bytes_max} "
                "bytes): split it"
            )
        return payloads, payload_bytes

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise StorageClosed(f"metaserver storage {self.directory} is closed")

    def _has_room(self, record_count: int, payload_bytes: int) -> bool:
        return (
            self._queued_records + record_count <= self._options.queue_records_max
            and self._queued_bytes + payload_bytes <= self._options.queue_bytes_max
        )

    async def _enqueue_when_room(
        self,
        kind: type[AppendRequest] | type[CompactRequest],
        payloads: tuple[bytes, ...],
        payload_bytes: int,
    ) -> AppendTicket:
        if not self._blocked_submitters and self._has_room(len(payloads), payload_bytes):
            ticket = self._enqueue_records(kind, payloads, payload_bytes)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return ticket
        self._blocked_submitters += 1
        try:
            async with self._space_lock:
                while not self._has_room(len(payloads), payload_bytes):
                    await self._space_freed.wait()
                    self._check_usable()
                return self._enqueue_records(kind, payloads, payload_bytes)
        finally:
            self._blocked_submitters -= 1

    def _enqueue_records(
        self,
        kind: type[AppendRequest] | type[CompactRequest],
        payloads: tuple[bytes, ...],
        payload_bytes: int,
    ) -> AppendTicket:
        first = self._next_number
        ticket = AppendTicket(range(first, first + len(payloads)), payload_bytes)
        self._enqueue(kind(first, payloads, payload_bytes), ticket)
        return ticket

    def _enqueue(
        self, request: AppendRequest | CompactRequest | DropRequest, ticket: AppendTicket
    ) -> None:
        self._check_usable()
        self._next_number = RecordNumber(self._next_number + len(ticket.numbers))
        self._queued_records += len(ticket.numbers)
        self._queued_bytes += ticket.payload_bytes
        self._outstanding.append(ticket)
        self._writer.enqueue(request)

    def _on_done(self, count: int, first_retained: RecordNumber) -> None:
        """Event-loop side of the writer's report: the ``count`` oldest tickets are durable."""
        if self._failure is not None:
            return
        self._first_retained = first_retained
        invariant(count <= len(self._outstanding), "the writer reported more than was queued")
        for _ in range(count):
            ticket = self._outstanding.popleft()
            self._queued_records -= len(ticket.numbers)
            self._queued_bytes -= ticket.payload_bytes
            ticket._settle(None)
        self._wake_submitters()

    def _on_failed(self, error: FatalStorageError) -> None:
        """Event-loop side of a fatal error: every waiter learns it, nothing is written more."""
        self._failure = error
        while self._outstanding:
            self._outstanding.popleft()._settle(error)
        self._wake_submitters()

    def _wake_submitters(self) -> None:
        self._space_freed.set()
        self._space_freed = trio.Event()

    async def _close(self) -> None:
        """Drain the queue, stop the writer, release the directory."""
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._writer.stop_and_join)
            async with self._snapshot_lock:
                self._directory.close()


def _call_soon(
    token: trio.lowlevel.TrioToken, function: Callable[..., object], *args: object
) -> None:
    """Run ``function(*args)`` on the event loop from another thread, without waiting."""
    try:
        token.run_sync_soon(function, *args)
    except trio.RunFinishedError:
        _log.warning("metaserver storage: event loop gone, dropping %s", function.__name__)


@asynccontextmanager
async def open_storage(
    directory: str | os.PathLike[str],
    cluster_id: str,
    options: StorageOptions | None = None,
) -> AsyncIterator[MetaStorage]:
    """Open (creating if empty, unless told not to) the storage in ``directory`` and recover it.

    Holds the directory's lock until the block exits, when queued appends are finished.
    Raises :class:`StorageFormatError`, :class:`ClusterMismatch`, :class:`StorageLocked`,
    :class:`StorageCorruption` or :class:`StorageError` (I/O failure) with one clear line.
    """
    options = options or StorageOptions()
    path = Path(directory).absolute()
    token = trio.lowlevel.current_trio_token()
    storages: list[MetaStorage] = []  # filled before the writer starts: its callbacks need it

    def notify_failed(error: FatalStorageError) -> None:
        for storage in storages:
            _call_soon(token, storage._on_failed, error)

    def notify_done(count: int, first_retained: RecordNumber) -> None:
        for storage in storages:
            _call_soon(token, storage._on_done, count, first_retained)

    def open_and_recover() -> tuple[DataDirectory, Recovery]:
        data_dir = DataDirectory.open(
            path, cluster_id, create_if_empty=options.create_if_empty, fsync=options.fsync
        )
        try:
            return data_dir, recover(
                data_dir, snapshot_bytes_max=options.snapshot_bytes_max, fsync=options.fsync
            )
        except BaseException:
            data_dir.close()
            raise

    try:
        data_dir, recovery = await trio.to_thread.run_sync(open_and_recover)
        try:
            latch = FailureLatch(options.on_fatal, notify_failed)
            writer = LogWriter(
                data_dir,
                recovery.segments,
                recovery.active_bytes,
                recovery.next_number,
                segment_bytes_target=options.segment_bytes_target,
                write_batch_bytes_max=options.write_batch_bytes_max,
                fdatasync=options.fdatasync,
                fsync=options.fsync,
                latch=latch,
                on_done=notify_done,
            )
        except BaseException:
            data_dir.close()
            raise
    except OSError as error:
        raise StorageError(f"cannot open metaserver storage {path}: {error}") from error
    storage = MetaStorage(
        data_dir,
        options,
        recovery.state,
        recovery.next_number,
        recovery.segments[0].first,
        latch,
        writer,
    )
    storages.append(storage)
    writer.start()
    try:
        yield storage
    finally:
        await storage._close()
