"""Background scrubber: re-verify every replica's checksums at a bounded rate.

Bit rot in a replica nobody reads would otherwise go unnoticed until the other replicas are
lost too (HDFS's block scanner, MooseFS's chunk tester).  The scrubber walks the replicas,
least recently modified first, verifies each whole replica, and then sleeps as long as
reading it should take at ``rate_mib_s``, so the average rate stays under the limit.  A bad
replica is recorded by :class:`ReplicaOps` and reported to the metaserver at once.
A rate of 0 disables the scrubber.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from dataserver.chunk_store import ChunkNotFound, StaleVersion
from dataserver.replica_ops import ReplicaOps

log = logging.getLogger("dataserver.scrubber")

PASS_PAUSE_S = 60.0
"""Pause between two passes over the whole store (and when it is empty)."""
MIB = 1024 * 1024


async def scrub_forever(ops: ReplicaOps, rate_mib_s: float, on_corrupt: Callable[[], None]) -> None:
    """Scrub passes until cancelled; ``on_corrupt`` is called after each bad replica found."""
    if rate_mib_s <= 0:
        log.info("scrubber disabled")
        return
    while True:
        await scrub_pass(ops, rate_mib_s, on_corrupt)
        await trio.sleep(PASS_PAUSE_S)


async def scrub_pass(ops: ReplicaOps, rate_mib_s: float, on_corrupt: Callable[[], None]) -> int:
    """Verify every replica once; return how many were found bad."""
    replicas = await trio.to_thread.run_sync(ops.store.list_replicas)
    replicas.sort(key=lambda info: info.mtime_ns)
    bad_count = 0
    for info in replicas:
        if info.damage is not None or ops.is_corrupt(info.chunk_id, info.version):
            continue
        try:
            bad = await trio.to_thread.run_sync(ops.verify, info.chunk_id, info.version)
        except (ChunkNotFound, StaleVersion):
            continue  # deleted or given a new version meanwhile
        if bad:
            bad_count += 1
            on_corrupt()
        await trio.sleep(info.disk_bytes / (rate_mib_s * MIB))
    return bad_count
