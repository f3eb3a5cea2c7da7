"""The data directory: its lock, its FORMAT file, the names of the files in it.

Layout of ``DIR``::

    LOCK                          flock'ed while a storage has the directory open
    FORMAT                        "paxfs-metaserver-storage <version>\\ncluster <cluster id>\\n"
    log-<first number:020d>.seg   log segments (:mod:`metaserver.storage.record_format`)
    snapshot-<index:020d>.zst     the newest snapshot (:mod:`metaserver.storage.snapshot_format`)
    *.tmp                         files being written; leftovers of a crash are removed at open

Anything else (except ``lost+found``, for a directory that is a mount point) means the
directory is not ours, and opening refuses it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from metaserver.storage.errors import ClusterMismatch, StorageFormatError, StorageLocked
from metaserver.storage.record_format import RecordNumber

_log = logging.getLogger(__name__)

STORAGE_FORMAT_VERSION = 1
FORMAT_FILE_NAME = "FORMAT"
LOCK_FILE_NAME = "LOCK"
TEMP_SUFFIX = ".tmp"
CLUSTER_ID_BYTES_MAX = 255
_FORMAT_LINE = re.compile(r"paxfs-metaserver-storage (\d+)\Z")
_CLUSTER_LINE = re.compile(r"cluster (.+)\Z")
_SEGMENT_NAME = re.compile(r"log-(\d{20})\.seg\Z")
_SNAPSHOT_NAME = re.compile(r"snapshot-(\d{20})\.zst\Z")
_TOLERATED_NAMES = frozenset({LOCK_FILE_NAME, "lost+found"})
_NAMES_SHOWN_MAX = 5

Sync = Callable[[int], None]
"""An fsync-like function on a file descriptor (``os.fsync``, ``os.fdatasync``, a fault)."""


def segment_file_name(first: RecordNumber) -> str:
    """Name of the segment whose first record is numbered ``first``."""
    return f"log-{first:020d}.seg"


def snapshot_file_name(index: int) -> str:
    """Name of the snapshot covering the log up to ``index``."""
    return f"snapshot-{index:020d}.zst"


def parse_segment_name(name: str) -> RecordNumber | None:
    """The first record number a segment file name carries, or None if it is not one."""
    match = _SEGMENT_NAME.match(name)
    return RecordNumber(int(match.group(1))) if match else None


def parse_snapshot_name(name: str) -> int | None:
    """The index a snapshot file name carries, or None if it is not one."""
    match = _SNAPSHOT_NAME.match(name)
    return int(match.group(1)) if match else None


def _is_ours(name: str) -> bool:
    stem = name.removesuffix(TEMP_SUFFIX)
    return (
        name in _TOLERATED_NAMES
        or stem == FORMAT_FILE_NAME
        or parse_segment_name(stem) is not None
        or parse_snapshot_name(stem) is not None
    )


def check_cluster_id(cluster_id: str) -> None:
    """Refuse a cluster id that the FORMAT file could not hold on one line."""
    encoded = cluster_id.encode("utf-8", errors="replace")
    if not cluster_id or len(encoded) > CLUSTER_ID_BYTES_MAX or not cluster_id.isprintable():
        raise ValueError(
            f"cluster id {cluster_id!r} must be 1..{CLUSTER_ID_BYTES_MAX} bytes of printable text"
        )


def _format_text(cluster_id: str) -> bytes:
    return f"paxfs-metaserver-storage {STORAGE_FORMAT_VERSION}\ncluster {cluster_id}\n".encode()


def _shown(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:_NAMES_SHOWN_MAX])
    return shown + (", ..." if len(names) > _NAMES_SHOWN_MAX else "")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (a regular file may take less at once)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class DataDirectory:
    """An open, locked, verified data directory; all file access goes through ``dir_fd``.

    Thread-safe: the log writer thread and the snapshot thread share it.
    """

    def __init__(self, path: Path, dir_fd: int, lock_fd: int, fsync: Sync) -> None:
        self.path = path
        self.dir_fd = dir_fd
        self._lock_fd = lock_fd
        self._fsync = fsync

    @classmethod
    def open(
        cls, path: Path, cluster_id: str, *, create_if_empty: bool, fsync: Sync
    ) -> DataDirectory:
        """Lock ``path`` and check (or, if empty, create) its FORMAT file.

        Raises :class:`StorageFormatError` (not ours, unknown format), :class:`ClusterMismatch`,
        :class:`StorageLocked`; the lock is released again on any failure.
        """
        check_cluster_id(cluster_id)
        if not path.exists():
            if not create_if_empty:
                raise StorageFormatError(f"{path} does not exist")
            path.mkdir(parents=True)
            parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fsync(parent_fd)
            finally:
                os.close(parent_fd)
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        lock_fd = -1
        try:
            cls._refuse_foreign(path, os.listdir(dir_fd))
            lock_fd = os.open(
                LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
            )
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageLocked(
                    f"{path} is in use by another metaserver (lock held on {LOCK_FILE_NAME})"
                ) from None
            directory = cls(path, dir_fd, lock_fd, fsync)
            directory._check_or_create_format(cluster_id, create_if_empty)
            return directory
        except BaseException:
            if lock_fd >= 0:
                os.close(lock_fd)
            os.close(dir_fd)
            raise

    @staticmethod
    def _refuse_foreign(path: Path, names: list[str]) -> None:
        foreign = [name for name in names if not _is_ours(name)]
        if foreign:
            raise StorageFormatError(
                f"{path} is not paxfs metaserver storage: it holds {_shown(foreign)}"
            )
        if FORMAT_FILE_NAME not in names and any(
            parse_segment_name(name.removesuffix(TEMP_SUFFIX)) is not None
            or parse_snapshot_name(name.removesuffix(TEMP_SUFFIX)) is not None
            for name in names
        ):
            raise StorageFormatError(
                f"{path} holds log or snapshot files but no {FORMAT_FILE_NAME} file"
            )

    def _check_or_create_format(self, cluster_id: str, create_if_empty: bool) -> None:
        try:
            fd = os.open(FORMAT_FILE_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except FileNotFoundError:
            if not create_if_empty:
                raise StorageFormatError(
                    f"{self.path} holds no metaserver storage (and creation was not asked for)"
                ) from None
            self.write_file_atomically(FORMAT_FILE_NAME, [_format_text(cluster_id)])
            _log.info("created metaserver storage %s for cluster %s", self.path, cluster_id)
            return
        try:
            content = os.read(fd, 4096)
        finally:
            os.close(fd)
        lines = content.decode("utf-8", errors="replace").split("\n")
        format_match = _FORMAT_LINE.match(lines[0])
        if not format_match:
            raise StorageFormatError(
                f"{self.path} is not paxfs metaserver storage: {FORMAT_FILE_NAME} reads "
                f"{lines[0][:60]!r}"
            )
        version = int(format_match.group(1))
        if version != STORAGE_FORMAT_VERSION:
            raise StorageFormatError(
                f"{self.path}: metaserver storage format {version}; this paxfs knows format "
                f"{STORAGE_FORMAT_VERSION} only"
            )
        cluster_match = _CLUSTER_LINE.match(lines[1]) if len(lines) > 2 else None
        if not cluster_match or lines[2:] != [""]:
            raise StorageFormatError(f"{self.path}: {FORMAT_FILE_NAME} is damaged: {content!r}")
        if cluster_match.group(1) != cluster_id:
            raise ClusterMismatch(
                f"{self.path} belongs to cluster {cluster_match.group(1)!r}, not {cluster_id!r}"
            )

    def names(self) -> list[str]:
        """The file names in the directory."""
        return os.listdir(self.dir_fd)

    def sync(self) -> None:
        """fsync the directory: makes created, renamed and removed names durable."""
        self._fsync(self.dir_fd)

    def write_file_atomically(self, name: str, parts: list[bytes]) -> None:
        """Write ``name`` whole or not at all: temp file, fsync, rename, directory fsync."""
        temp_name = name + TEMP_SUFFIX
        fd = os.open(
            temp_name,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o644,
            dir_fd=self.dir_fd,
        )
        try:
            for part in parts:
                write_all(fd, part)
            self._fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp_name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self.sync()

    def remove(self, names: list[str]) -> None:
        """Unlink ``names`` (already gone is fine) and fsync the directory once if any."""
        for name in names:
            try:
                os.unlink(name, dir_fd=self.dir_fd)
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise
        if names:
            self.sync()

    def close(self) -> None:
        """Release the lock and the descriptors."""
        os.close(self._lock_fd)
        os.close(self.dir_fd)
