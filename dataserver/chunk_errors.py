"""Errors raised by the chunk store; all derive from :class:`ChunkStoreError`.

The dataserver maps them to wire errors: :class:`StaleVersion` and :class:`ChunkNotFound`
refuse a request, :class:`CorruptReplica` (and its subclass :class:`ChecksumError`) must be
reported to the metaserver so that it replaces the replica.
"""

from __future__ import annotations

from wire.ids import ChunkId, ChunkVersion


class ChunkStoreError(Exception):
    """Base of every error the chunk store raises on purpose."""


class StoreFormatError(ChunkStoreError):
    """The data directory, or a file in it, is not a paxfs chunk store of a known format."""


class StoreInUse(ChunkStoreError):
    """Another open store (in this or another process) holds the data directory."""


class InvalidRequest(ChunkStoreError, ValueError):
    """Arguments out of range: negative offsets, beyond the chunk size, a non-increasing version."""


class NoSpace(ChunkStoreError):
    """The disk, or the configured capacity cap, has no room for the write."""


class ReplicaBusy(ChunkStoreError):
    """The replica has changes not yet synced, so its file's own index does not show them:
    it is not handed to a local reader (see :meth:`ChunkStore.open_for_local_read`)."""


class ChunkNotFound(ChunkStoreError):
    """No replica of this chunk is stored here."""

    def __init__(self, chunk_id: ChunkId) -> None:
        super().__init__(f"chunk {chunk_id:#x} is not stored here")
        self.chunk_id = chunk_id


class ChunkExists(ChunkStoreError):
    """A replica of this chunk (of any version) is already stored here."""

    def __init__(self, chunk_id: ChunkId, version: ChunkVersion) -> None:
        super().__init__(f"chunk {chunk_id:#x} is already stored here at version {version}")
        self.chunk_id = chunk_id
        self.version = version


class StaleVersion(ChunkStoreError):
    """The request names a version other than the stored one; an old writer is refused."""

    def __init__(self, chunk_id: ChunkId, requested: ChunkVersion, stored: ChunkVersion) -> None:
        super().__init__(
            f"chunk {chunk_id:#x}: version {requested} requested, version {stored} stored"
        )
        self.chunk_id = chunk_id
        self.requested = requested
        self.stored = stored


class CorruptReplica(ChunkStoreError):
    """The replica cannot be trusted; report it to the metaserver and delete it."""

    def __init__(self, chunk_id: ChunkId, version: ChunkVersion, reason: str) -> None:
        super().__init__(f"chunk {chunk_id:#x} version {version} is corrupt: {reason}")
        self.chunk_id = chunk_id
        self.version = version
        self.reason = reason


class ChecksumError(CorruptReplica):
    """One block failed verification; ``block_index`` names it. Never returned as data."""

    def __init__(
        self, chunk_id: ChunkId, version: ChunkVersion, block_index: int, reason: str
    ) -> None:
        super().__init__(chunk_id, version, f"block {block_index}: {reason}")
        self.block_index = block_index
