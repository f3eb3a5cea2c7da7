"""The dataserver and cluster protocols: every message survives the wire, failures name members."""

from __future__ import annotations

import errno
from functools import partial

import pytest
import trio

from wire import schema
from wire.address import Address
from wire.cluster_ops import (
    FULL_REPORT,
    HEARTBEAT,
    REGISTER,
    REPORT_CORRUPT,
    CorruptReplicaRequest,
    DeleteReplica,
    FullReportRequest,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterRequest,
    ReplicaKey,
    ReplicaReport,
    ReplicateChunk,
    SendFullReport,
    Space,
)
from wire.dataserver_ops import (
    BULK_LANES,
    READ,
    READ_RAW,
    SYNC,
    WRITE,
    MemberAck,
    PeerConnections,
    PipelineReply,
    RawBlockHeader,
    RawReadReply,
    ReadReply,
    ReadRequest,
    SyncRequest,
    WriteRequest,
    failed_members,
    failure_reason,
    member_failure,
    pipeline_timeout_s,
)
from wire.errors import RpcError
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.rpc import CallContext, Handlers, RpcConnection, WithPayload
from wire.tokens import AccessMode, sign_token
from wire.transport import bound_port, serve

TOKEN = sign_token(b"k" * 32, ChunkId(7), ChunkVersion(3), AccessMode.WRITE, 1_800_000_000.0)
SPACE = Space(1 << 40, 1 << 30, 1 << 39, 12)


@pytest.mark.parametrize(
    "message",
    [
        WriteRequest(ChunkId(7), ChunkVersion(3), None, 0, True, TOKEN, ("a:1", "[::1]:2")),
        WriteRequest(ChunkId(7), ChunkVersion(3), ChunkVersion(2), 65536, False, TOKEN, ()),
        SyncRequest(ChunkId(7), ChunkVersion(3), ChunkVersion(1), False, TOKEN, ("b:2",)),
        PipelineReply(100, (MemberAck("a:1", 5), MemberAck("b:2", 6))),
        RawReadReply(1, 2, True, (RawBlockHeader(0, 65536, True, 99, 1000),)),
        RegisterRequest(DataserverId(5), "h:1", 9, SPACE),
        HeartbeatRequest(
            DataserverId(5),
            "h:1",
            9,
            SPACE,
            2,
            1,
            (ReplicaKey(ChunkId(1), ChunkVersion(1)),),
            (ReplicaReport(ChunkId(1), ChunkVersion(2), 10, False),),
        ),
        HeartbeatReply(
            4,
            (
                DeleteReplica(ChunkId(1), ChunkVersion(1)),
                ReplicateChunk(ChunkId(2), ChunkVersion(3), "src:9", TOKEN),
                SendFullReport(),
            ),
        ),
        FullReportRequest(DataserverId(5), 77, 0, True, ()),
        CorruptReplicaRequest(ChunkId(1), ChunkVersion(1), DataserverId(0), "h:1", "read", "bad"),
    ],
)
def test_every_message_round_trips_through_the_schema(message: object) -> None:
    assert schema.decode(type(message), schema.encode(message)) == message


def test_a_heartbeat_reply_with_an_unknown_command_is_refused() -> None:
    raw = [1, [["cluster.explode", []]]]
    with pytest.raises(schema.SchemaError, match="unexpected message type"):
        schema.decode(HeartbeatReply, raw)


def test_methods_declare_where_bulk_data_travels() -> None:
    assert WRITE.carries_payload and not WRITE.returns_payload
    assert READ_RAW.returns_payload and not SYNC.carries_payload
    assert {m.name for m in (REGISTER, HEARTBEAT, FULL_REPORT, REPORT_CORRUPT)} == {
        "cluster.register",
        "cluster.heartbeat",
        "cluster.full_report",
        "cluster.report_corrupt",
    }


def test_a_member_failure_names_its_members_and_keeps_code_and_reason() -> None:
    error = member_failure(["127.0.0.1:7001", "[::1]:7002"], errno.ENOSPC, "disk full: no room")
    assert error.code == errno.ENOSPC
    assert failed_members(error) == ("127.0.0.1:7001", "[::1]:7002")
    assert failure_reason(error) == "disk full: no room"


def test_an_ordinary_error_names_no_member() -> None:
    error = RpcError(errno.EIO, "pipeline went wrong: somewhere")
    assert failed_members(error) is None
    assert failure_reason(error) == "pipeline went wrong: somewhere"


def test_upstream_members_wait_longer_than_the_members_they_call() -> None:
    assert pipeline_timeout_s(2) > pipeline_timeout_s(1) > pipeline_timeout_s(0) > 0


async def test_bulk_lanes_carry_concurrent_calls_on_separate_connections() -> None:
    """Two calls at once to one peer travel on two connections; one at a time stays on
    the first; closing the address closes every lane."""
    key = bytes(32)
    seen: list[RpcConnection] = []
    both_in = trio.Event()

    async def handle(request: ReadRequest, context: CallContext) -> WithPayload[ReadReply]:
        seen.append(context.connection)
        if request.offset and len(seen) >= 2:
            both_in.set()
        if request.offset:
            await both_in.wait()
        return WithPayload(ReadReply(0, 0), b"x" * 10)

    handlers = Handlers()
    handlers.register(READ, handle)
    token = sign_token(key, ChunkId(7), ChunkVersion(3), AccessMode.READ, 1_800_000_000.0)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(serve, handlers, key, Address("127.0.0.1", 0)))
        address = f"127.0.0.1:{bound_port(listeners)}"
        peers = PeerConnections(key, nursery, name="test", lanes=BULK_LANES)
        for _ in range(3):
            await peers.call(address, READ, ReadRequest(ChunkId(7), ChunkVersion(3), 0, 1, token))
        assert len(set(map(id, seen))) == 1, "calls one at a time share one connection"
        seen.clear()
        async with trio.open_nursery() as calls:
            for _ in range(2):
                calls.start_soon(
                    partial(
                        peers.call,
                        address,
                        READ,
                        ReadRequest(ChunkId(7), ChunkVersion(3), 1, 1, token),
                        timeout_s=5,
                    )
                )
        assert len(set(map(id, seen))) == 2, "concurrent calls spread over the lanes"
        lanes = [await peers.get(address, lane) for lane in range(BULK_LANES)]
        await peers.close(address)
        assert all(connection.closed for connection in lanes)
        await peers.aclose()
        nursery.cancel_scope.cancel()
