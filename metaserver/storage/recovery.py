"""Start-up recovery: the newest snapshot, the records still in the log, a writable tail.

Runs once, before the log writer starts, on a locked directory. It removes what a crash can
leave behind and is safe to remove (temporary files, snapshots older than the newest,
segments made obsolete by a compaction), cuts a torn tail off the last segment, and refuses
anything else that is wrong, naming the file and offset.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from metaserver.storage.data_dir import (
    TEMP_SUFFIX,
    DataDirectory,
    Sync,
    parse_segment_name,
    parse_snapshot_name,
    segment_file_name,
    snapshot_file_name,
)
from metaserver.storage.errors import StorageCorruption
from metaserver.storage.log_writer import SegmentFile
from metaserver.storage.record_format import (
    FIRST_RECORD_NUMBER,
    SEGMENT_HEADER_BYTES,
    RecordNumber,
    SegmentHeader,
    decode_segment_header,
    encode_segment_header,
    scan_segment,
)
from metaserver.storage.snapshot_format import Snapshot, decode_snapshot

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record of the log as recovered: its number and the caller's payload."""

    number: RecordNumber
    payload: bytes


@dataclass(frozen=True, slots=True)
class RecoveredState:
    """What the storage held at open: the newest snapshot and every record still in the log.

    ``records`` are in log order with consecutive numbers. They are the records appended
    since the last compaction (or kept by it), except the segments removed by
    ``drop_records_before``; they may predate the snapshot if the process crashed between
    saving a snapshot and truncating the log, so the caller must tolerate those.
    """

    snapshot: Snapshot | None
    records: tuple[LogRecord, ...]


@dataclass(frozen=True, slots=True)
class Recovery:
    """The recovered state plus what the log writer needs to continue the log."""

    state: RecoveredState
    segments: list[SegmentFile]
    active_bytes: int
    next_number: RecordNumber


def _read_file(directory: DataDirectory, name: str, size_bytes_max: int | None = None) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory.dir_fd)
    with os.fdopen(fd, "rb") as file:
        return file.read() if size_bytes_max is None else file.read(size_bytes_max)


def recover(directory: DataDirectory, *, snapshot_bytes_max: int, fsync: Sync) -> Recovery:
    """Read and repair ``directory`` (see the module docstring); returns what it holds."""
    names = directory.names()
    leftovers = [name for name in names if name.endswith(TEMP_SUFFIX)]
    if leftovers:
        _log.info("%s: removing leftovers of an interrupted write: %s", directory.path, leftovers)
        directory.remove(leftovers)
    snapshot = _load_snapshot(directory, names, snapshot_bytes_max)
    return _load_log(directory, names, snapshot, fsync)


def _load_snapshot(
    directory: DataDirectory, names: list[str], snapshot_bytes_max: int
) -> Snapshot | None:
    indexes = sorted(i for i in map(parse_snapshot_name, names) if i is not None)
    if not indexes:
        return None
    name = snapshot_file_name(indexes[-1])
    snapshot = decode_snapshot(
        _read_file(directory, name), str(directory.path / name), raw_bytes_max=snapshot_bytes_max
    )
    if snapshot.index != indexes[-1]:
        raise StorageCorruption(
            str(directory.path / name), 0, f"snapshot file holds index {snapshot.index}"
        )
    older = [snapshot_file_name(index) for index in indexes[:-1]]
    if older:
        _log.info("%s: removing snapshots older than %s: %s", directory.path, name, older)
        directory.remove(older)
    return snapshot


def _load_log(
    directory: DataDirectory, names: list[str], snapshot: Snapshot | None, fsync: Sync
) -> Recovery:
    firsts = sorted(n for n in map(parse_segment_name, names) if n is not None)
    if not firsts:
        first_name = segment_file_name(FIRST_RECORD_NUMBER)
        directory.write_file_atomically(
            first_name, [encode_segment_header(FIRST_RECORD_NUMBER, base=True)]
        )
        return Recovery(
            RecoveredState(snapshot, ()),
            [SegmentFile(FIRST_RECORD_NUMBER, first_name)],
            SEGMENT_HEADER_BYTES,
            FIRST_RECORD_NUMBER,
        )
    headers: list[SegmentHeader] = []
    for first in firsts:
        name = segment_file_name(first)
        path = str(directory.path / name)
        header = decode_segment_header(_read_file(directory, name, SEGMENT_HEADER_BYTES), path)
        if header.first != first:
            raise StorageCorruption(path, 0, f"segment header says first record {header.first}")
        headers.append(header)
    start = max((i for i, header in enumerate(headers) if header.base), default=0)
    if start:
        obsolete = [segment_file_name(first) for first in firsts[:start]]
        _log.info("%s: removing segments replaced by a compaction: %s", directory.path, obsolete)
        directory.remove(obsolete)
    live = firsts[start:]
    records: list[LogRecord] = []
    expected = live[0]
    active_bytes = 0
    for position, first in enumerate(live):
        name = segment_file_name(first)
        path = str(directory.path / name)
        if first != expected:
            raise StorageCorruption(
                path, 0, f"segment starts at record {first}, the one before ends at {expected - 1}"
            )
        is_last = position == len(live) - 1
        scan = scan_segment(_read_file(directory, name), path, is_last=is_last)
        records.extend(
            LogRecord(RecordNumber(first + i), payload) for i, payload in enumerate(scan.payloads)
        )
        expected = RecordNumber(first + len(scan.payloads))
        active_bytes = scan.valid_bytes
        if scan.torn is not None:
            _log.warning(
                "%s: cutting a torn tail at byte offset %d (%s; %d bytes)",
                path,
                scan.torn.offset,
                scan.torn.reason,
                scan.torn.bytes_cut,
            )
            fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=directory.dir_fd)
            try:
                os.ftruncate(fd, scan.valid_bytes)
                fsync(fd)
            finally:
                os.close(fd)
    return Recovery(
        RecoveredState(snapshot, tuple(records)),
        [SegmentFile(first, segment_file_name(first)) for first in live],
        active_bytes,
        expected,
    )
