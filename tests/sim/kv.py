"""The replicated state machine of the simulation: a key-value store with client sessions.

Commands are ``msgpack([client, op_id, key, value])`` puts. Like the metaserver's
session table, the store applies a client's command only if its ``op_id`` is newer
than the last one applied for that client, so a retried or duplicated command takes
effect once. A running digest over every applied slot lets the checker compare
replicas slot by slot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack

from metaserver.paxos import CommittedEntry


@dataclass(frozen=True)
class PutCommand:
    client: int
    op_id: int
    key: str
    value: int

    def encode(self) -> bytes:
        return msgpack.packb([self.client, self.op_id, self.key, self.value])

    @staticmethod
    def decode(data: bytes) -> PutCommand:
        client, op_id, key, value = msgpack.unpackb(data)
        return PutCommand(client, op_id, key, value)


class KvState:
    def __init__(self) -> None:
        self.index = 0
        self.digest = b"\0" * 16
        self.data: dict[str, int] = {}
        self.last_op: dict[int, int] = {}

    def apply(self, entry: CommittedEntry) -> list[PutCommand]:
        """Apply one committed slot; returns the commands it carried."""
        assert entry.slot == self.index + 1, f"applying slot {entry.slot} after {self.index}"
        hasher = hashlib.blake2b(self.digest, digest_size=16)
        hasher.update(entry.slot.to_bytes(8, "little"))
        hasher.update(bytes([entry.kind]))
        if entry.membership is not None:
            hasher.update(repr(entry.membership).encode())
        commands = []
        for raw in entry.commands:
            hasher.update(len(raw).to_bytes(4, "little"))
            hasher.update(raw)
            command = PutCommand.decode(raw)
            commands.append(command)
            if command.op_id > self.last_op.get(command.client, -1):
                self.last_op[command.client] = command.op_id
                self.data[command.key] = command.value
        self.digest = hasher.digest()
        self.index = entry.slot
        return commands

    def encode(self) -> bytes:
        return msgpack.packb(
            [self.index, self.digest, sorted(self.data.items()), sorted(self.last_op.items())]
        )

    @staticmethod
    def restore(data: bytes) -> KvState:
        state = KvState()
        if data:
            index, digest, items, last_op = msgpack.unpackb(data, strict_map_key=False)
            state.index = index
            state.digest = digest
            state.data = dict((key, value) for key, value in items)
            state.last_op = dict((client, op) for client, op in last_op)
        return state
