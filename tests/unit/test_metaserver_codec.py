"""Bytes a metaserver writes and sends: records, group commands, snapshots, peer batches."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaserver.codec import (
    PAXOS_DELIVER,
    GroupState,
    HeardFromRecord,
    PaxosBatch,
    SetMetaserverAddress,
    decode_group_command,
    decode_record,
    decode_snapshot,
    encode_group_command,
    encode_record,
    encode_snapshot,
    is_group_command,
)
from metaserver.namespace import encode_command
from metaserver.paxos import Ballot, Entry, EntryKind, NodeId, Slot, initial_snapshot_meta
from metaserver.paxos.messages import Accept, Heartbeat
from metaserver.paxos.records import AcceptedRecord, CommitRecord, PromiseRecord
from wire import schema
from wire.admin_ops import MemberAddress
from wire.ids import ROOT_INODE, ClientId, SequenceNumber
from wire.namespace_ops import (
    ROOT_CREDENTIALS,
    ClientCommand,
    Mknod,
    MutationCall,
    RequestContext,
)

BALLOT = Ballot(3, NodeId(2))


def test_log_records_of_the_core_and_of_the_replica_round_trip() -> None:
    entry = Entry(EntryKind.COMMANDS, commands=(b"one", b"\xc1two"))
    records = [
        PromiseRecord(BALLOT),
        AcceptedRecord(BALLOT, Slot(5), (entry, Entry(EntryKind.NOOP))),
        CommitRecord(Slot(6)),
        HeardFromRecord((1, 3)),
    ]
    for record in records:
        assert decode_record(encode_record(record)) == record


def test_a_log_record_of_an_unknown_kind_is_refused() -> None:
    stray = encode_group_command(SetMetaserverAddress(4, "127.0.0.1:9"))[1:]
    with pytest.raises(schema.SchemaError):
        decode_record(stray)
    with pytest.raises(schema.SchemaError):
        decode_record(b"\xc1\xc1 not msgpack")


@settings(max_examples=200, deadline=None)
@given(
    name=st.binary(min_size=1, max_size=255),
    mode=st.integers(min_value=0, max_value=0o7777),
    time_ns=st.integers(min_value=0, max_value=2**63 - 1),
    seq=st.integers(min_value=0, max_value=2**32),
)
def test_a_namespace_command_is_never_taken_for_a_group_command(
    name: bytes, mode: int, time_ns: int, seq: int
) -> None:
    context = RequestContext(
        ClientId(1), SequenceNumber(seq), SequenceNumber(seq), ROOT_CREDENTIALS
    )
    data = encode_command(
        ClientCommand(time_ns, MutationCall(context, Mknod(ROOT_INODE, name, mode)))
    )
    assert not is_group_command(data)


def test_group_commands_round_trip_and_nothing_else_decodes_as_one() -> None:
    command = SetMetaserverAddress(4, "[::1]:7004")
    data = encode_group_command(command)
    assert is_group_command(data)
    assert decode_group_command(data) == command
    with pytest.raises(schema.SchemaError):
        decode_group_command(data[1:])


def test_a_snapshot_holds_the_core_meta_the_namespace_and_the_address_book() -> None:
    meta = initial_snapshot_meta((NodeId(1), NodeId(2), NodeId(3)))
    group = GroupState((MemberAddress(4, "127.0.0.1:7004"),))
    assert decode_snapshot(encode_snapshot(meta, b"namespace", group)) == (
        meta,
        b"namespace",
        group,
    )
    assert group.address_map() == {4: "127.0.0.1:7004"}


@pytest.mark.parametrize(
    "blob,complaint",
    [
        (msgpack.packb(7), "not a paxfs metaserver snapshot"),
        (msgpack.packb(["paxfs-metaserver-snapshot/9", 0, b"", 0]), "snapshot/9"),
        (msgpack.packb(["paxfs-metaserver-snapshot/2", 0]), "damaged"),
        (b"\xc1", "not msgpack"),
    ],
)
def test_a_snapshot_of_another_format_is_refused_by_name(blob: bytes, complaint: str) -> None:
    with pytest.raises(schema.SchemaError, match=complaint):
        decode_snapshot(blob)


def test_a_peer_batch_travels_with_its_sender_and_typed_messages() -> None:
    accept = Accept(NodeId(1), BALLOT, Slot(9), (Entry(EntryKind.NOOP),), Slot(8), Slot(7))
    batch = PaxosBatch(1, (accept, Heartbeat(NodeId(1), BALLOT, 5, Slot(8), Slot(7))))
    assert schema.decode(PAXOS_DELIVER.request, schema.encode(batch)) == batch
