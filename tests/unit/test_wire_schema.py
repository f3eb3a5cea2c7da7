"""Every declared message type round-trips; bad bodies are refused with a clear error."""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wire
from tests.wire_fixtures import Ballot, Voters
from wire import schema
from wire.ids import InodeId


def _import_every_wire_module() -> None:
    for module in pkgutil.iter_modules(wire.__path__):
        importlib.import_module(f"wire.{module.name}")


_import_every_wire_module()
# Messages of wire/ only: the Paxos messages registered by metaserver.codec (when that is
# imported first) have invariants random values break, and tests of their own.
ALL_MESSAGES = sorted(
    (name, cls) for name, cls in schema._registry.items() if cls.__module__.startswith("wire.")
)

st.register_type_strategy(float, st.floats(allow_nan=False))
st.register_type_strategy(int, st.integers(-(2**63), 2**64 - 1))


def _roundtrip(value: object) -> object:
    packed = msgpack.packb(schema.encode_tagged(value), use_bin_type=True)
    return schema.decode_tagged(msgpack.unpackb(packed, raw=False, strict_map_key=False))


@pytest.mark.parametrize("name,cls", ALL_MESSAGES, ids=[name for name, _ in ALL_MESSAGES])
def test_every_message_type_round_trips_through_msgpack(name: str, cls: type) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_type(cls))
    def check(value: object) -> None:
        assert _roundtrip(value) == value

    check()


@schema.message("test.schema.sample")
@dataclass(frozen=True)
class Sample:
    inode: InodeId
    name: bytes
    size: float
    tags: tuple[str, ...]
    parent: InodeId | None = None


def test_a_sample_round_trips_and_keeps_its_types() -> None:
    value = Sample(InodeId(5), b"\xff\x00name", 1.5, ("a", "b"))
    back = _roundtrip(value)
    assert back == value and isinstance(back.tags, tuple)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw,complaint",
    [
        ([5, b"n", 1.0], "has 5 fields, got 3"),
        ([5, b"n", 1.0, [], None, "extra"], "has 5 fields, got 6"),
        (["5", b"n", 1.0, [], None], "inode: expected int"),
        ([True, b"n", 1.0, [], None], "inode: expected int"),
        ([5, "n", 1.0, [], None], "name: expected bytes"),
        ([5, b"n", "1.0", [], None], "size: expected float"),
        ([5, b"n", 1.0, [1], None], r"tags\[0\]: expected str"),
        ([5, b"n", 1.0, "ab", None], "tags: expected array"),
        ({"inode": 5}, "expected Sample fields"),
    ],
)
def test_a_body_that_breaks_the_schema_names_the_field(raw: object, complaint: str) -> None:
    with pytest.raises(schema.SchemaError, match=complaint):
        schema.decode(Sample, raw)


def test_an_unknown_message_name_is_refused() -> None:
    with pytest.raises(schema.SchemaError, match="unknown message type"):
        schema.decode_tagged(["no.such.message", []])


def test_a_message_outside_the_allowed_set_is_refused() -> None:
    value = schema.encode_tagged(Sample(InodeId(1), b"", 0.0, ()))
    with pytest.raises(schema.SchemaError, match="unknown message type"):
        schema.decode_tagged(value, allowed=())


def test_registering_two_classes_under_one_name_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="already used"):

        @schema.message("test.schema.sample")
        @dataclass(frozen=True)
        class Impostor:
            x: int


@dataclass(frozen=True)
class Plain:
    value: int


@schema.message("test.schema.holder")
@dataclass(frozen=True)
class Holder:
    plain: Plain | None
    plains: tuple[Plain, ...]


def test_plain_dataclasses_nest_positionally_also_when_optional() -> None:
    value = Holder(Plain(3), (Plain(4),))
    assert _roundtrip(value) == value
    assert _roundtrip(Holder(None, ())) == Holder(None, ())


def test_float_fields_accept_integers_from_other_languages() -> None:
    assert math.isclose(schema.decode(Sample, [1, b"", 2, [], None]).size, 2.0)


@pytest.mark.parametrize("code", [2**40, 2**31, -(2**31) - 1, 2**64 - 1, -(2**63)])
def test_an_rpc_error_with_a_code_beyond_a_c_int_still_has_a_message(code: int) -> None:
    from wire.errors import RpcError

    error = RpcError(code)
    assert error.message == f"error code {code}"
    assert str(code) in str(error)


def test_a_message_whose_own_check_refuses_the_values_is_a_schema_error() -> None:
    raw = [1, [[]]]  # the nested Voters' __post_init__ refuses an empty tuple
    with pytest.raises(schema.SchemaError, match=r"members: .*at least one voter"):
        schema.decode(Ballot, raw)
    with pytest.raises(schema.SchemaError):
        schema.decode_tagged(["test.ballot", raw])
    with pytest.raises(schema.SchemaError, match=r"\[1\]"):
        schema.decode(
            tuple[Ballot, ...],
            [schema.encode_tagged(Ballot(1, Voters((1,)))), ["test.ballot", raw]],
        )


def test_the_refusal_of_a_messages_own_check_is_named_in_the_schema_error() -> None:
    with pytest.raises(schema.SchemaError, match="PickyRefusal: a membership needs"):
        schema.decode(Ballot, [1, [[]]])
    assert schema.decode(Ballot, [1, [[3]]]) == Ballot(1, Voters((3,)))


def test_any_exception_while_building_a_message_is_a_schema_error() -> None:
    @dataclass(frozen=True)
    class Fussy:
        value: int

        def __post_init__(self) -> None:
            raise RuntimeError(f"never {self.value}")

    with pytest.raises(schema.SchemaError, match="RuntimeError: never 1"):
        schema.decode(Fussy, [1])
    with pytest.raises(schema.SchemaError, match="RuntimeError"):
        schema.decode(tuple[Fussy, ...], [[1]])
    with pytest.raises(schema.SchemaError, match="unhashable"):
        # A key that decodes to a list cannot go into the dict being built.
        schema.decode(dict[list[int], int], {(1, 2): 1})
