"""The replicated dataserver-mode table: SetDataserverMode, GetDataserverModes, snapshots."""

from __future__ import annotations

import errno
import random

import pytest

from metaserver.namespace import Namespace, SnapshotError
from wire.cluster_admin_ops import DataserverMode
from wire.ids import DataserverId
from wire.namespace_ops import (
    DATASERVER_ADDRESS_MAX_BYTES,
    DATASERVER_MODES_MAX,
    ROOT_CREDENTIALS,
    DataserverModeEntry,
    DataserverModesReply,
    GetDataserverModes,
    NsError,
    OkReply,
    Reply,
    SetDataserverMode,
    SystemCommand,
    decode_command,
    encode_command,
)

from .test_namespace_support import pack_snapshot, seed_from_environment, snapshot_records

DECOMMISSION = DataserverMode.DECOMMISSION
MAINTENANCE = DataserverMode.MAINTENANCE
NORMAL = DataserverMode.NORMAL
DS = DataserverId(0xABCDEF0123456789)


def set_mode(
    namespace: Namespace, time_ns: int, ds: int, mode: DataserverMode, address: str = "h:1"
) -> Reply:
    op = SetDataserverMode(DataserverId(ds), mode, address)
    return namespace.apply(SystemCommand(time_ns, op))


def table(namespace: Namespace) -> tuple[DataserverModeEntry, ...]:
    reply = namespace.query(GetDataserverModes(), ROOT_CREDENTIALS)
    assert isinstance(reply, DataserverModesReply)
    return reply.entries


def test_a_mode_is_kept_with_its_time_and_address() -> None:
    namespace = Namespace()
    assert set_mode(namespace, 100, DS, MAINTENANCE, "10.0.0.7:9000") == OkReply()
    assert table(namespace) == (DataserverModeEntry(DS, MAINTENANCE, 100, "10.0.0.7:9000"),)


def test_setting_the_same_mode_again_keeps_its_time_and_a_new_mode_restarts_it() -> None:
    namespace = Namespace()
    set_mode(namespace, 100, DS, DECOMMISSION)
    set_mode(namespace, 200, DS, DECOMMISSION, "h:2")
    assert table(namespace) == (DataserverModeEntry(DS, DECOMMISSION, 100, "h:2"),)
    set_mode(namespace, 300, DS, MAINTENANCE)
    assert table(namespace) == (DataserverModeEntry(DS, MAINTENANCE, 300, "h:1"),)


def test_normal_removes_the_row_and_is_ok_without_one() -> None:
    namespace = Namespace()
    set_mode(namespace, 1, 5, MAINTENANCE)
    set_mode(namespace, 2, 6, DECOMMISSION)
    assert set_mode(namespace, 3, 5, NORMAL) == OkReply()
    assert [row.dataserver for row in table(namespace)] == [6]
    assert set_mode(namespace, 4, 5, NORMAL) == OkReply()
    assert [row.dataserver for row in table(namespace)] == [6]


def test_rows_are_listed_by_dataserver_id() -> None:
    namespace = Namespace()
    for time_ns, ds in enumerate([9, 2, 7, 1]):
        set_mode(namespace, time_ns, ds, MAINTENANCE)
    assert [row.dataserver for row in table(namespace)] == [1, 2, 7, 9]


@pytest.mark.parametrize(
    "ds,address",
    [(0, "h:1"), (1 << 64, "h:1"), (-3, "h:1"), (5, "h" * (DATASERVER_ADDRESS_MAX_BYTES + 1))],
    ids=["zero-id", "id-too-large", "negative-id", "address-too-long"],
)
def test_a_bad_row_is_refused_and_changes_nothing(ds: int, address: str) -> None:
    namespace = Namespace()
    before = namespace.digest()
    assert set_mode(namespace, 1, ds, MAINTENANCE, address) == NsError(errno.EINVAL)
    assert namespace.digest() == before and table(namespace) == ()


def test_the_table_is_bounded_but_existing_rows_still_change() -> None:
    namespace = Namespace()
    for ds in range(1, DATASERVER_MODES_MAX + 1):
        assert set_mode(namespace, ds, ds, MAINTENANCE) == OkReply()
    assert set_mode(namespace, 0, DATASERVER_MODES_MAX + 1, MAINTENANCE) == NsError(errno.EUSERS)
    assert set_mode(namespace, 0, 1, DECOMMISSION) == OkReply()
    assert set_mode(namespace, 0, 2, NORMAL) == OkReply()
    assert set_mode(namespace, 0, DATASERVER_MODES_MAX + 1, MAINTENANCE) == OkReply()
    namespace.verify()


def test_the_command_survives_the_log_encoding() -> None:
    command = SystemCommand(7, SetDataserverMode(DS, MAINTENANCE, "[::1]:9000"))
    assert decode_command(encode_command(command)) == command


def random_modes(seed: int, count: int) -> list[SystemCommand]:
    rng = random.Random(seed)
    return [
        SystemCommand(
            step,
            SetDataserverMode(
                DataserverId(rng.randrange(1, 8)), rng.choice(list(DataserverMode)), "h:1"
            ),
        )
        for step in range(count)
    ]


def test_replicas_applying_the_same_commands_agree_and_snapshots_keep_the_table() -> None:
    seed = seed_from_environment("dataserver modes: determinism and snapshots")
    commands = random_modes(seed, 200)
    first, second = Namespace(), Namespace()
    for position, command in enumerate(commands):
        assert first.apply(command) == second.apply(command)
        if position % 50 == 49:
            second = Namespace.restore(second.snapshot())
        assert first.digest() == second.digest(), f"diverged at step {position}"
    restored = Namespace.restore(first.snapshot())
    assert table(restored) == table(first) and restored.digest() == first.digest()


def test_the_digest_sees_the_table() -> None:
    namespace = Namespace()
    empty = namespace.digest()
    set_mode(namespace, 1, DS, MAINTENANCE)
    maintenance = namespace.digest()
    set_mode(namespace, 2, DS, DECOMMISSION)
    assert len({empty, maintenance, namespace.digest()}) == 3
    set_mode(namespace, 3, DS, NORMAL)
    assert namespace.digest() == empty


def test_a_format_1_snapshot_of_an_older_paxfs_loads_with_an_empty_table() -> None:
    namespace = Namespace()
    records = snapshot_records(namespace.snapshot())
    assert records[0] == ["paxfs-namespace", 3] and records[-3] == records[-2] == []
    older = [["paxfs-namespace", 1], *records[1:-3], records[-1]]
    restored = Namespace.restore(pack_snapshot(older))
    assert table(restored) == ()
    assert set_mode(restored, 1, DS, MAINTENANCE) == OkReply()
    assert table(Namespace.restore(restored.snapshot()))[0].dataserver == DS


def test_a_snapshot_with_a_bad_row_is_refused() -> None:
    namespace = Namespace()
    set_mode(namespace, 1, DS, MAINTENANCE)
    records = snapshot_records(namespace.snapshot())
    records[-3] = [[DS, 0, 1, "h:1"]]  # NORMAL never has a row
    with pytest.raises(SnapshotError, match="dataserver-mode row"):
        Namespace.restore(pack_snapshot(records))
    records[-3] = [[DS, 2, 1, "h:1"], [DS, 1, 1, "h:1"]]
    with pytest.raises(SnapshotError, match="two mode rows"):
        Namespace.restore(pack_snapshot(records))
