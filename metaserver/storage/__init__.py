"""Durable storage of one metaserver: a group-committed record log and snapshots.

The storage knows nothing of Paxos or of the namespace: records are opaque ``bytes`` (the
process hands over msgpack-encoded Paxos records), a snapshot is opaque ``bytes`` plus the
log index it covers. Typical use by the metaserver process::

    async with open_storage(data_dir, cluster_id) as storage:
        state = storage.recovered          # newest snapshot, then the records after it
        ticket = await storage.submit(ready.records)
        await ticket.wait_durable()        # only now send the Ready's messages
        ...
        await storage.save_snapshot(applied_index, state_machine_bytes)
        await storage.compact(paxos.minimal_records())

Contracts:

* Records are numbered by the storage (:data:`RecordNumber`, 1, 2, ...) in submission order.
  A ticket is durable (fdatasync returned) only when every earlier submission is too, so the
  Paxos owner may release a Ready's messages as soon as that Ready's ticket is durable.
* Group commit: one writer thread writes everything queued with one ``write`` and one
  ``fdatasync``. What is submitted and not yet durable is bounded (``queue_records_max``,
  ``queue_bytes_max``); :meth:`MetaStorage.submit` waits for room, ``submit_nowait`` raises
  ``trio.WouldBlock``.
* A failed write or fsync is fatal and never retried: by default the process prints one line
  and exits with status 74 (:func:`exit_process`); with another ``on_fatal`` every waiter and
  every later call raises :class:`FatalStorageError` and nothing is written again.
* At open, a torn tail (incomplete, or damaged with no valid record after it, at the end of
  the last segment) is cut and logged; any other damage raises :class:`StorageCorruption`
  naming file and offset. A directory of another cluster, of an unknown format, holding
  files not ours, or locked by another storage is refused with one clear message.
"""

from metaserver.storage.data_dir import (
    FORMAT_FILE_NAME,
    LOCK_FILE_NAME,
    STORAGE_FORMAT_VERSION,
)
from metaserver.storage.errors import (
    ClusterMismatch,
    FatalStorageError,
    StorageClosed,
    StorageCorruption,
    StorageError,
    StorageFormatError,
    StorageLocked,
)
from metaserver.storage.log_writer import LogStats
from metaserver.storage.record_format import FIRST_RECORD_NUMBER, RecordNumber
from metaserver.storage.recovery import LogRecord, RecoveredState
from metaserver.storage.snapshot_format import Snapshot
from metaserver.storage.storage import (
    EXIT_STORAGE_FAILURE,
    QUEUE_BYTES_MAX_DEFAULT,
    QUEUE_RECORDS_MAX_DEFAULT,
    RECORD_BYTES_MAX_DEFAULT,
    SEGMENT_BYTES_TARGET_DEFAULT,
    SNAPSHOT_BYTES_MAX_DEFAULT,
    WRITE_BATCH_BYTES_MAX_DEFAULT,
    AppendTicket,
    MetaStorage,
    StorageOptions,
    exit_process,
    open_storage,
)

__all__ = [
    "EXIT_STORAGE_FAILURE",
    "FIRST_RECORD_NUMBER",
    "FORMAT_FILE_NAME",
    "LOCK_FILE_NAME",
    "QUEUE_BYTES_MAX_DEFAULT",
    "QUEUE_RECORDS_MAX_DEFAULT",
    "RECORD_BYTES_MAX_DEFAULT",
    "SEGMENT_BYTES_TARGET_DEFAULT",
    "SNAPSHOT_BYTES_MAX_DEFAULT",
    "STORAGE_FORMAT_VERSION",
    "WRITE_BATCH_BYTES_MAX_DEFAULT",
    "AppendTicket",
    "ClusterMismatch",
    "FatalStorageError",
    "LogRecord",
    "LogStats",
    "MetaStorage",
    "RecordNumber",
    "RecoveredState",
    "Snapshot",
    "StorageClosed",
    "StorageCorruption",
    "StorageError",
    "StorageFormatError",
    "StorageLocked",
    "StorageOptions",
    "exit_process",
    "open_storage",
]
