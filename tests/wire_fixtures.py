"""Message types and servers shared by the wire tests."""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgpack
import trio

from wire import schema
from wire.address import Address
from wire.auth import authenticate_as_dialer
from wire.errors import RpcError
from wire.framing import DEFAULT_LIMITS, HANDSHAKE_LIMITS, FrameLimits, FrameReader, FrameWriter
from wire.rpc import CallContext, Deferred, Handlers, WithPayload
from wire.transport import bound_port, serve

KEY = b"test-cluster-key-0123456789abcdef"


@schema.message("test.value")
@dataclass(frozen=True)
class Value:
    number: int
    text: str = ""


ECHO = schema.Method("test.echo", Value, Value)
FAIL = schema.Method("test.fail", Value, Value)
CRASH = schema.Method("test.crash", Value, Value)
SLEEP = schema.Method("test.sleep", Value, Value)
BULK = schema.Method("test.bulk", Value, Value, carries_payload=True, returns_payload=True)
UNSERVED = schema.Method("test.unserved", Value, Value)
NOTE = schema.Method("test.note", Value, type(None), one_way=True)
"""One-way: the service records each note; a note with a negative number is refused."""
UNSERVED_NOTE = schema.Method("test.unserved_note", Value, type(None), one_way=True)
QUICK = schema.Method("test.quick", Value, Value)
"""Immediate: echoes like ECHO; a negative number raises its errno, zero crashes."""
LATER = schema.Method("test.later", Value, Value)
"""Immediate: the reply comes when the test settles ``service.later[number]``."""


class PickyRefusal(AssertionError):
    """What a message's own check raises on bad values (as PaxosInvariantError does):
    neither ValueError nor TypeError."""


@dataclass(frozen=True, slots=True)
class Voters:
    """A plain nested dataclass whose ``__post_init__`` refuses values the schema allows
    (like the Paxos Membership without voters)."""

    voters: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.voters:
            raise PickyRefusal("a membership needs at least one voter")


@schema.message("test.ballot")
@dataclass(frozen=True)
class Ballot:
    """A message holding a :class:`Voters` (like PaxosBatch holds a Membership)."""

    sender: int
    members: Voters


ELECT = schema.Method("test.elect", Ballot, Value)
"""Replies with the number of voters."""
ELECT_NOTE = schema.Method("test.elect_note", Ballot, type(None), one_way=True)
"""One-way: the service records each ballot."""


class EchoService:
    """Handlers that echo, fail on request, crash, sleep, and return payloads."""

    def __init__(self) -> None:
        self.sleeps_cancelled = 0
        self.sleeping = 0
        self.notes: list[int] = []
        self.later: dict[int, Deferred] = {}
        self.ballots: list[Ballot] = []

    async def echo(self, request: Value, _context: CallContext) -> Value:
        return Value(request.number + 1, request.text)

    async def fail(self, request: Value, _context: CallContext) -> Value:
        raise RpcError(request.number or errno.ENOENT, f"asked to fail: {request.text}")

    async def crash(self, request: Value, _context: CallContext) -> Value:
        raise ZeroDivisionError("handler bug")

    async def sleep(self, request: Value, _context: CallContext) -> Value:
        self.sleeping += 1
        try:
            await trio.sleep(request.number / 1000)
        except trio.Cancelled:
            self.sleeps_cancelled += 1
            raise
        finally:
            self.sleeping -= 1
        return request

    async def bulk(self, request: Value, context: CallContext) -> WithPayload[Value]:
        data = bytes(context.payload or b"")
        return WithPayload(Value(len(data)), data[::-1])

    async def note(self, request: Value, _context: CallContext) -> None:
        if request.number < 0:
            raise RpcError(errno.EINVAL, f"note {request.number} refused")
        self.notes.append(request.number)

    def quick(self, request: Value, _context: CallContext) -> Value:
        if request.number < 0:
            raise RpcError(-request.number, "quick refusal")
        if request.number == 0:
            raise ZeroDivisionError("handler bug")
        return Value(request.number + 1, request.text)

    def later_reply(self, request: Value, _context: CallContext) -> Deferred:
        def transform(number: int) -> Value:
            if number < 0:
                raise RpcError(-number, "refused later")
            return Value(number, request.text)

        deferred = Deferred(transform)
        self.later[request.number] = deferred
        return deferred

    async def elect(self, request: Ballot, _context: CallContext) -> Value:
        return Value(len(request.members.voters))

    async def elect_note(self, request: Ballot, _context: CallContext) -> None:
        self.ballots.append(request)

    def handlers(self) -> Handlers:
        handlers = Handlers()
        handlers.register(ECHO, self.echo)
        handlers.register(FAIL, self.fail)
        handlers.register(CRASH, self.crash)
        handlers.register(SLEEP, self.sleep)
        handlers.register(BULK, self.bulk)
        handlers.register(NOTE, self.note)
        handlers.register_immediate(QUICK, self.quick)
        handlers.register_immediate(LATER, self.later_reply)
        handlers.register(ELECT, self.elect)
        handlers.register(ELECT_NOTE, self.elect_note)
        return handlers


@asynccontextmanager
async def running_server(
    service: EchoService | None = None,
    *,
    key: bytes = KEY,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> AsyncIterator[Address]:
    """Serve ``service`` on 127.0.0.1 (a free port) for the duration of the block."""
    service = service or EchoService()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve(
                service.handlers(),
                key,
                Address("127.0.0.1", 0),
                limits=limits,
                task_status=task_status,
            )
        )
        yield Address("127.0.0.1", bound_port(listeners))
        nursery.cancel_scope.cancel()


def raw_frame(header: object, payload: bytes = b"") -> bytes:
    """The bytes of one frame, built by hand (to send what the real writer never would)."""
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">II", len(packed), len(payload)) + packed + payload


async def authenticated_raw_socket(address: Address) -> trio.SocketStream:
    """A stream past the handshake, on which a test writes raw frames."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    await authenticate_as_dialer(
        FrameReader(stream, HANDSHAKE_LIMITS), FrameWriter(stream), KEY, "raw"
    )
    return stream
