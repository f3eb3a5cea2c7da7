"""The client's data-path calls to the metaserver leader: where chunks live, with tokens.

The namespace (:mod:`wire.namespace_ops`) knows each file's chunks and versions;
the leader's cluster manager knows, as soft state, which dataservers hold which
replica.  These calls join the two and sign the chunk access tokens a client
needs to talk to dataservers (:mod:`wire.tokens`).

**Writing a chunk.**  :data:`OPEN_FOR_WRITE` carries the namespace op
``OpenChunk`` inside an ordinary :class:`~wire.namespace_ops.MutationCall` (so a
retry is exactly-once like any mutation).  The namespace gives the chunk a new
version (a new chunk id at version 1 for a hole); the leader picks the ordered
replica chain and signs a write token.  ``base_version`` is the version the
chain's replicas hold now (None for a new chunk): each replica derives the new
version from it (see :mod:`wire.dataserver_ops`).  ``exclude`` names dataservers
the client found failed in a pipeline; they are left out of the chain.  When
the client has written and synced, it publishes the result with the namespace
op ``CommitWrite`` (through :data:`wire.namespace_ops.COMMIT_WRITE`).

**Reading.**  :data:`LOCATE` carries a namespace ``GetChunks`` query and answers
the same page with, for each chunk, its live replicas (least loaded first) and a
read token.

**Space.**  :data:`SPACE` sums what live dataservers report, for ``statfs``.
"""

from __future__ import annotations

from dataclasses import dataclass

from wire.ids import ChunkId, ChunkVersion
from wire.namespace_ops import MutationCall, QueryCall
from wire.schema import Method, message
from wire.tokens import ChunkToken


@message("data.open_for_write")
@dataclass(frozen=True)
class OpenForWrite:
    call: MutationCall
    exclude: tuple[str, ...] = ()


@message("data.writable_chunk")
@dataclass(frozen=True)
class WritableChunk:
    """A chunk version open for writing and the chain that will store it.

    ``replicas`` may be shorter than ``goal`` when too few dataservers are
    live; ``length`` is the committed length (replicas drop bytes past it when
    they derive the new version).
    """

    index: int
    chunk: ChunkId
    version: ChunkVersion
    base_version: ChunkVersion | None
    length: int
    goal: int
    compress: bool
    replicas: tuple[str, ...]
    token: ChunkToken


@message("data.locate")
@dataclass(frozen=True)
class Locate:
    call: QueryCall


@message("data.located_chunk")
@dataclass(frozen=True)
class LocatedChunk:
    index: int
    chunk: ChunkId
    version: ChunkVersion
    length: int
    replicas: tuple[str, ...]
    token: ChunkToken


@message("data.located")
@dataclass(frozen=True)
class Located:
    """One page of a file's chunks (holes absent), as ``GetChunks`` pages them."""

    size: int
    chunk_size: int
    chunks: tuple[LocatedChunk, ...]
    more: bool


@message("data.report_bad_replica")
@dataclass(frozen=True)
class ReportBadReplica:
    """A client read a replica that failed its checksums (or would not serve)."""

    chunk: ChunkId
    version: ChunkVersion
    dataserver: str
    reason: str


@message("data.reported")
@dataclass(frozen=True)
class Reported:
    pass


@message("data.space_request")
@dataclass(frozen=True)
class SpaceRequest:
    pass


@message("data.space")
@dataclass(frozen=True)
class Space:
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    live_dataservers: int


OPEN_FOR_WRITE = Method("data.open_for_write", OpenForWrite, WritableChunk)
LOCATE = Method("data.locate", Locate, Located)
REPORT_BAD_REPLICA = Method("data.report_bad_replica", ReportBadReplica, Reported)
SPACE = Method("data.space", SpaceRequest, Space)
