"""Bytes of everything a metaserver logs, snapshots or sends to its peers, via :mod:`wire.schema`.

The consensus core imports nothing of the project, so its frozen dataclasses are
registered with the wire schema here, each under ``paxos.<ClassName>``.  Besides the
core's records, the log holds records of the replica itself (:class:`HeardFromRecord`),
and the replicated log holds, beside namespace commands, *group commands*
(:class:`SetMetaserverAddress`): the address book of replicas that joined after the
group was founded.  Group commands are told from namespace commands by their first byte,
``0xc1``, which msgpack never produces.

A snapshot blob holds the core's :class:`SnapshotMeta`, the namespace's own snapshot
bytes and the :class:`GroupState`.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass
from typing import Any

import msgpack

from metaserver.paxos import ALL_MESSAGE_TYPES, ALL_RECORD_TYPES, Record, SnapshotMeta
from wire import schema
from wire.admin_ops import MemberAddress

for _cls in (*ALL_MESSAGE_TYPES, *ALL_RECORD_TYPES, SnapshotMeta):
    schema.register_message(f"paxos.{_cls.__name__}", _cls)

PaxosMessage = typing.Union[ALL_MESSAGE_TYPES]  # type: ignore[valid-type]  # noqa: UP007
SNAPSHOT_FORMAT = "paxfs-metaserver-snapshot/2"
MESSAGES_PER_BATCH_MAX = 4096
GROUP_COMMAND_PREFIX = b"\xc1"
"""First byte of a group command in the log; msgpack never starts an object with it."""


@schema.message("metaserver.paxos_batch")
@dataclass(frozen=True)
class PaxosBatch:
    """Consensus messages from one metaserver to another (declared here, not in
    ``wire/``, because only metaservers speak it and ``wire`` may not import the core)."""

    sender: int
    messages: tuple[PaxosMessage, ...]  # type: ignore[valid-type]


PAXOS_DELIVER = schema.Method("metaserver.paxos_deliver", PaxosBatch, type(None), one_way=True)
"""One-way: the core's own messages are the acknowledgements (see :mod:`metaserver.peers`)."""


@schema.message("metaserver.heard_from")
@dataclass(frozen=True)
class HeardFromRecord:
    """This replica has taken Paxos messages from these metaservers (a local log record).

    Written and fsynced before the first message of a sender is stepped, so that a
    replica whose disk was wiped can learn from its peers that it once took part and
    must not found or join again under the same id (its forgotten promises and votes
    could otherwise let two values be chosen in one slot).
    """

    nodes: tuple[int, ...]


LocalRecord = HeardFromRecord
LOCAL_RECORD_TYPES: tuple[type, ...] = (HeardFromRecord,)


@schema.message("metaserver.set_address")
@dataclass(frozen=True)
class SetMetaserverAddress:
    """Group command: metaserver ``node`` serves at ``address`` (a replica being added)."""

    node: int
    address: str


GroupCommand = SetMetaserverAddress
GROUP_COMMAND_TYPES: tuple[type, ...] = (SetMetaserverAddress,)


@schema.message("metaserver.group_state")
@dataclass(frozen=True)
class GroupState:
    """Replicated state of the group beside the namespace: addresses of added replicas."""

    addresses: tuple[MemberAddress, ...] = ()

    def address_map(self) -> dict[int, str]:
        return {entry.node_id: entry.address for entry in self.addresses}


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_record(record: Record | LocalRecord) -> bytes:
    return _pack(schema.encode_tagged(record))


def decode_record(data: bytes) -> Record | LocalRecord:
    """A record read back from our own log (corruption was excluded by its checksum)."""
    try:
        value = _unpack(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError) as error:
        raise schema.SchemaError(f"log record is not msgpack: {error}") from None
    record: Record | LocalRecord = schema.decode_tagged(
        value, (*ALL_RECORD_TYPES, *LOCAL_RECORD_TYPES)
    )
    return record


def is_group_command(data: bytes) -> bool:
    return data[:1] == GROUP_COMMAND_PREFIX


def encode_group_command(command: GroupCommand) -> bytes:
    return GROUP_COMMAND_PREFIX + _pack(schema.encode_tagged(command))


def decode_group_command(data: bytes) -> GroupCommand:
    """Inverse of :func:`encode_group_command`; SchemaError for anything else."""
    if not is_group_command(data):
        raise schema.SchemaError("not a group command")
    try:
        value = _unpack(data[1:])
    except (ValueError, msgpack.ExtraData, msgpack.FormatError) as error:
        raise schema.SchemaError(f"group command is not msgpack: {error}") from None
    command: GroupCommand = schema.decode_tagged(value, GROUP_COMMAND_TYPES)
    return command


def encode_snapshot(meta: SnapshotMeta, namespace_bytes: bytes, group: GroupState) -> bytes:
    """One snapshot blob: format tag, the core's metadata, the namespace, the group state."""
    return _pack([SNAPSHOT_FORMAT, schema.encode(meta), namespace_bytes, schema.encode(group)])


def decode_snapshot(data: bytes) -> tuple[SnapshotMeta, bytes, GroupState]:
    """Inverse of :func:`encode_snapshot`; SchemaError for anything else."""
    try:
        value = _unpack(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError) as error:
        raise schema.SchemaError(f"snapshot is not msgpack: {error}") from None
    if not (isinstance(value, list) and value and isinstance(value[0], str)):
        raise schema.SchemaError("not a paxfs metaserver snapshot")
    if value[0] != SNAPSHOT_FORMAT:
        raise schema.SchemaError(
            f"metaserver snapshot format {value[0][:60]!r}; this paxfs knows {SNAPSHOT_FORMAT!r}"
        )
    if len(value) != 4 or not isinstance(value[2], bytes):
        raise schema.SchemaError("damaged metaserver snapshot")
    meta: SnapshotMeta = schema.decode(SnapshotMeta, value[1], "snapshot meta")
    group: GroupState = schema.decode(GroupState, value[3], "snapshot group state")
    return meta, value[2], group


def cluster_id_from_key(key: bytes) -> str:
    """A stable, non-secret name of the cluster derived from its key.

    Stored in each data directory so that a directory of another cluster is refused.
    """
    return "paxfs-" + hashlib.sha256(b"paxfs-cluster-id|" + key).hexdigest()[:24]
