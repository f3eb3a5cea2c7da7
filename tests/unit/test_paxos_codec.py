"""Every Paxos message and record survives the generic wire codec the metaserver uses.

The types are registered exactly as ``metaserver/codec.py`` registers them (messages and
records under ``paxos.<ClassName>``, nested types unregistered), so a field type the
codec cannot carry fails here rather than between two live replicas.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from metaserver.paxos import ALL_MESSAGE_TYPES, ALL_RECORD_TYPES
from metaserver.paxos.messages import AcceptedSlot, ChosenValue
from metaserver.paxos.types import (
    Ballot,
    ConfigEpoch,
    Entry,
    EntryKind,
    Membership,
    NodeId,
    Slot,
    SnapshotMeta,
)
from tests.sim.codec import decode_message, decode_record, encode_message, encode_record

node_ids = st.integers(1, 2**31).map(NodeId)
slots = st.integers(0, 2**40).map(Slot)
ballots = st.builds(Ballot, st.integers(0, 2**31), node_ids)
memberships = st.lists(node_ids, min_size=1, max_size=7, unique=True).map(
    lambda ids: Membership(voters=tuple(ids[:3]), learners=tuple(ids[3:5]), retired=tuple(ids[5:]))
)
entries = st.one_of(
    st.just(Entry(EntryKind.NOOP)),
    st.lists(st.binary(max_size=20), max_size=4).map(
        lambda cs: Entry(EntryKind.COMMANDS, tuple(cs))
    ),
    memberships.map(Entry.of_membership),
)
metas = st.builds(
    lambda index, ms: SnapshotMeta(
        Slot(index), tuple(ConfigEpoch(Slot(0), Slot(index + 1), m) for m in ms)
    ),
    st.integers(0, 2**40),
    st.lists(memberships, min_size=1, max_size=2),
)

st.register_type_strategy(int, st.integers(0, 2**63 - 1))  # what msgpack carries
st.register_type_strategy(NodeId, node_ids)  # type: ignore[arg-type]
st.register_type_strategy(Slot, slots)  # type: ignore[arg-type]
st.register_type_strategy(Ballot, ballots)
st.register_type_strategy(Entry, entries)
st.register_type_strategy(Membership, memberships)
st.register_type_strategy(SnapshotMeta, metas)
st.register_type_strategy(AcceptedSlot, st.builds(AcceptedSlot, slots, ballots, entries))
st.register_type_strategy(ChosenValue, st.builds(ChosenValue, ballots, entries))


@settings(max_examples=40, deadline=None)
@given(st.one_of(*(st.from_type(cls) for cls in ALL_MESSAGE_TYPES)))
def test_every_message_round_trips(message: object) -> None:
    assert decode_message(encode_message(message)) == message  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.one_of(*(st.from_type(cls) for cls in ALL_RECORD_TYPES)))
def test_every_record_round_trips(record: object) -> None:
    assert decode_record(encode_record(record)) == record  # type: ignore[arg-type]
