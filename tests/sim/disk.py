"""A simulated disk for one replica: an append-only record log and one snapshot.

Records are framed ``[length u32][crc32 u32][payload]`` with the checksum over length
and payload. Appends are volatile until ``sync``. A crash keeps the synced bytes plus
a random prefix of the unsynced ones, so the tail may end in a torn record (cut on
restart) or hold complete records that were never synced (harmless: persisting more
than asked is safe). A flipped bit inside a synced record that is not the last one is
corruption: reading refuses loudly instead of truncating (PITFALLS.md).
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass

from metaserver.paxos import Record, SnapshotMeta
from tests.sim.codec import decode_record, encode_record

_HEADER = struct.Struct("<II")


class DiskCorruption(Exception):
    """A checksum failed before the last record: the log cannot be trusted."""


@dataclass
class LoadedDisk:
    snapshot: SnapshotMeta | None
    snapshot_data: bytes
    records: list[Record]
    torn_tail: bool


def _frame(record: Record) -> bytes:
    payload = encode_record(record)
    length = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<I", length)))
    return _HEADER.pack(length, crc) + payload


class SimDisk:
    def __init__(self) -> None:
        self._synced = bytearray()
        self._unsynced = bytearray()
        self._record_offsets: list[int] = []
        """Start offsets of synced records, for bit flips."""
        self._pending_offsets: list[int] = []
        self.snapshot: SnapshotMeta | None = None
        self.snapshot_data = b""
        self.synced_records_total = 0

    def append(self, records: tuple[Record, ...]) -> None:
        for record in records:
            self._pending_offsets.append(len(self._synced) + len(self._unsynced))
            self._unsynced += _frame(record)

    def sync(self) -> None:
        self._synced += self._unsynced
        self._unsynced.clear()
        self._record_offsets.extend(self._pending_offsets)
        self.synced_records_total += len(self._pending_offsets)
        self._pending_offsets.clear()

    @property
    def has_unsynced(self) -> bool:
        return bool(self._unsynced)

    def crash(self, rng: random.Random) -> None:
        """Lose power: keep a random prefix of what was never synced."""
        if self._unsynced and rng.random() < 0.5:
            keep = rng.randrange(len(self._unsynced) + 1)
            self._synced += self._unsynced[:keep]
        self._unsynced.clear()
        self._pending_offsets.clear()

    def rewrite(self, records: tuple[Record, ...]) -> None:
        """Atomically replace the log (write a new file, fsync, rename, fsync the dir)."""
        assert not self._unsynced, "rewrite only with nothing pending"
        self._synced = bytearray()
        self._record_offsets = []
        for record in records:
            self._record_offsets.append(len(self._synced))
            self._synced += _frame(record)

    def save_snapshot(self, meta: SnapshotMeta, data: bytes) -> None:
        """Atomically and durably replace the snapshot."""
        self.snapshot = meta
        self.snapshot_data = data

    def flip_bit(self, rng: random.Random) -> bool:
        """Flip one payload bit of a synced record that has a successor."""
        candidates = self._record_offsets[:-1]
        if not candidates:
            return False
        start = rng.choice(candidates)
        length, _ = _HEADER.unpack_from(self._synced, start)
        if length == 0:
            return False
        position = start + _HEADER.size + rng.randrange(length)
        self._synced[position] ^= 1 << rng.randrange(8)
        return True

    def load(self) -> LoadedDisk:
        """Read the durable state back, cutting a torn tail and refusing corruption."""
        data = bytes(self._synced)
        records: list[Record] = []
        offsets: list[int] = []
        position = 0
        torn = False
        while position < len(data):
            if len(data) - position < _HEADER.size:
                torn = True
                break
            length, crc = _HEADER.unpack_from(data, position)
            end = position + _HEADER.size + length
            if end > len(data):
                torn = True
                break
            payload = data[position + _HEADER.size : end]
            if zlib.crc32(payload, zlib.crc32(struct.pack("<I", length))) != crc:
                if end == len(data):
                    torn = True
                    break
                raise DiskCorruption(f"checksum mismatch in the record at byte {position}")
            offsets.append(position)
            records.append(decode_record(payload))
            position = end
        if torn:
            del self._synced[position:]
        self._record_offsets = offsets
        return LoadedDisk(self.snapshot, self.snapshot_data, records, torn)
