"""Bytes of the Paxos core's records, messages and snapshots, via :mod:`wire.schema`.

The consensus core imports nothing of the project, so its frozen dataclasses are
registered with the wire schema here, each under ``paxos.<ClassName>``.  Records
become log payloads, messages travel between metaservers in :class:`PaxosBatch`,
and a snapshot file holds the core's :class:`SnapshotMeta` beside the namespace's
own snapshot bytes.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass
from typing import Any

import msgpack

from metaserver.paxos import ALL_MESSAGE_TYPES, ALL_RECORD_TYPES, Record, SnapshotMeta
from wire import schema

for _cls in (*ALL_MESSAGE_TYPES, *ALL_RECORD_TYPES, SnapshotMeta):
    schema.register_message(f"paxos.{_cls.__name__}", _cls)

PaxosMessage = typing.Union[ALL_MESSAGE_TYPES]  # type: ignore[valid-type]  # noqa: UP007
SNAPSHOT_FORMAT = "paxfs-metaserver-snapshot/1"
MESSAGES_PER_BATCH_MAX = 4096


@schema.message("metaserver.paxos_batch")
@dataclass(frozen=True)
class PaxosBatch:
    """Consensus messages from one metaserver to another (declared here, not in
    ``wire/``, because only metaservers speak it and ``wire`` may not import the core)."""

    sender: int
    messages: tuple[PaxosMessage, ...]  # type: ignore[valid-type]


@schema.message("metaserver.paxos_batch_ack")
@dataclass(frozen=True)
class PaxosBatchAck:
    accepted: int


PAXOS_DELIVER = schema.Method("metaserver.paxos_deliver", PaxosBatch, PaxosBatchAck)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_record(record: Record) -> bytes:
    return _pack(schema.encode_tagged(record))


def decode_record(data: bytes) -> Record:
    """A record read back from our own log (corruption was excluded by its checksum)."""
    record: Record = schema.decode_tagged(_unpack(data), ALL_RECORD_TYPES)
    return record


def encode_snapshot(meta: SnapshotMeta, namespace_bytes: bytes) -> bytes:
    """One snapshot blob: format tag, the core's metadata, the namespace snapshot."""
    return _pack([SNAPSHOT_FORMAT, schema.encode(meta), namespace_bytes])


def decode_snapshot(data: bytes) -> tuple[SnapshotMeta, bytes]:
    """Inverse of :func:`encode_snapshot`; SchemaError for anything else."""
    try:
        value = _unpack(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError) as error:
        raise schema.SchemaError(f"snapshot is not msgpack: {error}") from None
    if not (isinstance(value, list) and len(value) == 3 and value[0] == SNAPSHOT_FORMAT):
        raise schema.SchemaError("not a paxfs metaserver snapshot (unknown format)")
    if not isinstance(value[2], bytes):
        raise schema.SchemaError("snapshot without namespace bytes")
    meta: SnapshotMeta = schema.decode(SnapshotMeta, value[1], "snapshot meta")
    return meta, value[2]


def cluster_id_from_key(key: bytes) -> str:
    """A stable, non-secret name of the cluster derived from its key.

    Stored in each data directory so that a directory of another cluster is refused.
    """
    return "paxfs-" + hashlib.sha256(b"paxfs-cluster-id|" + key).hexdigest()[:24]
