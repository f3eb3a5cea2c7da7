"""The dataserver's data directory: its identity file and the chunk store beneath it.

Layout of ``DIR``::

    DIR/DATASERVER     "paxfs-dataserver 1\\nid <16 hex digits>\\n": format and stable id
    DIR/chunks/        the chunk store (with its own FORMAT file, see dataserver.chunk_store)

The id is a random 63-bit number drawn at the first start and kept for the life of the
directory, so the metaserver recognises the same replicas after a restart or an address
change (HDFS's datanode UUID).  Drawing it locally, rather than having the metaserver assign
it, lets a dataserver start, serve and report without a reachable leader.  A directory of
another format, or a non-empty directory that is not ours, is refused with one clear line.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

from wire.ids import DataserverId

DATA_DIR_FORMAT = 1
IDENTITY_FILE_NAME = "DATASERVER"
CHUNKS_DIR_NAME = "chunks"
_IDENTITY_TEMP_NAME = "DATASERVER.tmp"
_IDENTITY = re.compile(r"paxfs-dataserver (\d+)\nid ([0-9a-f]{16})\n\Z")
_TOLERATED_NAMES = frozenset({"lost+found", _IDENTITY_TEMP_NAME})
_ID_BITS = 63


class DataDirError(Exception):
    """The data directory cannot be used; the message is one line for the operator."""


@dataclass(frozen=True)
class DataDir:
    path: str
    dataserver_id: DataserverId

    @property
    def chunks_path(self) -> str:
        return os.path.join(self.path, CHUNKS_DIR_NAME)


def open_data_dir(path: str) -> DataDir:
    """Check (or on first use create) the data directory and return its identity."""
    if not path:
        raise DataDirError("no data directory given ([dataserver] data_dir or --data)")
    try:
        os.makedirs(path, exist_ok=True)
        names = set(os.listdir(path))
    except OSError as error:
        raise DataDirError(f"cannot use data directory {path}: {error.strerror}") from None
    identity_path = os.path.join(path, IDENTITY_FILE_NAME)
    if IDENTITY_FILE_NAME not in names:
        if names - _TOLERATED_NAMES:
            raise DataDirError(
                f"{path} is not a paxfs dataserver directory: it has no {IDENTITY_FILE_NAME}"
                " file and is not empty"
            )
        _write_identity(path, DataserverId(_new_id()))
    try:
        with open(identity_path, encoding="ascii", errors="replace") as handle:
            text = handle.read(256)
    except OSError as error:
        raise DataDirError(f"cannot read {identity_path}: {error.strerror}") from None
    match = _IDENTITY.match(text)
    if match is None:
        raise DataDirError(f"{identity_path} is not a paxfs dataserver identity: {text[:64]!r}")
    found = int(match.group(1))
    if found != DATA_DIR_FORMAT:
        raise DataDirError(
            f"{path} holds dataserver format {found}; this paxfs knows format {DATA_DIR_FORMAT}"
        )
    os.makedirs(os.path.join(path, CHUNKS_DIR_NAME), exist_ok=True)
    return DataDir(path, DataserverId(int(match.group(2), 16)))


def _new_id() -> int:
    return secrets.randbits(_ID_BITS) or 1


def _write_identity(path: str, dataserver_id: DataserverId) -> None:
    """Write the identity file atomically and durably (temp file, fsync, rename, dir fsync)."""
    temp_path = os.path.join(path, _IDENTITY_TEMP_NAME)
    content = f"paxfs-dataserver {DATA_DIR_FORMAT}\nid {dataserver_id:016x}\n".encode("ascii")
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp_path, os.path.join(path, IDENTITY_FILE_NAME))
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
