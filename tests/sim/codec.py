"""Encode Paxos messages and records exactly as the metaserver will: with ``wire.schema``.

Every message crossing the simulated network and every record on the simulated disk
goes through msgpack and back, so a type the generic codec cannot carry fails here
first, and no object is ever shared between two simulated replicas.
"""

from __future__ import annotations

from typing import Any

import msgpack

import metaserver.codec  # noqa: F401  (registers the core's types, as the metaserver does)
from metaserver.paxos import ALL_MESSAGE_TYPES, ALL_RECORD_TYPES, Message, Record
from wire import schema

# The registrations come from metaserver.codec itself, not a copy: the schema encodes a
# registered dataclass nested in a message tagged and any other positionally, so a copy
# that missed one (SnapshotMeta did) made a seed's bytes depend on whether something
# else in the process had imported metaserver.codec first.


def _pack(value: Any) -> bytes:
    return msgpack.packb(schema.encode_tagged(value), use_bin_type=True)


def _unpack(data: bytes, allowed: tuple[type, ...]) -> Any:
    return schema.decode_tagged(msgpack.unpackb(data, raw=False, strict_map_key=False), allowed)


def encode_message(message: Message) -> bytes:
    return _pack(message)


def decode_message(data: bytes) -> Message:
    message: Message = _unpack(data, ALL_MESSAGE_TYPES)
    return message


def encode_record(record: Record) -> bytes:
    return _pack(record)


def decode_record(data: bytes) -> Record:
    record: Record = _unpack(data, ALL_RECORD_TYPES)
    return record
