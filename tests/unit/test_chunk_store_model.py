"""Random operation sequences on one replica, checked against a bytearray model.

The model keeps two images: ``current`` (what reads must return) and ``durable`` (what must
survive a crash: the state at the last sync). Crashes are simulated in-process by closing the
store without syncing, optionally after a failpoint aborted a sync half-way.

Prints ``PAXFS_SEED=<n>``; rerun with that environment variable to replay the same examples.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, seed, settings
from hypothesis import strategies as st

from dataserver.chunk_store import BLOCK_SIZE_BYTES, ChunkStore
from wire.ids import ChunkId, ChunkVersion

B = BLOCK_SIZE_BYTES
CHUNK = 8 * B
CHUNK_ID = ChunkId(42)
SEED = int(os.environ.get("PAXFS_SEED") or random.SystemRandom().randrange(2**32))
MAX_EXAMPLES = 120
OPS_MIN = 8
OPS_MAX = 40


class SimulatedCrash(Exception):
    """Raised by the failpoint to abandon a sync half-way."""


def _offsets() -> st.SearchStrategy[int]:
    near_boundaries = st.builds(
        lambda block, delta: min(max(block * B + delta, 0), CHUNK - 1),
        st.integers(0, CHUNK // B),
        st.integers(-3, 3),
    )
    return st.one_of(st.integers(0, CHUNK - 1), near_boundaries)


Op = tuple[Any, ...]
"""An operation: its kind, then that kind's arguments."""

_BY_KIND: dict[str, st.SearchStrategy[Op]] = {
    "write": st.tuples(
        st.just("write"),
        _offsets(),
        st.integers(1, 3 * B),
        st.integers(0, 2**32),
        st.booleans(),
    ),
    "truncate": st.tuples(st.just("truncate"), st.one_of(_offsets(), st.just(CHUNK), st.just(0))),
    "read": st.tuples(st.just("read"), _offsets(), st.integers(0, 3 * B)),
    "sync": st.tuples(st.just("sync")),
    "bump": st.tuples(st.just("bump"), st.integers(1, 3)),
    "reopen": st.tuples(st.just("reopen")),
    "crash": st.tuples(st.just("crash")),
    "crash_in_sync": st.tuples(
        st.just("crash_in_sync"), st.sampled_from(["sync:data_synced", "sync:index_written"])
    ),
}
# Repeated kinds weigh writes, syncs and crashes up: the interesting histories are
# "write, sync, overwrite, crash", which a uniform choice among eight kinds rarely draws.
_KIND_WEIGHTS = ["write"] * 4 + ["sync"] * 2 + ["crash", "crash_in_sync"] * 2
_KIND_WEIGHTS += ["truncate", "read", "bump", "reopen"]
_ops = st.sampled_from(_KIND_WEIGHTS).flatmap(_BY_KIND.__getitem__)


def _data(data_seed: int, size: int, compressible: bool) -> bytes:
    rng = random.Random(data_seed)
    if compressible:
        return bytes(rng.choice(b"ab\x00") for _ in range(min(size, 64))) * (size // 64) + bytes(
            size % 64
        )
    return rng.randbytes(size)


@dataclass
class _Harness:
    directory: str
    armed: list[str] = field(default_factory=list)

    def failpoint(self, point: str) -> None:
        if self.armed and self.armed[0] == point:
            self.armed.clear()
            raise SimulatedCrash(point)

    def open(self) -> ChunkStore:
        return ChunkStore(self.directory, chunk_size_bytes=CHUNK, failpoint=self.failpoint)


@seed(SEED)
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
@given(compressed=st.booleans(), ops=st.lists(_ops, min_size=OPS_MIN, max_size=OPS_MAX))
def test_random_operations_match_the_model(compressed: bool, ops: list[Op]) -> None:
    print(f"PAXFS_SEED={SEED}")
    with tempfile.TemporaryDirectory() as directory:
        harness = _Harness(directory)
        store = harness.open()
        version = ChunkVersion(1)
        store.create(CHUNK_ID, version, compressed=compressed)
        current = bytearray()
        durable = bytearray()
        try:
            for op in ops:
                kind = op[0]
                if kind == "write":
                    _, offset, size, data_seed, compressible = op
                    size = min(size, CHUNK - offset)
                    data = _data(data_seed, size, compressible)
                    store.write(CHUNK_ID, version, offset, data)
                    if len(current) < offset:
                        current.extend(bytes(offset - len(current)))
                    current[offset : offset + size] = data
                elif kind == "truncate":
                    store.truncate(CHUNK_ID, version, op[1])
                    del current[op[1] :]
                    current.extend(bytes(op[1] - len(current)))
                elif kind == "read":
                    _, offset, size = op
                    got = store.read(CHUNK_ID, version, offset, size)
                    assert got == bytes(current[offset : offset + size])
                elif kind == "sync":
                    store.sync(CHUNK_ID, version)
                    durable = bytearray(current)
                elif kind == "bump":
                    new_version = ChunkVersion(version + op[1])
                    store.bump_version(CHUNK_ID, version, new_version)
                    version = new_version
                elif kind == "reopen":
                    store.close()
                    store = harness.open()
                    durable = bytearray(current)
                elif kind == "crash":
                    store.close(sync=False)
                    store = harness.open()
                    current = bytearray(durable)
                elif kind == "crash_in_sync":
                    harness.armed[:] = [op[1]]
                    try:
                        store.sync(CHUNK_ID, version)
                    except SimulatedCrash:
                        if op[1] == "sync:index_written":
                            durable = bytearray(current)
                    else:
                        durable = bytearray(current)
                    harness.armed.clear()
                    store.close(sync=False)
                    store = harness.open()
                    current = bytearray(durable)
                assert store.stat(CHUNK_ID).length_bytes == len(current), op
                assert store.read(CHUNK_ID, version, 0, CHUNK) == bytes(current), op
            assert store.verify(CHUNK_ID, version) == []
        finally:
            store.close()
