"""``paxfs admin`` without a cluster: usage errors, JSON output, fsck's verdicts, and the
wire messages of :mod:`wire.cluster_admin_ops`."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from tools.admin import _size
from tools.admin_client import AdminError, ReplicaRead, match_dataserver
from tools.admin_fsck import chunk_converged, compare_reads, judge_chunk
from tools.admin_output import human_bytes, human_seconds, json_ready
from tools.admin_servers import follow_drain
from tools.cli import apply_flags, build_parser, main, subcommands
from wire import schema
from wire.cluster_admin_ops import (
    CLUSTER_HEALTH,
    FILE_CHUNKS,
    LIST_DATASERVERS,
    LIST_REPLICAS,
    MOVE_BEGIN,
    MOVE_COMMIT,
    SET_DATASERVER_STATE,
    ChunkStatus,
    DataserverMode,
    DataserverReport,
    MoveCommitRequest,
    MoveRequest,
    ReplicaHealth,
    SetDataserverStateRequest,
)
from wire.config import load_config
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.tokens import AccessMode, ChunkToken

TOKEN = ChunkToken(ChunkId(0x10), ChunkVersion(2), AccessMode.READ, 1.5, b"sig")
A, B, C = DataserverId(0xA), DataserverId(0xB), DataserverId(0xC)


def replica(ds: DataserverId, **changes: object) -> ReplicaHealth:
    values: dict[str, object] = {
        "dataserver_id": ds,
        "address": f"127.0.0.1:{7000 + ds}",
        "server_state": "live",
        "version": ChunkVersion(2),
        "length_bytes": 100,
        "corrupt": False,
        "stale": False,
        "counted": True,
        "deleting": False,
    }
    values.update(changes)
    return ReplicaHealth(**values)  # type: ignore[arg-type]


def status(*replicas: ReplicaHealth, health: str = "healthy", goal: int = 3) -> ChunkStatus:
    counted = sum(r.counted for r in replicas)
    return ChunkStatus(
        index=0,
        chunk=ChunkId(0x10),
        version=ChunkVersion(2),
        current_version=ChunkVersion(2),
        length=100,
        goal=goal,
        health=health,
        counted=counted,
        readable=counted,
        replicas=replicas,
        replicas_unlisted=0,
        copying_to=(),
        token=TOKEN,
    )


@pytest.mark.parametrize(
    "argv,complaint",
    [
        (["admin", "report", "--watch", "0"], "--watch needs a positive period"),
        (["admin", "report", "--watch", "2", "--json"], "--watch needs a positive period"),
        (["admin", "decommission", "abcd", "--status", "--wait"], "--wait goes with"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert complaint in error and error.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["admin", "balance", "--max-move", "lots"],
        ["admin", "maintenance", "abcd", "maybe"],
        ["admin", "decommission", "abcd", "--status", "--cancel"],
        ["admin", "setgoal", "two", "/"],
        ["admin"],
    ],
)
def test_argument_mistakes_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage: paxfs admin" in capsys.readouterr().err


def test_a_cluster_is_needed_and_its_absence_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["admin", "report"]) == 2
    assert "[cluster] metaservers is empty" in capsys.readouterr().err


def test_sizes_take_binary_units() -> None:
    assert _size("1048576") == 1 << 20
    assert _size("64M") == 64 << 20
    assert _size("1.5G") == 3 << 29
    assert _size("2GiB") == 2 << 30
    for bad in ("lots", "0", "-1M"):
        with pytest.raises(argparse.ArgumentTypeError):
            _size(bad)


def test_json_names_ids_as_the_logs_do_and_leaves_tokens_out() -> None:
    document = json_ready(status(replica(A), replica(B)))
    assert document["chunk"] == "0x10"
    assert [r["dataserver_id"] for r in document["replicas"]] == [
        "000000000000000a",
        "000000000000000b",
    ]
    assert "token" not in document
    assert json_ready({"holders": (A, B), "count": 3}) == {
        "holders": ["000000000000000a", "000000000000000b"],
        "count": 3,
    }
    assert json_ready(DataserverMode.MAINTENANCE) == "maintenance"
    json.dumps(document)
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(10) == "10 B"
    assert human_seconds(None) == "-" and human_seconds(3725) == "1 h 02 min"


def test_fsck_judges_goal_corruption_and_decommissioning_replicas() -> None:
    assert judge_chunk(status(replica(A), replica(B), replica(C))).ok
    short = judge_chunk(status(replica(A), replica(B), health="under-replicated"))
    assert short.problems == ("under-replicated: 2 of 3 replicas",)
    # Replicas on a decommissioning server keep the chunk safe while they are copied.
    draining = judge_chunk(
        status(
            replica(A),
            replica(B),
            replica(C, server_state="decommissioning", counted=False),
            health="under-replicated",
        )
    )
    assert draining.ok and "being copied" in " ".join(draining.notes)
    rotten = DataserverId(0xD)
    bad = judge_chunk(status(replica(A), replica(B), replica(C), replica(rotten, corrupt=True)))
    assert bad.problems == (f"corrupt replica on 127.0.0.1:{7000 + rotten}",)
    assert judge_chunk(status(health="missing")).problems == ("missing: no readable good replica",)
    writing = judge_chunk(status(replica(A), health="writing"))
    assert writing.ok and writing.notes == ("being written",)


def test_replicas_read_in_full_must_agree_and_be_whole() -> None:
    chunk = status(replica(A), replica(B), replica(C))
    reads = [
        ReplicaRead(replica(A).address, 7, 100, ""),
        ReplicaRead(replica(B).address, 9, 100, ""),
        ReplicaRead(replica(C).address, 7, 100, ""),
    ]
    checks = compare_reads(chunk, reads)
    assert [c.ok for c in checks] == [True, False, True]
    assert "differ from 2 other replicas" in checks[1].problem
    broken = compare_reads(
        chunk,
        [
            ReplicaRead(replica(A).address, None, 0, "[EBADMSG] checksum mismatch"),
            ReplicaRead(replica(B).address, 7, 60, ""),
        ],
    )
    assert broken[0].problem == "[EBADMSG] checksum mismatch"
    assert broken[1].problem == "holds 60 of 100 bytes"


def test_convergence_means_exactly_the_goal_and_nothing_under_way() -> None:
    three = status(replica(A), replica(B), replica(C))
    assert chunk_converged(three, 3) and not chunk_converged(three, 2)
    extra = status(replica(A), replica(B), replica(C, counted=False, deleting=True))
    assert not chunk_converged(extra, 2)


@pytest.mark.parametrize(
    "method,message",
    [
        (SET_DATASERVER_STATE, SetDataserverStateRequest(A, DataserverMode.DECOMMISSION)),
        (MOVE_COMMIT, MoveCommitRequest(MoveRequest(ChunkId(1), ChunkVersion(2), A, B), 77)),
    ],
)
def test_admin_messages_survive_the_wire(
    method: schema.Method[object, object], message: object
) -> None:
    raw = msgpack.unpackb(msgpack.packb(schema.encode(message)), strict_map_key=False)
    assert schema.decode(method.request, raw) == message


def test_a_chunk_status_survives_the_wire_and_bad_fields_are_refused() -> None:
    chunk = status(replica(A), replica(B))
    raw = msgpack.unpackb(msgpack.packb(schema.encode(chunk)), strict_map_key=False)
    assert schema.decode(ChunkStatus, raw) == chunk
    raw[[f.name for f in fields(ChunkStatus)].index("counted")] = "three"
    with pytest.raises(schema.SchemaError, match="counted"):
        schema.decode(ChunkStatus, raw)
    for method in (CLUSTER_HEALTH, LIST_DATASERVERS, FILE_CHUNKS, LIST_REPLICAS, MOVE_BEGIN):
        assert method.name.startswith("cadmin.")


@pytest.mark.parametrize(
    "argv",
    [
        ["admin", "--no-quorum-timeout-s", "3", "-c", "{config}", "report"],
        ["admin", "report", "-c", "{config}", "--no-quorum-timeout-s", "3"],
        ["admin", "-c", "{config}", "report", "--no-quorum-timeout-s", "3"],
    ],
)
def test_the_config_and_setting_flags_work_before_and_after_the_action(
    argv: list[str], tmp_path: Path
) -> None:
    config_path = tmp_path / "paxfs.toml"
    config_path.write_text("[client]\ncall_timeout_s = 4.0\nno_quorum_timeout_s = 9.0\n")
    args = build_parser(subcommands()).parse_args([arg.format(config=config_path) for arg in argv])
    config = load_config(args.config)
    apply_flags(config, args)
    assert config.client.no_quorum_timeout_s == 3.0
    assert config.client.call_timeout_s == 4.0


class _DrainingLeader:
    """Plays the leader for ``follow_drain``: the drain shrinks by one chunk per poll;
    ``cancel_at`` is the poll at which another admin cancels the decommission."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.cancel_at = cancel_at
        self.polls = 0

    def report(self, state: str, drain: int) -> DataserverReport:
        return DataserverReport(
            A,
            "127.0.0.1:7010",
            state,
            100,
            50,
            50,
            4,
            0,
            0,
            0,
            0,
            0,
            0,
            drain,
            drain * 10,
            state == "decommissioning" and drain == 0,
        )

    async def dataservers(self) -> tuple[list[DataserverReport], bool]:
        self.polls += 1
        if self.polls == self.cancel_at:
            return [self.report("live", 0)], False
        return [self.report("decommissioning", max(0, 4 - self.polls))], False

    async def set_mode(self, dataserver: DataserverId, mode: DataserverMode) -> DataserverReport:
        raise AssertionError("following a drain sets no mode (modes are durable)")


async def test_following_a_drain_waits_until_it_is_done(autojump_clock: object) -> None:
    leader = _DrainingLeader()
    start = leader.report("decommissioning", 4)
    done = await follow_drain(leader, start, 60.0, quiet=True)  # type: ignore[arg-type]
    assert done.decommissioned and leader.polls == 4


async def test_following_a_drain_that_another_admin_cancels_fails(autojump_clock: object) -> None:
    leader = _DrainingLeader(cancel_at=2)
    start = leader.report("decommissioning", 4)
    with pytest.raises(AdminError, match="was cancelled: it is live"):
        await follow_drain(leader, start, 60.0, quiet=True)  # type: ignore[arg-type]


def test_a_dataserver_is_named_by_address_full_id_or_unique_prefix() -> None:
    base = _DrainingLeader().report("live", 0)
    servers = [
        replace(base, dataserver_id=DataserverId(0xABCD1), address="127.0.0.1:7001"),
        replace(base, dataserver_id=DataserverId(0xABCD2), address="127.0.0.1:7002"),
        replace(base, dataserver_id=DataserverId(0xABCD), address="127.0.0.1:7003"),
    ]
    assert match_dataserver(servers, "127.0.0.1:7002") is servers[1]
    assert match_dataserver(servers, "0xabcd") is servers[2]  # the whole id before prefixes
    assert match_dataserver(servers, "00000000000abcd1") is servers[0]
    assert match_dataserver(servers, "00000000000ABCD2") is servers[1]
    for text, complaint in (
        ("abc", "neither a dataserver id"),
        ("00000000000abc", "names 2 dataservers"),
        ("ffff", "no dataserver ffff"),
    ):
        with pytest.raises(AdminError, match=complaint):
            match_dataserver(servers, text)
