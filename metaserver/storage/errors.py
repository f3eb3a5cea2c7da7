"""Errors raised by the metaserver storage; all derive from :class:`StorageError`.

Every message names the data directory or file concerned, so that the process can print it
as the one line an operator reads before the exit.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error the metaserver storage raises on purpose."""


class StorageFormatError(StorageError):
    """The directory, or a file in it, is not metaserver storage of a format we know."""


class ClusterMismatch(StorageError):
    """The directory belongs to another cluster than the one the caller names."""


class StorageLocked(StorageError):
    """Another open storage (in this or another process) holds the directory's lock."""


class StorageCorruption(StorageError):
    """Durable data is damaged beyond a torn tail: refuse to start, repair from peers.

    Never answered by truncation: the records after the damage were acknowledged.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class FatalStorageError(StorageError):
    """A write or fsync failed: what reached the disk is unknown, so the process must stop.

    A failed fsync is never retried: the kernel may have dropped the dirty pages and a later
    fsync could succeed without them (the 2018 "fsyncgate" lesson, PITFALLS.md).
    """


class StorageClosed(StorageError):
    """The storage was used after it was closed."""
