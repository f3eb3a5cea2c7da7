"""The one thread that writes and syncs the log, with group commit.

Requests (appends, compactions, drops) are queued in submission order. The thread takes every
queued append at once (up to ``write_batch_bytes_max``), writes their frames with one
``write`` and makes them durable with one ``fdatasync``; appends submitted during that sync
wait in the queue and share the next one. A request is reported done, in queue order, only
once it is durable; being durable implies every earlier request is too.

Any ``OSError`` (or bug) in here is fatal (:class:`FailureLatch`): the thread stops touching
the files and never retries a sync.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from metaserver.storage.data_dir import (
    TEMP_SUFFIX,
    DataDirectory,
    Sync,
    segment_file_name,
    write_all,
)
from metaserver.storage.errors import FatalStorageError
from metaserver.storage.record_format import (
    RecordNumber,
    encode_records,
    encode_segment_header,
)
from wire.invariant import invariant

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """Append ``payloads`` as records ``first``, ``first + 1``, ..."""

    first: RecordNumber
    payloads: tuple[bytes, ...]
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class CompactRequest:
    """Replace every earlier record by ``payloads``, numbered from ``first``."""

    first: RecordNumber
    payloads: tuple[bytes, ...]
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class DropRequest:
    """Remove the segments all of whose records are numbered below ``below``."""

    below: RecordNumber


WriteRequest = AppendRequest | CompactRequest | DropRequest


@dataclass(frozen=True, slots=True)
class LogStats:
    """Counters since the storage was opened."""

    records_written: int
    bytes_written: int
    batches_written: int
    data_syncs: int
    segments_created: int


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """A segment on disk: its name and the number of its first record."""

    first: RecordNumber
    name: str


class FailureLatch:
    """Records the first fatal error, logs it, runs the fatal handler, then tells the owner.

    Shared by the log writer and the snapshot writer; thread-safe; later errors are dropped
    (the first one is the cause).
    """

    def __init__(
        self,
        on_fatal: Callable[[FatalStorageError], None],
        notify_owner: Callable[[FatalStorageError], None],
    ) -> None:
        self._on_fatal = on_fatal
        self._notify_owner = notify_owner
        self._lock = threading.Lock()
        self.error: FatalStorageError | None = None

    def fail(self, error: FatalStorageError) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
        _log.critical("%s", error)
        try:
            self._on_fatal(error)
        finally:
            self._notify_owner(error)

    @contextmanager
    def fatal_on_error(self, directory: DataDirectory, step: str) -> Iterator[None]:
        """Turn any exception raised by ``step`` into the fatal error, then re-raise that."""
        try:
            yield
        except Exception as cause:
            error = FatalStorageError(
                f"metaserver storage {directory.path}: {step} failed: {cause!r}; "
                "the process must stop (a failed write or fsync is never retried)"
            )
            self.fail(error)
            raise error from cause


class LogWriter:
    """Owns the segment files after recovery; runs :meth:`run` in its own thread.

    ``on_done(count, first_retained)`` is called (from the thread) after the ``count`` oldest
    undone requests became durable; ``first_retained`` is the lowest record number still on
    disk. The caller arranges for it to run on its event loop.
    """

    def __init__(
        self,
        directory: DataDirectory,
        segments: list[SegmentFile],
        active_bytes: int,
        next_number: RecordNumber,
        *,
        segment_bytes_target: int,
        write_batch_bytes_max: int,
        fdatasync: Sync,
        fsync: Sync,
        latch: FailureLatch,
        on_done: Callable[[int, RecordNumber], None],
    ) -> None:
        invariant(bool(segments), "the log writer needs an active segment")
        self._directory = directory
        self._segments = segments
        self._active_bytes = active_bytes
        self._next_number = next_number
        self._segment_bytes_target = segment_bytes_target
        self._write_batch_bytes_max = write_batch_bytes_max
        self._fdatasync = fdatasync
        self._fsync = fsync
        self._latch = latch
        self._on_done = on_done
        self._active_fd = os.open(
            segments[-1].name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, dir_fd=directory.dir_fd
        )
        self._condition = threading.Condition()
        self._queue: deque[WriteRequest] = deque()
        self._busy = False
        """The thread holds a batch (under ``_condition``): :meth:`append_now` must not run."""
        self._stopping = False
        self._records_written = 0
        self._bytes_written = 0
        self._batches_written = 0
        self._data_syncs = 0
        self._segments_created = 0
        self._thread = threading.Thread(target=self.run, name="metaserver-log-writer")

    def start(self) -> None:
        self._thread.start()

    def enqueue(self, request: WriteRequest) -> None:
        """Queue ``request`` behind every earlier one (the bound is the caller's)."""
        with self._condition:
            invariant(not self._stopping, "request queued after the log writer was stopped")
            self._queue.append(request)
            self._condition.notify()

    def append_now(self, request: AppendRequest) -> bool:
        """Write and sync ``request`` on the calling thread if the writer thread is idle
        (nothing queued, no batch in hand); False, doing nothing, otherwise.

        For the owner's event loop when the log is idle: one fdatasync of a small batch
        takes about 0.1 ms, while handing it to the thread costs two thread wake-ups and
        GIL hand-offs on the critical path of every commit.  The caller must not queue
        requests meanwhile (it is blocked here), so the thread stays idle throughout.
        A failure is fatal, as in the thread.
        """
        with self._condition:
            if self._queue or self._busy or self._stopping or self._latch.error is not None:
                return False
            self._busy = True
        try:
            step = f"appending records from {request.first} to the log"
            with self._latch.fatal_on_error(self._directory, step):
                self._append([request])
        finally:
            with self._condition:
                self._busy = False
        return True

    def stop_and_join(self) -> None:
        """Finish the queued requests (unless failed), stop the thread, close the segment."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread.ident is not None:
            self._thread.join()
        os.close(self._active_fd)

    def stats(self) -> LogStats:
        return LogStats(
            self._records_written,
            self._bytes_written,
            self._batches_written,
            self._data_syncs,
            self._segments_created,
        )

    def run(self) -> None:
        """Thread body: batches until stopped and drained, or until a fatal error."""
        while self._latch.error is None:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                if isinstance(batch, CompactRequest):
                    step = f"compacting the log into {segment_file_name(batch.first)}"
                    with self._latch.fatal_on_error(self._directory, step):
                        self._compact(batch)
                elif isinstance(batch, DropRequest):
                    step = f"dropping the segments below record {batch.below}"
                    with self._latch.fatal_on_error(self._directory, step):
                        self._drop(batch)
                else:
                    step = f"appending records from {batch[0].first} to the log"
                    with self._latch.fatal_on_error(self._directory, step):
                        self._append(batch)
            except FatalStorageError:
                return
            done = len(batch) if isinstance(batch, list) else 1
            first_retained = self._segments[0].first
            with self._condition:
                self._busy = False
            self._on_done(done, first_retained)

    def _take_batch(self) -> list[AppendRequest] | CompactRequest | DropRequest | None:
        """The next request, or every queued append up to the batch bound; None when stopped."""
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait()
            head = self._queue.popleft()
            self._busy = True
            if not isinstance(head, AppendRequest):
                return head
            batch = [head]
            batch_bytes = head.payload_bytes
            while self._queue:
                candidate = self._queue[0]
                if not isinstance(candidate, AppendRequest):
                    break
                if batch_bytes + candidate.payload_bytes > self._write_batch_bytes_max:
                    break
                batch_bytes += candidate.payload_bytes
                batch.append(candidate)
                self._queue.popleft()
            return batch

    def _append(self, batch: list[AppendRequest]) -> None:
        payloads: list[bytes] = []
        for request in batch:
            invariant(
                request.first == self._next_number + len(payloads),
                f"append numbered {request.first}, log is at {self._next_number + len(payloads)}",
            )
            payloads.extend(request.payloads)
        if not payloads:
            return  # only empty appends: everything before them is durable already
        active = self._segments[-1]
        if self._active_bytes >= self._segment_bytes_target and self._next_number > active.first:
            self._start_segment(self._next_number, base=False, frames=b"")
        frames = encode_records(payloads)
        write_all(self._active_fd, frames)
        self._fdatasync(self._active_fd)
        self._active_bytes += len(frames)
        self._next_number = RecordNumber(self._next_number + len(payloads))
        self._records_written += len(payloads)
        self._bytes_written += len(frames)
        self._batches_written += 1
        self._data_syncs += 1

    def _start_segment(self, first: RecordNumber, *, base: bool, frames: bytes) -> None:
        """Make a durable new segment holding ``frames`` and switch appends to it.

        Built under a temporary name and renamed, so that a segment file never exists with a
        partial header; the directory fsync makes the name durable before any record in the
        new segment is reported durable.
        """
        name = segment_file_name(first)
        header = encode_segment_header(first, base=base)
        temp_name = name + TEMP_SUFFIX
        dir_fd = self._directory.dir_fd
        fd = os.open(
            temp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
        )
        try:
            write_all(fd, header + frames)
            self._fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self._directory.sync()
        new_fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, dir_fd=dir_fd)
        os.close(self._active_fd)
        self._active_fd = new_fd
        self._active_bytes = len(header) + len(frames)
        self._segments = [s for s in self._segments if s.first != first]
        self._segments.append(SegmentFile(first, name))
        self._segments_created += 1

    def _compact(self, request: CompactRequest) -> None:
        invariant(
            request.first == self._next_number,
            f"compaction numbered {request.first}, log is at {self._next_number}",
        )
        frames = encode_records(request.payloads)
        self._start_segment(request.first, base=True, frames=frames)
        obsolete = [s.name for s in self._segments if s.first < request.first]
        self._directory.remove(obsolete)
        self._segments = self._segments[-1:]
        self._next_number = RecordNumber(request.first + len(request.payloads))
        self._records_written += len(request.payloads)
        self._bytes_written += len(frames)
        _log.info(
            "compacted the log of %s into %s (%d records)",
            self._directory.path,
            self._segments[0].name,
            len(request.payloads),
        )

    def _drop(self, request: DropRequest) -> None:
        keep_from = 0
        while (
            keep_from + 1 < len(self._segments)
            and self._segments[keep_from + 1].first <= request.below
        ):
            keep_from += 1
        self._directory.remove([s.name for s in self._segments[:keep_from]])
        self._segments = self._segments[keep_from:]
