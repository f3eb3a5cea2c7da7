"""The dataserver's on-disk chunk store: one file per replica in one data directory.

Contract, in short:

* A replica is ``chunk_<id:016x>_<version:016x>`` in the data directory; its format is in
  :mod:`wire.replica_format` and its crash-safety argument in :mod:`dataserver.chunk_file`.
  The version lives only in the name, so "make version V+k from V" is one ``rename`` (plus a
  directory fsync), after which the old version is gone.
* Every data call names ``(chunk id, version)``; another stored version raises
  :class:`StaleVersion`, no replica :class:`ChunkNotFound`. This fences old writers.
* Writes and truncates are durable only once :meth:`ChunkStore.sync` returns. New replicas
  appear atomically: they are built under a temporary name (:meth:`ChunkStore.stage`),
  fsynced, renamed into place, and the directory is fsynced.
* Every read verifies checksums and raises :class:`ChecksumError` naming the bad block.
* The directory holds a ``FORMAT`` file; an unknown format, or a file that is not ours, makes
  opening fail with :class:`StoreFormatError` and one clear message. An exclusive ``flock`` on
  ``FORMAT`` keeps a second store (or process) out. Leftover temporary files of a crashed
  process are removed at open.
* The API is synchronous and thread-safe. Calls on different chunks run concurrently (file
  I/O, CRC32C and zstd release the GIL); on one chunk, reads (read, verify, raw block
  reads) run side by side and every other call runs alone, under a per-chunk shared lock
  that lets a waiting writer go before new readers. The dataserver calls it through
  ``trio.to_thread.run_sync``.

At most ``open_replicas_max`` replica files are kept open (two-slot index in memory); the
least recently used is closed beyond that, after a :meth:`sync` if it has unsynced writes
(making them durable early is harmless).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import TracebackType

from dataserver.chunk_errors import (
    ChecksumError,
    ChunkExists,
    ChunkNotFound,
    ChunkStoreError,
    CorruptReplica,
    InvalidRequest,
    NoSpace,
    ReplicaBusy,
    StaleVersion,
    StoreFormatError,
    StoreInUse,
)
from dataserver.chunk_file import (
    ChunkFile,
    Failpoint,
    read_header,
)
from wire.framing import FileRange
from wire.ids import ChunkId, ChunkVersion
from wire.invariant import InvariantViolation, invariant
from wire.replica_format import (
    BLOCK_SIZE_BYTES,
    COMPRESSION_LEVEL_DEFAULT,
    FORMAT_VERSION,
    BlockCodec,
    FormatMismatch,
    HeaderCorrupt,
    RawBlock,
    layout_for_capacity,
)

__all__ = [
    "BLOCK_SIZE_BYTES",
    "CHUNK_SIZE_DEFAULT_BYTES",
    "FORMAT_FILE_NAME",
    "FORMAT_VERSION",
    "OPEN_REPLICAS_MAX_DEFAULT",
    "VERIFY_BATCH_BLOCKS",
    "ChecksumError",
    "ChunkExists",
    "ChunkNotFound",
    "ChunkStore",
    "ChunkStoreError",
    "CorruptReplica",
    "InvalidRequest",
    "NoSpace",
    "RawBlock",
    "ReplicaBusy",
    "ReplicaInfo",
    "StaleVersion",
    "StagedReplica",
    "StoreFormatError",
    "StoreInUse",
    "StoreUsage",
    "replica_file_name",
]

_log = logging.getLogger(__name__)

CHUNK_SIZE_DEFAULT_BYTES = 64 * 1024 * 1024
OPEN_REPLICAS_MAX_DEFAULT = 128
"""Replica files kept open: one descriptor each, plus the index in memory (about 100 bytes
per block, so 100 KiB for a 64 MiB chunk)."""
VERIFY_BATCH_BLOCKS = 64
"""verify() holds the chunk lock for at most this many blocks (4 MiB) at a time, so a
scrub does not stall a writer of the same chunk for a whole chunk's worth of reading."""

FORMAT_FILE_NAME = "FORMAT"
_FORMAT_TEMP_NAME = "FORMAT.tmp"
_FORMAT_LINE = re.compile(r"paxfs-chunk-store (\d+)\n\Z")
_REPLICA_NAME = re.compile(r"chunk_([0-9a-f]{16})_([0-9a-f]{16})\Z")
_STAGED_NAME = re.compile(r"chunk_[0-9a-f]{16}_[0-9a-f]{16}\.\d+-\d+\.tmp\Z")
_TOLERATED_NAMES = frozenset({"lost+found"})
_ID_MAX = 1 << 64


def replica_file_name(chunk_id: ChunkId, version: ChunkVersion) -> str:
    """Name of the file holding ``(chunk_id, version)`` inside the data directory."""
    return f"chunk_{chunk_id:016x}_{version:016x}"


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One line of the full chunk report.

    ``damage`` is None for a usable replica; otherwise why it is unusable (header failed its
    checksum, an fsync failed): report it as corrupt and delete it. For a damaged replica the
    length, capacity and compression fields are 0/False when the header could not be read.
    ``mtime_ns`` is the file's modification time, a cheap hint for the scrubber.
    """

    chunk_id: ChunkId
    version: ChunkVersion
    length_bytes: int
    capacity_bytes: int
    compressed: bool
    disk_bytes: int
    mtime_ns: int
    damage: str | None


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Space for the heartbeat. ``capacity_bytes`` is the file system's size, lowered to the
    configured cap; ``available_bytes`` what the store may still fill (free space on the file
    system, lowered to cap minus used); ``used_bytes`` what the replicas occupy on disk."""

    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    fs_total_bytes: int
    fs_free_bytes: int
    replica_count: int


@dataclass(frozen=True, slots=True)
class _Meta:
    """What the catalog knows of a replica; replaced whole so readers see one snapshot."""

    version: ChunkVersion
    length_bytes: int
    capacity_bytes: int
    compressed: bool
    disk_bytes: int
    damage: str | None


class _Record:
    """A stored replica. ``meta`` and ``file`` change only under the chunk's lock."""

    __slots__ = ("meta", "file")

    def __init__(self, meta: _Meta, file: ChunkFile | None) -> None:
        self.meta = meta
        self.file = file


class _SharedLock:
    """A lock held by one exclusive owner or by many shared ones (readers).

    Writer-preferring: once an exclusive owner waits, new shared owners wait behind it, so
    a stream of reads cannot starve a write of the same chunk."""

    __slots__ = ("_changed", "_shared", "_exclusive", "_exclusive_waiting")

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    def acquire_shared(self) -> None:
        with self._changed:
            while self._exclusive or self._exclusive_waiting:
                self._changed.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._changed:
            invariant(self._shared > 0, "shared lock released more often than taken")
            self._shared -= 1
            if self._shared == 0:
                self._changed.notify_all()

    def acquire(self, *, blocking: bool = True) -> bool:
        with self._changed:
            if self._exclusive or self._shared:
                if not blocking:
                    return False
                self._exclusive_waiting += 1
                try:
                    while self._exclusive or self._shared:
                        self._changed.wait()
                finally:
                    self._exclusive_waiting -= 1
            self._exclusive = True
            return True

    def release(self) -> None:
        with self._changed:
            invariant(self._exclusive, "exclusive lock released but not held")
            self._exclusive = False
            self._changed.notify_all()


class _ChunkLocks:
    """One :class:`_SharedLock` per chunk id, created on first use and dropped when nobody
    holds or waits for it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[ChunkId, tuple[_SharedLock, list[int]]] = {}

    def _enter(self, chunk_id: ChunkId) -> tuple[_SharedLock, list[int]]:
        with self._mutex:
            entry = self._locks.get(chunk_id)
            if entry is None:
                entry = (_SharedLock(), [0])
                self._locks[chunk_id] = entry
            entry[1][0] += 1
            return entry

    def _leave(self, chunk_id: ChunkId, entry: tuple[_SharedLock, list[int]]) -> None:
        with self._mutex:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[chunk_id]

    @contextmanager
    def hold(self, chunk_id: ChunkId, *, shared: bool = False) -> Iterator[None]:
        """Hold the chunk's lock: alone, or (``shared``) beside other shared holders."""
        entry = self._enter(chunk_id)
        try:
            if shared:
                entry[0].acquire_shared()
                try:
                    yield
                finally:
                    entry[0].release_shared()
            else:
                entry[0].acquire()
                try:
                    yield
                finally:
                    entry[0].release()
        finally:
            self._leave(chunk_id, entry)

    @contextmanager
    def try_hold(self, chunk_id: ChunkId) -> Iterator[bool]:
        """Yield True holding the lock alone, or False at once if anyone else holds it."""
        entry = self._enter(chunk_id)
        try:
            acquired = entry[0].acquire(blocking=False)
            try:
                yield acquired
            finally:
                if acquired:
                    entry[0].release()
        finally:
            self._leave(chunk_id, entry)


def _check_ids(chunk_id: ChunkId, version: ChunkVersion) -> None:
    if not 0 <= chunk_id < _ID_MAX or not 0 <= version < _ID_MAX:
        raise InvalidRequest(f"chunk id {chunk_id} or version {version} out of range")


class ChunkStore:
    """All replicas in one data directory. See the module docstring for the contract.

    ``chunk_size_bytes`` (a multiple of 64 KiB) is the capacity given to new replicas; each
    replica keeps the capacity it was created with. ``capacity_bytes_max`` caps what the store
    reports and accepts. ``failpoint`` is called at named crash-relevant steps (tests).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        chunk_size_bytes: int = CHUNK_SIZE_DEFAULT_BYTES,
        capacity_bytes_max: int | None = None,
        compression_level: int = COMPRESSION_LEVEL_DEFAULT,
        open_replicas_max: int = OPEN_REPLICAS_MAX_DEFAULT,
        failpoint: Failpoint | None = None,
    ) -> None:
        layout_for_capacity(chunk_size_bytes)
        if open_replicas_max < 1:
            raise ValueError(f"open_replicas_max must be at least 1, got {open_replicas_max}")
        self.directory = os.fspath(directory)
        self.chunk_size_bytes = chunk_size_bytes
        self.capacity_bytes_max = capacity_bytes_max
        self._codec = BlockCodec(compression_level)
        self._open_replicas_max = open_replicas_max
        self._failpoint = failpoint
        self._mutex = threading.Lock()
        self._records: dict[ChunkId, _Record] = {}
        self._open_lru: OrderedDict[ChunkId, None] = OrderedDict()
        self._used_bytes = 0
        self._locks = _ChunkLocks()
        self._load_mutex = threading.Lock()
        self._stage_counter = itertools.count()
        self._closed = False
        os.makedirs(self.directory, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._format_fd = -1
        try:
            self._format_fd = self._claim_directory()
            self._scan()
        except BaseException:
            if self._format_fd >= 0:
                os.close(self._format_fd)
            os.close(self._dir_fd)
            raise

    # ---- opening -------------------------------------------------------------------------

    def _claim_directory(self) -> int:
        """Check or create the FORMAT file and lock it; return its descriptor."""
        names = set(os.listdir(self._dir_fd))
        if FORMAT_FILE_NAME not in names:
            if names - {_FORMAT_TEMP_NAME}:
                raise StoreFormatError(
                    f"{self.directory} is not a paxfs chunk store: it has no {FORMAT_FILE_NAME}"
                    " file and is not empty"
                )
            self._write_format_file()
        try:
            fd = os.open(FORMAT_FILE_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except IsADirectoryError as exc:
            raise StoreFormatError(f"{self.directory}: {FORMAT_FILE_NAME} is a directory") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StoreInUse(f"{self.directory} is in use by another chunk store") from exc
            content = os.pread(fd, 256, 0)
            match = _FORMAT_LINE.match(content.decode("ascii", errors="replace"))
            if match is None:
                raise StoreFormatError(
                    f"{self.directory} is not a paxfs chunk store: {FORMAT_FILE_NAME} reads"
                    f" {content[:64]!r}"
                )
            found = int(match.group(1))
            if found != FORMAT_VERSION:
                raise StoreFormatError(
                    f"{self.directory} holds chunk store format {found}; this paxfs knows"
                    f" format {FORMAT_VERSION} only"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write_format_file(self) -> None:
        fd = os.open(
            _FORMAT_TEMP_NAME,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o644,
            dir_fd=self._dir_fd,
        )
        try:
            os.write(fd, f"paxfs-chunk-store {FORMAT_VERSION}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(
            _FORMAT_TEMP_NAME, FORMAT_FILE_NAME, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd
        )
        os.fsync(self._dir_fd)

    def _scan(self) -> None:
        """Build the catalog; remove leftover temporary files and superseded versions."""
        removed = False
        found: dict[ChunkId, list[ChunkVersion]] = {}
        for name in sorted(os.listdir(self._dir_fd)):
            if name == FORMAT_FILE_NAME or name in _TOLERATED_NAMES:
                continue
            if name == _FORMAT_TEMP_NAME or _STAGED_NAME.match(name):
                _log.info("removing leftover temporary file %s", name)
                os.unlink(name, dir_fd=self._dir_fd)
                removed = True
                continue
            match = _REPLICA_NAME.match(name)
            if match is None:
                raise StoreFormatError(
                    f"{self.directory}: {name!r} is not a paxfs chunk store file; refusing to"
                    " use this directory"
                )
            chunk_id = ChunkId(int(match.group(1), 16))
            found.setdefault(chunk_id, []).append(ChunkVersion(int(match.group(2), 16)))
        for chunk_id, versions in found.items():
            versions.sort()
            for superseded in versions[:-1]:
                _log.warning(
                    "chunk %#x: removing version %d superseded by %d",
                    chunk_id,
                    superseded,
                    versions[-1],
                )
                os.unlink(replica_file_name(chunk_id, superseded), dir_fd=self._dir_fd)
                removed = True
            meta = self._read_meta(chunk_id, versions[-1])
            self._records[chunk_id] = _Record(meta, None)
            self._used_bytes += meta.disk_bytes
        if removed:
            os.fsync(self._dir_fd)

    def _read_meta(self, chunk_id: ChunkId, version: ChunkVersion) -> _Meta:
        name = replica_file_name(chunk_id, version)
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir_fd)
        try:
            disk_bytes = os.fstat(fd).st_blocks * 512
            try:
                header = read_header(fd)
            except (FormatMismatch, IsADirectoryError) as exc:
                raise StoreFormatError(
                    f"{os.path.join(self.directory, name)} is not a paxfs chunk file: {exc}"
                ) from exc
            except HeaderCorrupt as exc:
                return _Meta(version, 0, 0, False, disk_bytes, f"header: {exc}")
        finally:
            os.close(fd)
        if header.chunk_id != chunk_id:
            damage = f"header names chunk {header.chunk_id:#x}"
            return _Meta(version, 0, 0, False, disk_bytes, damage)
        capacity = header.block_count * BLOCK_SIZE_BYTES
        return _Meta(version, header.length_bytes, capacity, header.compressed, disk_bytes, None)

    # ---- closing -------------------------------------------------------------------------

    def close(self, *, sync: bool = True) -> None:
        """Close every replica file and release the directory; the store is unusable after.

        With ``sync`` (the default) replicas with unsynced writes are synced first. Without
        it those writes are dropped exactly as a crash would drop them (used to simulate
        crashes, and to abandon a store whose disk failed). Call it when no other call is
        in flight."""
        if self._closed:
            return
        self._closed = True
        with self._mutex:
            open_ids = list(self._open_lru)
        for chunk_id in open_ids:
            with self._locks.hold(chunk_id):
                record = self._records.get(chunk_id)
                if record is None or record.file is None:
                    continue
                if sync:
                    self._close_file(chunk_id, record)
                else:
                    record.file.close()
                    record.file = None
        os.close(self._format_fd)
        os.close(self._dir_fd)

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- replica lifecycle ----------------------------------------------------------------

    def stage(
        self,
        chunk_id: ChunkId,
        version: ChunkVersion,
        *,
        compressed: bool,
        capacity_bytes: int | None = None,
    ) -> StagedReplica:
        """Start building a new replica under a temporary name (for creation and copies).

        Raises :class:`ChunkExists` if any version of the chunk is stored. ``capacity_bytes``
        defaults to the store's chunk size; a copy passes the source's capacity.
        """
        self._check_open()
        _check_ids(chunk_id, version)
        capacity = self.chunk_size_bytes if capacity_bytes is None else capacity_bytes
        try:
            layout_for_capacity(capacity)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        with self._locks.hold(chunk_id):
            self._refuse_existing(chunk_id)
        name = (
            f"{replica_file_name(chunk_id, version)}.{os.getpid()}-{next(self._stage_counter)}.tmp"
        )
        chunk_file = ChunkFile.create(
            self._dir_fd,
            name,
            chunk_id=chunk_id,
            version=version,
            capacity_bytes=capacity,
            compressed=compressed,
            codec=self._codec,
            failpoint=self._failpoint,
        )
        return StagedReplica(self, name, chunk_file)

    def create(self, chunk_id: ChunkId, version: ChunkVersion, *, compressed: bool) -> None:
        """Create an empty replica, durably and atomically. :class:`ChunkExists` if stored."""
        with self.stage(chunk_id, version, compressed=compressed) as staged:
            staged.commit()

    def _refuse_existing(self, chunk_id: ChunkId) -> None:
        with self._mutex:
            record = self._records.get(chunk_id)
        if record is not None:
            raise ChunkExists(chunk_id, record.meta.version)

    def _commit_staged(self, temp_name: str, chunk_file: ChunkFile) -> None:
        """Sync ``chunk_file``, rename it into place and fsync the directory."""
        chunk_id, version = chunk_file.chunk_id, chunk_file.version
        chunk_file.sync()
        self._fail("commit:synced")
        with self._locks.hold(chunk_id):
            self._refuse_existing(chunk_id)
            os.rename(
                temp_name,
                replica_file_name(chunk_id, version),
                src_dir_fd=self._dir_fd,
                dst_dir_fd=self._dir_fd,
            )
            self._fail("commit:renamed")
            os.fsync(self._dir_fd)
            meta = _Meta(
                version,
                chunk_file.length_bytes,
                chunk_file.capacity_bytes,
                chunk_file.compressed,
                chunk_file.disk_bytes(),
                None,
            )
            with self._mutex:
                self._records[chunk_id] = _Record(meta, chunk_file)
                self._open_lru[chunk_id] = None
                self._used_bytes += meta.disk_bytes
        self._evict_excess()

    def bump_version(
        self,
        chunk_id: ChunkId,
        version: ChunkVersion,
        new_version: ChunkVersion,
        *,
        keep_bytes: int | None = None,
    ) -> int:
        """Turn the stored ``version`` into ``new_version`` (> ``version``) by renaming;
        return the replica's length.

        With ``keep_bytes``, bytes past it are dropped first and that is synced before the
        rename, so the new version never holds them, even after a crash (the old version
        loses only bytes that were not its file data either). Durable when it returns;
        afterwards every call naming ``version`` gets :class:`StaleVersion`. Other unsynced
        writes carry over and still need :meth:`sync`."""
        self._check_open()
        _check_ids(chunk_id, new_version)
        if new_version <= version:
            raise InvalidRequest(
                f"chunk {chunk_id:#x}: new version {new_version} is not above {version}"
            )
        if keep_bytes is not None and keep_bytes < 0:
            raise InvalidRequest(f"chunk {chunk_id:#x}: negative length {keep_bytes} to keep")
        with self._locks.hold(chunk_id):
            record = self._record(chunk_id, version)
            self._refuse_damaged(chunk_id, record)
            if keep_bytes is not None and record.meta.length_bytes > keep_bytes:
                chunk_file = self._open_file(chunk_id, record)
                chunk_file.truncate(keep_bytes)
                self._sync_file(chunk_id, record, chunk_file)
            os.rename(
                replica_file_name(chunk_id, version),
                replica_file_name(chunk_id, new_version),
                src_dir_fd=self._dir_fd,
                dst_dir_fd=self._dir_fd,
            )
            self._fail("bump:renamed")
            os.fsync(self._dir_fd)
            record.meta = replace(record.meta, version=new_version)
            if record.file is not None:
                record.file.version = new_version
            length = record.meta.length_bytes
        self._evict_excess()
        return length

    def delete(self, chunk_id: ChunkId, version: ChunkVersion) -> None:
        """Remove the replica ``(chunk_id, version)``, damaged or not; unsynced writes are lost.

        The directory is not fsynced: a deletion undone by a crash leaves a replica the
        metaserver did not ask for, which it deletes again, so an fsync per delete buys
        nothing."""
        self._check_open()
        with self._locks.hold(chunk_id):
            record = self._record(chunk_id, version)
            if record.file is not None:
                record.file.close()
                record.file = None
            os.unlink(replica_file_name(chunk_id, version), dir_fd=self._dir_fd)
            with self._mutex:
                del self._records[chunk_id]
                self._open_lru.pop(chunk_id, None)
                self._used_bytes -= record.meta.disk_bytes

    # ---- data ----------------------------------------------------------------------------

    def write(
        self,
        chunk_id: ChunkId,
        version: ChunkVersion,
        offset: int,
        data: bytes | bytearray | memoryview,
    ) -> int:
        """Write ``data`` at ``offset`` inside the chunk (growing its length if needed);
        return the replica's length after it.

        Not durable until :meth:`sync`. Raises :class:`InvalidRequest` past the chunk's
        capacity, :class:`NoSpace` when the disk or the cap is full, :class:`ChecksumError`
        if a partially overwritten block is already corrupt."""
        self._check_room(memoryview(data).nbytes)
        with self._opened(chunk_id, version) as (record, chunk_file):
            try:
                chunk_file.write(offset, data)
            finally:
                self._refresh(record, chunk_file)
            return chunk_file.length_bytes

    def read(self, chunk_id: ChunkId, version: ChunkVersion, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer at the end of the replica, b"" past it.

        Raises :class:`ChecksumError` naming the first bad block in the range."""
        with self._opened(chunk_id, version, shared=True) as (_, chunk_file):
            return bytes(chunk_file.read(offset, size))

    def read_to_send(
        self, chunk_id: ChunkId, version: ChunkVersion, offset: int, size: int
    ) -> tuple[FileRange | bytes | memoryview, int]:
        """:meth:`read` as a reply's payload (see :meth:`ChunkFile.read_to_send`), and the
        replica's length at the time of the read."""
        with self._opened(chunk_id, version, shared=True) as (_, chunk_file):
            return chunk_file.read_to_send(offset, size), chunk_file.length_bytes

    def open_for_local_read(self, chunk_id: ChunkId, version: ChunkVersion) -> tuple[int, str]:
        """A new read-only descriptor of the replica's file and the file's name, for a
        reader on this host that reads the file itself (see :mod:`wire.local_reads`).

        Only a replica whose changes are all synced is handed out (:class:`ReplicaBusy`
        otherwise): such a reader goes by the index in the file, which a sync brings up
        to date."""
        with self._opened(chunk_id, version, shared=True) as (_, chunk_file):
            if chunk_file.has_unsynced_changes:
                raise ReplicaBusy(f"chunk {chunk_id:#x} v{version} has unsynced changes")
            name = replica_file_name(chunk_id, version)
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir_fd), name

    def truncate(self, chunk_id: ChunkId, version: ChunkVersion, length_bytes: int) -> int:
        """Set the replica's length (shrink drops data, growth reads as zeros); needs sync.
        Returns the new length."""
        with self._opened(chunk_id, version) as (record, chunk_file):
            try:
                chunk_file.truncate(length_bytes)
            finally:
                self._refresh(record, chunk_file)
            return chunk_file.length_bytes

    def sync(self, chunk_id: ChunkId, version: ChunkVersion) -> int:
        """Make all writes and truncates of the replica durable (fsync of data, then index);
        return its durable length.

        If the fsync fails the replica is marked damaged and :class:`CorruptReplica` raised:
        after a failed fsync the kernel may have dropped the data, so it is never retried."""
        with self._opened(chunk_id, version) as (record, chunk_file):
            self._sync_file(chunk_id, record, chunk_file)
            return chunk_file.length_bytes

    def verify(self, chunk_id: ChunkId, version: ChunkVersion) -> list[int]:
        """Indexes of the replica's bad blocks (empty if all verify), for the scrubber.

        Reads every stored block, holding the chunk lock for at most
        ``VERIFY_BATCH_BLOCKS`` blocks at a time. Raises :class:`CorruptReplica` if the
        replica as a whole is damaged, :class:`StaleVersion` if it changes version meanwhile.
        """
        bad: list[int] = []
        first = 0
        while True:
            with self._opened(chunk_id, version, shared=True) as (_, chunk_file):
                block_count = chunk_file.layout.block_count
                bad.extend(chunk_file.verify(first, VERIFY_BATCH_BLOCKS))
            first += VERIFY_BATCH_BLOCKS
            if first >= block_count:
                return bad

    def read_raw_block(
        self, chunk_id: ChunkId, version: ChunkVersion, block_index: int
    ) -> RawBlock | None:
        """Block ``block_index`` as stored (verified), or None for a hole; for copying a
        replica to another dataserver without recompressing it."""
        with self._opened(chunk_id, version, shared=True) as (_, chunk_file):
            return chunk_file.read_raw_block(block_index)

    # ---- reports -------------------------------------------------------------------------

    def stat(self, chunk_id: ChunkId) -> ReplicaInfo:
        """What is stored for ``chunk_id`` (whatever its version); :class:`ChunkNotFound`."""
        self._check_open()
        with self._locks.hold(chunk_id):
            with self._mutex:
                record = self._records.get(chunk_id)
            if record is None:
                raise ChunkNotFound(chunk_id)
            return self._info(chunk_id, record)

    def list_replicas(self) -> list[ReplicaInfo]:
        """Every replica, ordered by chunk id: the full chunk report."""
        self._check_open()
        with self._mutex:
            chunk_ids = sorted(self._records)
        report: list[ReplicaInfo] = []
        for chunk_id in chunk_ids:
            with self._locks.hold(chunk_id):
                with self._mutex:
                    record = self._records.get(chunk_id)
                if record is not None:
                    report.append(self._info(chunk_id, record))
        return report

    def usage(self) -> StoreUsage:
        """Capacity and use of the data directory (statvfs, lowered to the configured cap)."""
        self._check_open()
        fs = os.fstatvfs(self._dir_fd)
        fs_total = fs.f_blocks * fs.f_frsize
        fs_free = fs.f_bavail * fs.f_frsize
        with self._mutex:
            used = self._used_bytes
            count = len(self._records)
        capacity, available = fs_total, fs_free
        if self.capacity_bytes_max is not None:
            capacity = min(capacity, self.capacity_bytes_max)
            available = max(0, min(available, self.capacity_bytes_max - used))
        return StoreUsage(capacity, used, available, fs_total, fs_free, count)

    def _info(self, chunk_id: ChunkId, record: _Record) -> ReplicaInfo:
        status = os.stat(replica_file_name(chunk_id, record.meta.version), dir_fd=self._dir_fd)
        self._set_meta(record, replace(record.meta, disk_bytes=status.st_blocks * 512))
        meta = record.meta
        return ReplicaInfo(
            chunk_id=chunk_id,
            version=meta.version,
            length_bytes=meta.length_bytes,
            capacity_bytes=meta.capacity_bytes,
            compressed=meta.compressed,
            disk_bytes=meta.disk_bytes,
            mtime_ns=status.st_mtime_ns,
            damage=meta.damage,
        )

    # ---- internals -----------------------------------------------------------------------

    def _fail(self, point: str) -> None:
        if self._failpoint is not None:
            self._failpoint(point)

    def _check_room(self, size: int) -> None:
        if self.capacity_bytes_max is None:
            return
        with self._mutex:
            used = self._used_bytes
        if used + size > self.capacity_bytes_max:
            raise NoSpace(
                f"{self.directory}: {used} bytes used, cap {self.capacity_bytes_max}; no room"
                f" for {size} more"
            )

    def _record(self, chunk_id: ChunkId, version: ChunkVersion) -> _Record:
        """The record of ``(chunk_id, version)``; caller holds the chunk lock."""
        with self._mutex:
            record = self._records.get(chunk_id)
        if record is None:
            raise ChunkNotFound(chunk_id)
        if record.meta.version != version:
            raise StaleVersion(chunk_id, version, record.meta.version)
        return record

    def _refuse_damaged(self, chunk_id: ChunkId, record: _Record) -> None:
        if record.meta.damage is not None:
            raise CorruptReplica(chunk_id, record.meta.version, record.meta.damage)

    def _check_open(self) -> None:
        if self._closed:
            raise ChunkStoreError(f"chunk store {self.directory} is closed")

    @contextmanager
    def _opened(
        self, chunk_id: ChunkId, version: ChunkVersion, *, shared: bool = False
    ) -> Iterator[tuple[_Record, ChunkFile]]:
        """Hold the chunk lock and yield the fenced, open replica.

        ``shared`` is for calls that only read the replica (they may run side by side);
        they must not change the record or the file."""
        self._check_open()
        with self._locks.hold(chunk_id, shared=shared):
            record = self._record(chunk_id, version)
            self._refuse_damaged(chunk_id, record)
            if shared:
                # Opening the file changes the record: one shared holder at a time does it.
                with self._load_mutex:
                    chunk_file = self._open_file(chunk_id, record)
            else:
                chunk_file = self._open_file(chunk_id, record)
            yield record, chunk_file
        self._evict_excess()

    def _open_file(self, chunk_id: ChunkId, record: _Record) -> ChunkFile:
        """The replica's open file, opened if need be, as the most recently used; caller
        holds the chunk lock."""
        chunk_file = record.file
        if chunk_file is None:
            chunk_file = self._load(chunk_id, record)
        with self._mutex:
            self._open_lru[chunk_id] = None
            self._open_lru.move_to_end(chunk_id)
        return chunk_file

    def _load(self, chunk_id: ChunkId, record: _Record) -> ChunkFile:
        version = record.meta.version
        try:
            chunk_file = ChunkFile.open(
                self._dir_fd,
                replica_file_name(chunk_id, version),
                chunk_id=chunk_id,
                version=version,
                codec=self._codec,
                failpoint=self._failpoint,
            )
        except (FormatMismatch, HeaderCorrupt, FileNotFoundError) as exc:
            self._mark_damaged(chunk_id, record, f"cannot open: {exc}")
            raise CorruptReplica(chunk_id, version, f"cannot open: {exc}") from exc
        record.file = chunk_file
        return chunk_file

    def _refresh(self, record: _Record, chunk_file: ChunkFile) -> None:
        self._set_meta(
            record,
            replace(
                record.meta,
                length_bytes=chunk_file.length_bytes,
                disk_bytes=chunk_file.disk_bytes(),
            ),
        )

    def _set_meta(self, record: _Record, meta: _Meta) -> None:
        with self._mutex:
            self._used_bytes += meta.disk_bytes - record.meta.disk_bytes
            record.meta = meta
            invariant(self._used_bytes >= 0, f"used bytes went negative: {self._used_bytes}")

    def _sync_file(self, chunk_id: ChunkId, record: _Record, chunk_file: ChunkFile) -> None:
        """Sync an open replica (caller holds its lock); a failed fsync marks it damaged."""
        try:
            chunk_file.sync()
        except OSError as exc:
            self._mark_damaged(chunk_id, record, f"fsync failed: {exc}")
            raise CorruptReplica(chunk_id, record.meta.version, f"fsync failed: {exc}") from exc
        self._refresh(record, chunk_file)

    def _mark_damaged(self, chunk_id: ChunkId, record: _Record, reason: str) -> None:
        _log.error("chunk %#x version %d is damaged: %s", chunk_id, record.meta.version, reason)
        if record.file is not None:
            record.file.close()
            record.file = None
            with self._mutex:
                self._open_lru.pop(chunk_id, None)
        self._set_meta(record, replace(record.meta, damage=reason))

    def _close_file(self, chunk_id: ChunkId, record: _Record) -> None:
        """Sync (if needed) and close an open replica; caller holds the chunk lock."""
        chunk_file = record.file
        if chunk_file is None:
            raise InvariantViolation(f"chunk {chunk_id:#x} is not open")
        try:
            chunk_file.sync()
        except OSError as exc:
            self._mark_damaged(chunk_id, record, f"fsync failed: {exc}")
            return
        self._refresh(record, chunk_file)
        chunk_file.close()
        record.file = None
        with self._mutex:
            self._open_lru.pop(chunk_id, None)

    def _evict_excess(self) -> None:
        """Close least recently used replicas beyond the limit, skipping any that are busy."""
        with self._mutex:
            excess = len(self._open_lru) - self._open_replicas_max
            if excess <= 0:
                return
            candidates = list(self._open_lru)
        for chunk_id in candidates:
            if excess <= 0:
                return
            with self._locks.try_hold(chunk_id) as held:
                if not held:
                    continue
                with self._mutex:
                    record = self._records.get(chunk_id)
                if record is None or record.file is None:
                    continue
                self._close_file(chunk_id, record)
                excess -= 1


class StagedReplica:
    """A new replica under a temporary name, invisible to the store until :meth:`commit`.

    Used by one caller at a time (not thread-safe). As a context manager it removes the
    temporary file unless committed. Writes follow :class:`ChunkFile` semantics.
    """

    def __init__(self, store: ChunkStore, temp_name: str, chunk_file: ChunkFile) -> None:
        self._store = store
        self._temp_name = temp_name
        self._file: ChunkFile | None = chunk_file
        self.chunk_id = chunk_file.chunk_id
        self.version = chunk_file.version

    def _open_file(self) -> ChunkFile:
        if self._file is None:
            raise ChunkStoreError(f"staged replica of chunk {self.chunk_id:#x} is finished")
        return self._file

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._store._check_room(memoryview(data).nbytes)
        self._open_file().write(offset, data)

    def write_raw_block(self, raw: RawBlock) -> None:
        """Store a block read with :meth:`ChunkStore.read_raw_block` from another replica."""
        self._store._check_room(len(raw.payload))
        self._open_file().write_raw_block(raw)

    def truncate(self, length_bytes: int) -> None:
        self._open_file().truncate(length_bytes)

    def commit(self) -> None:
        """Make the replica durable and visible under its final name.

        Raises :class:`ChunkExists` if a replica of the chunk appeared meanwhile (the staged
        file stays; leave the context or call :meth:`abort`)."""
        chunk_file = self._open_file()
        self._store._commit_staged(self._temp_name, chunk_file)
        self._file = None

    def abort(self) -> None:
        """Drop the staged replica; harmless after :meth:`commit`."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        os.unlink(self._temp_name, dir_fd=self._store._dir_fd)

    def __enter__(self) -> StagedReplica:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.abort()
