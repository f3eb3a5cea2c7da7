"""Typed message schemas: frozen dataclasses to msgpack-ready values and back.

Every message type in paxfs is a frozen dataclass whose fields are annotated
with a small set of types.  This module turns such an object into plain values
that msgpack can pack (a dataclass becomes a list of its field values in
declaration order) and, on receipt, validates raw values against the
annotations before building the object.  Nothing is pickled; a value of the
wrong type, a missing or extra field, or an unknown message name raises
:class:`SchemaError` with a message naming the offending field; so does any
exception a message's own checks (``__post_init__``) raise while it is built
from received values: :func:`decode` raises nothing else.

Supported annotations: ``int``, ``bool``, ``float``, ``str``, ``bytes``,
``None``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``,
``dict[K, V]``, ``IntEnum`` subclasses, ``NewType`` over any of these, nested
dataclasses, and unions of *registered* messages (encoded as ``[name, fields]``).
Decoders are compiled once per type, so decoding costs one closure call per
value.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Req = TypeVar("Req")
Rep = TypeVar("Rep")

Decoder = Callable[[Any], Any]
Encoder = Callable[[Any], Any]


class SchemaError(ValueError):
    """Raw input does not match the declared schema.

    ``path`` locates the offending value inside the message (``.attr.mode``),
    ``reason`` says what is wrong with it.
    """

    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path


_registry: dict[str, type] = {}
_names: dict[type, str] = {}
_decoders: dict[Any, Decoder] = {}
_encoders: dict[Any, Encoder] = {}


def message(name: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as a message type under a stable wire ``name``."""

    def register(cls: type[T]) -> type[T]:
        register_message(name, cls)
        return cls

    return register


def register_message(name: str, cls: type) -> None:
    """Register ``cls`` (a frozen dataclass) under ``name``; names are unique."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__qualname__} must be a frozen dataclass")
    existing = _registry.get(name)
    if existing is not None and existing is not cls:
        raise TypeError(f"message name {name!r} already used by {existing.__qualname__}")
    _registry[name] = cls
    _names[cls] = name


def message_name(cls: type) -> str:
    """The wire name under which ``cls`` was registered."""
    try:
        return _names[cls]
    except KeyError:
        raise TypeError(f"{cls.__qualname__} is not a registered message") from None


def encode(value: Any) -> Any:
    """Turn a dataclass instance (or any supported value) into msgpack-ready values."""
    return _encoder_for(type(value))(value)


def encode_tagged(value: Any) -> list[Any]:
    """Encode a registered message as ``[name, fields]`` so it can be decoded by name."""
    message_name(type(value))  # a TypeError for a class that is not registered
    encoded: list[Any] = _encode_any(value)
    return encoded


def decode(annotation: Any, raw: Any, where: str = "message") -> Any:
    """Validate ``raw`` (as made by :func:`encode`) against ``annotation``.

    A mismatch raises :class:`SchemaError` whose message names the path of
    the offending value under ``where`` (``message.attr.mode: expected int``).
    """
    decoder = (
        _dataclass_decoder_cached(annotation)
        if dataclasses.is_dataclass(annotation)
        else _decoder_for(annotation)
    )
    try:
        return decoder(raw)
    except SchemaError as error:
        raise _final(error, where) from None
    except Exception as error:
        # Raw input is a peer's: nothing it holds may raise anything but SchemaError
        # (an unhashable map key, say, fails in the dict being built).
        raise SchemaError(f"{where}: {type(error).__name__}: {error}") from None


def decode_tagged(raw: Any, allowed: tuple[type, ...] | None = None) -> Any:
    """Decode ``[name, fields]`` produced by :func:`encode_tagged`.

    ``allowed`` restricts which registered classes are acceptable here.
    """
    if not isinstance(raw, (list, tuple)) or len(raw) != 2 or not isinstance(raw[0], str):
        raise SchemaError("tagged message: expected [name, fields]")
    cls = _registry.get(raw[0])
    if cls is None or (allowed is not None and cls not in allowed):
        raise SchemaError(f"unknown message type {raw[0][:64]!r}")
    try:
        return _dataclass_decoder_cached(cls)(raw[1])
    except SchemaError as error:
        raise _final(error, raw[0]) from None
    except Exception as error:  # as in decode()
        raise SchemaError(f"{raw[0]}: {type(error).__name__}: {error}") from None


def _final(error: SchemaError, where: str) -> SchemaError:
    """The error a caller sees: ``where`` plus the path, then the reason."""
    return SchemaError(f"{where}{error.path}: {error.reason}")


@dataclasses.dataclass(frozen=True)
class Method(Generic[Req, Rep]):
    """One RPC method: its wire name and its request and reply types.

    ``carries_payload`` / ``returns_payload`` say whether a bulk byte payload
    travels beside the request or the reply (chunk data does; it bypasses
    msgpack so that megabytes are not copied into the header).  A ``one_way``
    method is sent with ``RpcConnection.notify`` and never answered (its
    ``reply`` type is ``type(None)``): for streams of messages that tolerate
    loss, like the consensus messages between metaservers.
    """

    name: str
    request: type[Req]
    reply: type[Rep]
    carries_payload: bool = False
    returns_payload: bool = False
    one_way: bool = False


# ---------------------------------------------------------------- encoders


_PLAIN_TYPES = frozenset({int, str, bytes, bool, float, type(None)})
"""Values msgpack packs as they are (exact types: an IntEnum goes by its encoder)."""

_tagged_encoders: dict[type, Encoder] = {}


def _identity(value: Any) -> Any:
    return value


def _encoder_for(tp: type) -> Encoder:
    encoder = _encoders.get(tp)
    if encoder is None:
        encoder = _build_encoder(tp)
        _encoders[tp] = encoder
    return encoder


def _build_encoder(tp: type) -> Encoder:
    if dataclasses.is_dataclass(tp):
        return _compile_dataclass_encoder(tp, None)
    if issubclass(tp, enum.Enum):
        return lambda value: value.value
    if tp in _PLAIN_TYPES:
        return _identity
    if issubclass(tp, (bytearray, memoryview)):
        return bytes
    if issubclass(tp, (list, tuple)):
        return lambda value: [v if type(v) in _PLAIN_TYPES else _encode_any(v) for v in value]
    if issubclass(tp, dict):
        return lambda value: {_encode_any(k): _encode_any(v) for k, v in value.items()}
    raise TypeError(f"cannot encode values of type {tp.__qualname__}")


def _compile_dataclass_encoder(cls: type, tag: str | None) -> Encoder:
    """One generated function per class: ``value -> [field, ...]`` (``[tag, [field, ...]]``
    with a ``tag``), each field read inline and passed through as is when plain.  Encoding
    runs for every message sent and every command logged, and a generated body costs a
    third of a loop over the fields."""
    items = ", ".join(
        f"(_v if type(_v := value.{field.name}) in _plain else _encode_any(_v))"
        for field in dataclasses.fields(cls)
    )
    body = f"[_tag, [{items}]]" if tag is not None else f"[{items}]"
    scope: dict[str, Any] = {"_plain": _PLAIN_TYPES, "_encode_any": _encode_any, "_tag": tag}
    exec(f"def encode(value):\n    return {body}\n", scope)
    encoder: Encoder = scope["encode"]
    return encoder


def _encode_any(value: Any) -> Any:
    tp = type(value)
    if tp in _PLAIN_TYPES:
        return value
    encoder = _tagged_encoders.get(tp)
    if encoder is not None:
        return encoder(value)
    name = _names.get(tp)
    if name is not None:
        # A nested registered message is tagged, so a field may hold one of
        # several message types; plain dataclasses nest positionally.
        encoder = _tagged_encoders[tp] = _compile_dataclass_encoder(tp, name)
        return encoder(value)
    return _encoder_for(tp)(value)


# ---------------------------------------------------------------- decoders
#
# A decoder takes the raw value and returns the typed one.  Nothing is spent
# on error context while input is valid: a failing decoder raises a
# SchemaError, and each enclosing container prepends its field name to the
# error's path on the way out.


def _decoder_for(annotation: Any) -> Decoder:
    decoder = _decoders.get(annotation)
    if decoder is None:
        decoder = _build_decoder(annotation)
        _decoders[annotation] = decoder
    return decoder


def _fail(expected: str, raw: Any) -> typing.NoReturn:
    raise SchemaError(f"expected {expected}, got {type(raw).__name__}")


def _located(error: SchemaError, step: str) -> SchemaError:
    """``error`` with ``step`` prepended to the path of the value that failed."""
    return SchemaError(error.reason, step + error.path)


def _build_decoder(annotation: Any) -> Decoder:
    supertype = getattr(annotation, "__supertype__", None)
    if supertype is not None:  # NewType
        return _decoder_for(supertype)
    if annotation is type(None) or annotation is None:
        return _decode_none
    if annotation is bool:
        return _decode_bool
    if annotation is int:
        return _decode_int
    if annotation is float:
        return _decode_float
    if annotation is str:
        return _decode_str
    if annotation is bytes:
        return _decode_bytes
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_decoder(annotation)
    if dataclasses.is_dataclass(annotation):
        if annotation in _names:
            return _tagged_decoder((annotation,))
        return _dataclass_decoder(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _union_decoder(args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _sequence_decoder(_decoder_for(args[0]), tuple)
        return _fixed_tuple_decoder(tuple(_decoder_for(a) for a in args))
    if origin is list:
        return _sequence_decoder(_decoder_for(args[0]), list)
    if origin is dict:
        return _dict_decoder(_decoder_for(args[0]), _decoder_for(args[1]))
    raise TypeError(f"unsupported schema annotation {annotation!r}")


def _decode_none(raw: Any) -> None:
    if raw is not None:
        _fail("nil", raw)


def _decode_bool(raw: Any) -> bool:
    if type(raw) is not bool:
        _fail("bool", raw)
    return raw


def _decode_int(raw: Any) -> int:
    if type(raw) is not int:
        _fail("int", raw)
    return raw


def _decode_float(raw: Any) -> float:
    if type(raw) is float:
        return raw
    if type(raw) is int:
        return float(raw)
    _fail("float", raw)


def _decode_str(raw: Any) -> str:
    if type(raw) is not str:
        _fail("str", raw)
    return raw


def _decode_bytes(raw: Any) -> bytes:
    if type(raw) is not bytes:
        _fail("bytes", raw)
    return raw


# Scalar fields are checked inline in a dataclass decoder (no call per field).
_INLINE_TYPES: dict[Decoder, type] = {
    _decode_int: int,
    _decode_bytes: bytes,
    _decode_str: str,
    _decode_bool: bool,
}


def _enum_decoder(enum_type: type[enum.Enum]) -> Decoder:
    def decode_enum(raw: Any) -> enum.Enum:
        try:
            return enum_type(raw)
        except (ValueError, TypeError):
            raise SchemaError(f"{raw!r} is not a valid {enum_type.__name__}") from None

    return decode_enum


def _dataclass_decoder(cls: type) -> Decoder:
    """Decoder of ``cls`` from its list of field values.

    The first call compiles a function for the class (field decoders are resolved
    then, not now: a message may refer to itself): each field checked inline, the
    object built without the frozen ``__init__`` when that only stores the fields.
    Any failure is re-run through the field-by-field path, which locates the error.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = tuple(f.name for f in fields)
    count = len(fields)
    plan: list[tuple[type | None, Decoder]] = []
    compiled: list[Decoder] = []

    def decode_precisely(raw: Any) -> Any:
        if type(raw) is not list and type(raw) is not tuple:
            _fail(f"{cls.__name__} fields", raw)
        if len(raw) != count:
            raise SchemaError(f"{cls.__name__} has {count} fields, got {len(raw)}")
        values = []
        for index, item in enumerate(raw):
            exact, decoder = plan[index]
            if exact is not None and type(item) is exact:
                values.append(item)
                continue
            try:
                values.append(decoder(item))
            except SchemaError as error:
                raise _located(error, "." + names[index]) from None
        try:
            return cls(*values)
        except (ValueError, TypeError) as error:
            raise SchemaError(str(error)) from None
        except Exception as error:
            # The class's own checks (``__post_init__``) refused values the schema
            # allows; whatever they raise (PaxosInvariantError is an AssertionError),
            # the values came from a peer: a schema error, never a crash.
            raise SchemaError(f"{type(error).__name__}: {error}") from None

    def decode_dataclass(raw: Any) -> Any:
        if not compiled:
            for name in names:
                decoder = _decoder_for(hints[name])
                plan.append((_INLINE_TYPES.get(decoder), decoder))
            compiled.append(_compile_dataclass_decoder(cls, names, plan, decode_precisely))
        return compiled[0](raw)

    return decode_dataclass


def _compile_dataclass_decoder(
    cls: type,
    names: tuple[str, ...],
    plan: list[tuple[type | None, Decoder]],
    decode_precisely: Decoder,
) -> Decoder:
    scope: dict[str, Any] = {
        "_cls": cls,
        "_precisely": decode_precisely,
        "_SchemaError": SchemaError,
        "_new": object.__new__,
    }
    arguments = [f"_a{index}" for index in range(len(names))]
    checks = []
    for index, (exact, decoder) in enumerate(plan):
        scope[f"_d{index}"] = decoder
        if exact is not None:
            scope[f"_t{index}"] = exact
            checks.append(f"if type(_a{index}) is not _t{index}: _a{index} = _d{index}(_a{index})")
        else:
            checks.append(f"_a{index} = _d{index}(_a{index})")
    # A frozen dataclass __init__ stores each field through object.__setattr__; when it
    # does nothing else (no __post_init__, no slots, every field an init field), filling
    # the instance dict directly builds the same object at half the cost.
    plain = (
        not hasattr(cls, "__post_init__")
        and "__slots__" not in cls.__dict__
        and len(names) == len(dataclasses.fields(cls))
    )
    if plain:
        fields = ", ".join(f"{name!r}: {arg}" for name, arg in zip(names, arguments, strict=True))
        build = f"_o = _new(_cls)\n    _o.__dict__.update({{{fields}}})\n    return _o"
    else:
        build = (
            f"try:\n        return _cls({', '.join(arguments)})\n"
            "    except Exception:\n        return _precisely(_raw)"
        )
    unpack = f"{', '.join(arguments)}, = _raw" if arguments else "pass"
    body = "\n        ".join(checks) if checks else "pass"
    source = (
        "def decode(_raw):\n"
        "    if type(_raw) is not list and type(_raw) is not tuple:\n"
        "        return _precisely(_raw)\n"
        f"    if len(_raw) != {len(names)}:\n"
        "        return _precisely(_raw)\n"
        f"    {unpack}\n"
        "    try:\n"
        f"        {body}\n"
        "    except _SchemaError:\n"
        "        return _precisely(_raw)\n"
        f"    {build}\n"
    )
    exec(source, scope)
    compiled: Decoder = scope["decode"]
    return compiled


def _tagged_decoder(allowed: tuple[type, ...]) -> Decoder:
    def decode_one_of(raw: Any) -> Any:
        if type(raw) is not list or len(raw) != 2 or type(raw[0]) is not str:
            _fail("[name, fields]", raw)
        cls = _registry.get(raw[0])
        if cls is None or cls not in allowed:
            raise SchemaError(f"unexpected message type {raw[0][:64]!r}")
        try:
            return _dataclass_decoder_cached(cls)(raw[1])
        except SchemaError as error:
            raise _located(error, f"<{raw[0]}>") from None

    return decode_one_of


_plain_decoders: dict[type, Decoder] = {}


def _dataclass_decoder_cached(cls: type) -> Decoder:
    decoder = _plain_decoders.get(cls)
    if decoder is None:
        decoder = _dataclass_decoder(cls)
        _plain_decoders[cls] = decoder
    return decoder


def _union_decoder(args: tuple[Any, ...]) -> Decoder:
    allows_none = type(None) in args
    others = tuple(a for a in args if a is not type(None))
    # Registered messages travel tagged (see _encode_any); plain dataclasses do not.
    messages = tuple(a for a in others if a in _names)
    if messages and len(messages) == len(others):
        inner = _tagged_decoder(messages)
    elif len(others) == 1:
        inner = _decoder_for(others[0])
    else:
        raise TypeError(f"unsupported union {args!r}: only X | None or unions of messages")

    if not allows_none:
        return inner

    def decode_optional(raw: Any) -> Any:
        if raw is None:
            return None
        return inner(raw)

    return decode_optional


def _sequence_decoder(item: Decoder, container: type) -> Decoder:
    exact = _INLINE_TYPES.get(item)

    def decode_sequence(raw: Any) -> Any:
        if type(raw) is not list and type(raw) is not tuple:
            _fail("array", raw)
        if exact is not None and all(type(value) is exact for value in raw):
            return container(raw)
        values = []
        for index, value in enumerate(raw):
            try:
                values.append(item(value))
            except SchemaError as error:
                raise _located(error, f"[{index}]") from None
        return container(values)

    return decode_sequence


def _fixed_tuple_decoder(items: tuple[Decoder, ...]) -> Decoder:
    def decode_fixed(raw: Any) -> tuple[Any, ...]:
        if type(raw) is not list and type(raw) is not tuple:
            _fail("array", raw)
        if len(raw) != len(items):
            raise SchemaError(f"expected {len(items)} items, got {len(raw)}")
        values = []
        for index, (decoder, value) in enumerate(zip(items, raw, strict=True)):
            try:
                values.append(decoder(value))
            except SchemaError as error:
                raise _located(error, f"[{index}]") from None
        return tuple(values)

    return decode_fixed


def _dict_decoder(key: Decoder, value: Decoder) -> Decoder:
    def decode_dict(raw: Any) -> dict[Any, Any]:
        if type(raw) is not dict:
            _fail("map", raw)
        decoded = {}
        for k, v in raw.items():
            try:
                decoded[key(k)] = value(v)
            except SchemaError as error:
                raise _located(error, f"[{str(k)[:32]!r}]") from None
        return decoded

    return decode_dict
