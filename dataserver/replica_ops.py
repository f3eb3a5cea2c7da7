"""Replica operations as the protocol defines them, on top of the chunk store.

This is the thread side of the dataserver: every method is synchronous, thread-safe, and
called through ``trio.to_thread.run_sync``.  It adds to :class:`ChunkStore`:

* the version rules of :mod:`wire.dataserver_ops` (create a missing replica for a new
  chunk; derive version V from the stored base version by a rename; refuse the rest);
* the record of changes for the incremental chunk report (:class:`ReplicaChanges`);
* the record of replicas found corrupt, which are reported and never served.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from dataserver.chunk_store import (
    BLOCK_SIZE_BYTES,
    ChunkExists,
    ChunkNotFound,
    ChunkStore,
    CorruptReplica,
    RawBlock,
    ReplicaInfo,
    StaleVersion,
)
from wire.cluster_ops import INCREMENTAL_REPLICAS_MAX, ReplicaKey, ReplicaReport
from wire.framing import FileRange
from wire.ids import ChunkId, ChunkVersion
from wire.invariant import invariant

log = logging.getLogger(__name__)

PREPARE_ATTEMPTS_MAX = 3
"""Rounds of "look, then create or rename" before giving up: each lost race means another
request made the change we wanted, so the next look normally finds the right version."""
CORRUPT_REPORTS_PENDING_MAX = 1_000
"""Corrupt replicas waiting to be reported to the metaserver; beyond that the oldest are
dropped (they are still marked corrupt in the next full report)."""


T = TypeVar("T")


class VersionedRequest(Protocol):
    """What a mutating request says about the version it needs (the wire's write,
    truncate and sync requests all do; see :mod:`wire.dataserver_ops`)."""

    @property
    def chunk_id(self) -> ChunkId: ...
    @property
    def version(self) -> ChunkVersion: ...
    @property
    def base_version(self) -> ChunkVersion | None: ...
    @property
    def base_length_bytes(self) -> int | None: ...
    @property
    def compressed(self) -> bool: ...


class VersionRefused(Exception):
    """The stored replica cannot serve the requested version (see the module rules)."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class CorruptFinding:
    chunk_id: ChunkId
    version: ChunkVersion
    reporter: str
    reason: str


class ReplicaChanges:
    """Replicas added and removed since the last report taken; thread-safe.

    ``added`` is keyed by chunk id (the latest state wins); ``removed`` by (chunk, version).
    Adding back a version that was removed cancels the removal.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._added: OrderedDict[ChunkId, ReplicaReport] = OrderedDict()
        self._removed: OrderedDict[tuple[ChunkId, ChunkVersion], None] = OrderedDict()

    def add(self, report: ReplicaReport) -> None:
        with self._mutex:
            self._removed.pop((report.chunk_id, report.version), None)
            self._added[report.chunk_id] = report
            self._added.move_to_end(report.chunk_id)

    def remove(self, chunk_id: ChunkId, version: ChunkVersion) -> None:
        with self._mutex:
            added = self._added.get(chunk_id)
            if added is not None and added.version == version:
                del self._added[chunk_id]
            self._removed[(chunk_id, version)] = None

    def take(
        self, limit: int = INCREMENTAL_REPLICAS_MAX
    ) -> tuple[tuple[ReplicaKey, ...], tuple[ReplicaReport, ...]]:
        """Remove and return up to ``limit`` changes: (removed, added), oldest first."""
        with self._mutex:
            removed: list[ReplicaKey] = []
            while self._removed and len(removed) < limit:
                (chunk_id, version), _ = self._removed.popitem(last=False)
                removed.append(ReplicaKey(chunk_id, version))
            added: list[ReplicaReport] = []
            while self._added and len(removed) + len(added) < limit:
                _, report = self._added.popitem(last=False)
                added.append(report)
            return tuple(removed), tuple(added)

    def put_back(self, removed: tuple[ReplicaKey, ...], added: tuple[ReplicaReport, ...]) -> None:
        """Return changes whose report did not get through (newer changes win)."""
        with self._mutex:
            for key in removed:
                self._removed.setdefault((key.chunk_id, key.version), None)
            for report in added:
                self._added.setdefault(report.chunk_id, report)

    def clear(self) -> None:
        """Forget every change (a full report is about to describe the whole store)."""
        with self._mutex:
            self._added.clear()
            self._removed.clear()

    def __len__(self) -> int:
        with self._mutex:
            return len(self._added) + len(self._removed)


class ReplicaOps:
    """The protocol's replica operations over one :class:`ChunkStore` (thread side)."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.changes = ReplicaChanges()
        self._mutex = threading.Lock()
        self._corrupt: dict[tuple[ChunkId, ChunkVersion], str] = {}
        self._corrupt_pending: OrderedDict[tuple[ChunkId, ChunkVersion], CorruptFinding] = (
            OrderedDict()
        )
        for info in store.list_replicas():
            if info.damage is not None:
                self._note_corrupt(info.chunk_id, info.version, "scan", info.damage)

    # ---- versions ------------------------------------------------------------------------

    def prepare(
        self,
        chunk_id: ChunkId,
        version: ChunkVersion,
        base_version: ChunkVersion | None,
        compressed: bool,
        base_length_bytes: int | None = None,
    ) -> None:
        """Make the stored replica be ``(chunk_id, version)`` for a mutating request.

        Deriving ``version`` from the stored ``base_version`` drops the bytes past
        ``base_length_bytes`` (when given: the part of the base that is file data).
        Raises :class:`VersionRefused` when the stored replica is newer, or older but not
        the base (it missed updates), or missing while a base is named; and
        :class:`CorruptReplica` when it is known to be corrupt.
        """
        for _attempt in range(PREPARE_ATTEMPTS_MAX):
            try:
                stored = self.store.stat(chunk_id)
            except ChunkNotFound:
                if base_version is not None:
                    raise VersionRefused(
                        f"chunk {chunk_id:#x} is not stored here (expected version"
                        f" {base_version} to derive {version} from)",
                        missing=True,
                    ) from None
                try:
                    self.store.create(chunk_id, version, compressed=compressed)
                except ChunkExists:
                    continue
                self.changes.add(ReplicaReport(chunk_id, version, 0, False))
                return
            self._refuse_corrupt(stored)
            if stored.version == version:
                return
            if stored.version > version:
                raise VersionRefused(
                    f"chunk {chunk_id:#x}: version {version} is stale, version"
                    f" {stored.version} is stored"
                )
            if base_version != stored.version:
                raise VersionRefused(
                    f"chunk {chunk_id:#x}: version {stored.version} is stored, which is not the"
                    f" base {base_version} of version {version} (it missed updates)"
                )
            try:
                length = self.store.bump_version(
                    chunk_id, stored.version, version, keep_bytes=base_length_bytes
                )
            except (StaleVersion, ChunkNotFound):
                continue
            log.info("chunk %#x: version %d derived from %d", chunk_id, version, stored.version)
            self.changes.remove(chunk_id, stored.version)
            self.changes.add(ReplicaReport(chunk_id, version, length, False))
            return
        raise VersionRefused(f"chunk {chunk_id:#x}: version {version} kept changing under us")

    def _refuse_corrupt(self, info: ReplicaInfo) -> None:
        with self._mutex:
            reason = self._corrupt.get((info.chunk_id, info.version))
        if reason is None and info.damage is not None:
            reason = info.damage
        if reason is not None:
            raise CorruptReplica(info.chunk_id, info.version, reason)

    def check_readable(self, chunk_id: ChunkId, version: ChunkVersion) -> None:
        """Raise :class:`CorruptReplica` if this replica is known to be corrupt."""
        with self._mutex:
            reason = self._corrupt.get((chunk_id, version))
        if reason is not None:
            raise CorruptReplica(chunk_id, version, reason)

    # ---- mutations -----------------------------------------------------------------------

    def _mutate(
        self,
        request: VersionedRequest,
        step: str,
        operation: Callable[[], T],
    ) -> T:
        """Run ``operation`` on the replica at the request's version.

        The common case, the replica already at that version, costs the operation alone
        (one locked call into the store); only when the store refuses it as missing or of
        another version does :meth:`prepare` create or derive the replica, and the
        operation runs once more. A block found corrupt on the way marks the replica."""
        self.check_readable(request.chunk_id, request.version)
        try:
            try:
                return operation()
            except (ChunkNotFound, StaleVersion):
                self.prepare(
                    request.chunk_id,
                    request.version,
                    request.base_version,
                    request.compressed,
                    request.base_length_bytes,
                )
            return operation()
        except CorruptReplica as error:
            self._note_corrupt(request.chunk_id, request.version, step, error.reason)
            raise

    def write(
        self, request: VersionedRequest, offset: int, data: bytes | bytearray | memoryview
    ) -> int:
        """Write at ``offset``; return the replica's length after it."""
        return self._mutate(
            request,
            "write",
            lambda: self.store.write(request.chunk_id, request.version, offset, data),
        )

    def truncate(self, request: VersionedRequest, length_bytes: int) -> int:
        """Set the replica's length (durable after :meth:`sync`); return it."""
        return self._mutate(
            request,
            "truncate",
            lambda: self.store.truncate(request.chunk_id, request.version, length_bytes),
        )

    def sync(self, request: VersionedRequest) -> int:
        """fsync the replica; report its durable length; return it."""
        length = self._mutate(
            request, "sync", lambda: self.store.sync(request.chunk_id, request.version)
        )
        self.changes.add(ReplicaReport(request.chunk_id, request.version, length, False))
        return length

    def delete(self, chunk_id: ChunkId, version: ChunkVersion) -> bool:
        """Remove ``(chunk_id, version)``; False if that version is not stored."""
        try:
            self.store.delete(chunk_id, version)
        except (ChunkNotFound, StaleVersion):
            return False
        with self._mutex:
            self._corrupt.pop((chunk_id, version), None)
            self._corrupt_pending.pop((chunk_id, version), None)
        self.changes.remove(chunk_id, version)
        log.info("chunk %#x: deleted version %d", chunk_id, version)
        return True

    # ---- reads ---------------------------------------------------------------------------

    def read(
        self, chunk_id: ChunkId, version: ChunkVersion, offset: int, size: int
    ) -> tuple[FileRange | bytes | memoryview, int]:
        """(data to send, replica length); a checksum failure marks the replica corrupt."""
        self.check_readable(chunk_id, version)
        try:
            return self.store.read_to_send(chunk_id, version, offset, size)
        except CorruptReplica as error:
            self._note_corrupt(chunk_id, version, "read", error.reason)
            raise

    def open_for_local_read(self, chunk_id: ChunkId, version: ChunkVersion) -> tuple[int, str]:
        """(read-only descriptor, file name) for a reader on this host; never of a replica
        known to be corrupt (see :meth:`ChunkStore.open_for_local_read`)."""
        self.check_readable(chunk_id, version)
        return self.store.open_for_local_read(chunk_id, version)

    def info(self, chunk_id: ChunkId, version: ChunkVersion) -> ReplicaInfo:
        info = self.store.stat(chunk_id)
        if info.version != version:
            raise StaleVersion(chunk_id, version, info.version)
        return info

    def read_raw(
        self, chunk_id: ChunkId, version: ChunkVersion, first_block: int, block_count: int
    ) -> tuple[ReplicaInfo, list[RawBlock]]:
        """The replica's info and its present blocks in the range, as stored (verified)."""
        info = self.info(chunk_id, version)
        self._refuse_corrupt(info)
        block_total = info.capacity_bytes // BLOCK_SIZE_BYTES
        blocks: list[RawBlock] = []
        try:
            for block in range(first_block, min(first_block + block_count, block_total)):
                raw = self.store.read_raw_block(chunk_id, version, block)
                if raw is not None:
                    blocks.append(raw)
        except CorruptReplica as error:
            self._note_corrupt(chunk_id, version, "copy", error.reason)
            raise
        return info, blocks

    def verify(self, chunk_id: ChunkId, version: ChunkVersion) -> list[int]:
        """Bad blocks of the replica (the scrubber); a bad one is recorded as corrupt."""
        try:
            bad = self.store.verify(chunk_id, version)
        except CorruptReplica as error:
            self._note_corrupt(chunk_id, version, "scrubber", error.reason)
            return [-1]
        if bad:
            self._note_corrupt(chunk_id, version, "scrubber", f"bad blocks {bad[:8]}")
        return bad

    # ---- corruption ----------------------------------------------------------------------

    def _note_corrupt(
        self, chunk_id: ChunkId, version: ChunkVersion, reporter: str, reason: str
    ) -> None:
        key = (chunk_id, version)
        with self._mutex:
            if key in self._corrupt:
                return
            self._corrupt[key] = reason
            self._corrupt_pending[key] = CorruptFinding(chunk_id, version, reporter, reason)
            while len(self._corrupt_pending) > CORRUPT_REPORTS_PENDING_MAX:
                self._corrupt_pending.popitem(last=False)
        log.error("chunk %#x version %d is corrupt (%s): %s", chunk_id, version, reporter, reason)
        self.changes.add(ReplicaReport(chunk_id, version, 0, True))

    def is_corrupt(self, chunk_id: ChunkId, version: ChunkVersion) -> bool:
        with self._mutex:
            return (chunk_id, version) in self._corrupt

    def take_corrupt_findings(self) -> list[CorruptFinding]:
        """Findings not yet reported to the metaserver (removed from the queue)."""
        with self._mutex:
            findings = list(self._corrupt_pending.values())
            self._corrupt_pending.clear()
            return findings

    def put_back_findings(self, findings: list[CorruptFinding]) -> None:
        with self._mutex:
            for finding in findings:
                key = (finding.chunk_id, finding.version)
                if (
                    key in self._corrupt
                    and len(self._corrupt_pending) < CORRUPT_REPORTS_PENDING_MAX
                ):
                    self._corrupt_pending.setdefault(key, finding)

    def full_report(self) -> list[ReplicaReport]:
        """Every stored replica, corrupt ones marked; clears the incremental changes first,
        so that a change racing with the listing is reported again afterwards."""
        self.changes.clear()
        reports: list[ReplicaReport] = []
        for info in self.store.list_replicas():
            corrupt = info.damage is not None or self.is_corrupt(info.chunk_id, info.version)
            reports.append(ReplicaReport(info.chunk_id, info.version, info.length_bytes, corrupt))
        invariant(
            len({r.chunk_id for r in reports}) == len(reports), "two versions of one chunk stored"
        )
        return reports
