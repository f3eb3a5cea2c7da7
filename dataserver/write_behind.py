"""Write-behind for replica files: start writeback early, drop written pages behind.

A dataserver writes far more than it reads back soon (a reader is served by any replica,
and the writer caches what it wrote), yet a buffered write leaves every byte in the page
cache as a dirty page. Letting those pile up costs three ways: the fsync that ends a chunk
waits for all of them at once (a long ``close``), the kernel throttles writers in bursts
once its dirty limit is hit, and every new page-cache page is fresh memory the kernel must
fault in and zero (on the virtual machines this runs on, first touch of guest memory made
a buffered write cost about 1.6 ms of CPU per MiB against 0.2 ms when pages are reused).

So, as HDFS datanodes do (``sync.behind.writes``, ``drop.cache.behind.writes``), each
contiguous range written is handed to writeback with ``sync_file_range(WRITE)`` once it
reaches :data:`WRITEBACK_START_BYTES`, and once more than :data:`DROP_BEHIND_LAG_BYTES`
have been handed over, the oldest range is waited for and its (now clean) pages dropped
with ``posix_fadvise(DONTNEED)``, so that the next write reuses them. The newest
:data:`DROP_BEHIND_LAG_BYTES` stay cached, also after a sync: for a read-modify-write of a
partial block, or a read right after a write (a small file stays cached whole).

Durability does not change: ``sync_file_range`` writes no metadata and flushes no disk
cache, so :meth:`dataserver.chunk_file.ChunkFile.sync` still ends in ``fdatasync``. But a
waiting ``sync_file_range`` consumes a writeback error (the kernel advances the file's error
cursor, and the next ``fdatasync`` would not see it), so such an error is kept in
:attr:`WriteBehind.error` and the owner must fail its next sync with it, exactly as a
failed ``fdatasync``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections import deque

_log = logging.getLogger(__name__)

WRITEBACK_START_BYTES = 1024 * 1024
"""A contiguous written range is handed to writeback once it is this long (or when the
next write is elsewhere): big enough for large disk requests, small enough to start early."""
DROP_BEHIND_LAG_BYTES = 8 * 1024 * 1024
"""Bytes per open replica handed to writeback but still cached; beyond it the oldest range
is waited for and dropped. Bounds the page cache a writer of one replica holds."""

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

_UNSUPPORTED = frozenset({errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP})
"""Errors that mean the file (system) does not do this, not that data was lost."""

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    """``sync_file_range(2)``; raises :class:`OSError` with the errno on failure."""
    if _sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range failed: {os.strerror(err)}")


class WriteBehind:
    """Writeback and drop-behind bookkeeping of one open file (see the module docstring).

    Not thread-safe: the owner of the file serialises calls, as it does its writes.
    """

    def __init__(
        self,
        fd: int,
        *,
        start_bytes: int = WRITEBACK_START_BYTES,
        lag_bytes: int = DROP_BEHIND_LAG_BYTES,
    ) -> None:
        self._fd = fd
        self._start_bytes = start_bytes
        self._lag_bytes = lag_bytes
        self._pending_offset = 0
        self._pending_bytes = 0
        self._started: deque[tuple[int, int]] = deque()
        self._started_bytes = 0
        self._enabled = True
        self.error: OSError | None = None
        """A writeback error seen here; the owner's next sync must fail with it."""

    @property
    def cached_bytes(self) -> int:
        """Written bytes this object still tracks (not yet dropped from the page cache)."""
        return self._pending_bytes + self._started_bytes

    def written(self, offset: int, length: int) -> None:
        """Note that ``[offset, offset + length)`` was just written with ``pwrite``."""
        if not self._enabled or length <= 0:
            return
        if self._pending_bytes and offset == self._pending_offset + self._pending_bytes:
            self._pending_bytes += length
        else:
            self._start_pending()
            self._pending_offset, self._pending_bytes = offset, length
        if self._pending_bytes >= self._start_bytes:
            self._start_pending()
        while self._enabled and self._started_bytes > self._lag_bytes:
            offset, length = self._started.popleft()
            self._started_bytes -= length
            flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
            if self._call(offset, length, flags | SYNC_FILE_RANGE_WAIT_AFTER):
                self._drop(offset, length)

    def synced(self) -> None:
        """The file was just ``fdatasync``-ed, so every tracked page is clean: drop the
        oldest beyond the lag at once, and keep the newest cached (a small file stays
        cached whole, for a read right after its close)."""
        if self._pending_bytes:
            self._started.append((self._pending_offset, self._pending_bytes))
            self._started_bytes += self._pending_bytes
            self._pending_bytes = 0
        while self._enabled and self._started_bytes > self._lag_bytes:
            offset, length = self._started.popleft()
            self._started_bytes -= length
            self._drop(offset, length)

    def _forget(self) -> None:
        self._pending_bytes = 0
        self._started.clear()
        self._started_bytes = 0

    def _start_pending(self) -> None:
        if not self._pending_bytes:
            return
        offset, length = self._pending_offset, self._pending_bytes
        self._pending_bytes = 0
        if self._call(offset, length, SYNC_FILE_RANGE_WRITE):
            self._started.append((offset, length))
            self._started_bytes += length

    def _call(self, offset: int, length: int, flags: int) -> bool:
        """Run sync_file_range; False (and write-behind off for this file) if it failed."""
        try:
            sync_file_range(self._fd, offset, length, flags)
        except OSError as exc:
            self._enabled = False
            self._forget()
            if exc.errno not in _UNSUPPORTED:
                _log.error("writeback of fd %d failed: %s", self._fd, exc)
                self.error = exc
            return False
        return True

    def _drop(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            # Only a cache hint: a file that refuses it keeps its pages, nothing else.
            self._enabled = False
