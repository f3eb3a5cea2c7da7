"""Encode Paxos messages and records exactly as the metaserver will: with ``wire.schema``.

Every message crossing the simulated network and every record on the simulated disk
goes through msgpack and back, so a type the generic codec cannot carry fails here
first, and no object is ever shared between two simulated replicas.
"""

from __future__ import annotations

from typing import Any

import msgpack

from metaserver.paxos import ALL_MESSAGE_TYPES, ALL_RECORD_TYPES, Message, Record
from wire import schema

# Exactly what the metaserver registers (metaserver/codec.py), under the same names.
for _cls in ALL_MESSAGE_TYPES + ALL_RECORD_TYPES:
    schema.register_message(f"paxos.{_cls.__name__}", _cls)


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
