"""The RPC layer over real loopback TCP: concurrency, errors, deadlines, dead peers."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import msgpack
import pytest
import trio

from tests.wire_fixtures import (
    BULK,
    CRASH,
    ECHO,
    ELECT,
    ELECT_NOTE,
    FAIL,
    KEY,
    LATER,
    NOTE,
    QUICK,
    SLEEP,
    UNSERVED,
    UNSERVED_NOTE,
    Ballot,
    EchoService,
    PickyRefusal,
    Value,
    authenticated_raw_socket,
    raw_frame,
    running_server,
)
from wire import schema
from wire.errors import ConnectionLost, RpcError
from wire.transport import open_connection


async def test_a_call_returns_the_handlers_reply() -> None:
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        assert await conn.call(ECHO, Value(41, "x")) == Value(42, "x")


async def test_hundreds_of_concurrent_calls_on_one_connection_each_get_their_own_reply() -> None:
    results: dict[int, Value] = {}
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:

        async def one(number: int) -> None:
            # Sleeps of different lengths make replies come back out of order.
            await conn.call(SLEEP, Value(number % 7))
            results[number] = await conn.call(ECHO, Value(number))

        async with trio.open_nursery() as nursery:
            for number in range(500):
                nursery.start_soon(one, number)
    assert results == {n: Value(n + 1) for n in range(500)}


async def test_a_handler_error_reaches_the_caller_with_its_errno() -> None:
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(FAIL, Value(errno.EEXIST, "already"))
        assert caught.value.code == errno.EEXIST
        assert "already" in caught.value.message
        assert await conn.call(ECHO, Value(1)) == Value(2)


async def test_an_unexpected_handler_exception_is_eio_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(CRASH, Value(0))
        assert caught.value.code == errno.EIO
        assert await conn.call(ECHO, Value(1)) == Value(2)
    assert "ZeroDivisionError" in caplog.text


async def test_an_unknown_method_is_enosys() -> None:
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(UNSERVED, Value(0))
        assert caught.value.code == errno.ENOSYS


@pytest.mark.parametrize(
    "body",
    [[], [1, "x", "extra"], ["not an int", "x"], [True, "x"], None, {"number": 1}],
)
async def test_a_request_body_that_breaks_its_schema_is_eproto(body: object) -> None:
    wrong = schema.Method("test.echo", _RawBody, Value)
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(wrong, _RawBody(body))
        assert caught.value.code == errno.EPROTO
        assert await conn.call(ECHO, Value(1)) == Value(2)


class _RawBody:
    """A request whose encoding is whatever raw value it wraps (to send bad bodies)."""

    def __init__(self, raw: object) -> None:
        self.raw = raw


schema._encoders[_RawBody] = lambda value: value.raw


async def test_a_deadline_fails_the_call_with_etimedout_and_cancels_the_handler() -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(SLEEP, Value(10_000), timeout_s=0.2)
        assert caught.value.code == errno.ETIMEDOUT
        with trio.fail_after(5):
            while service.sleeps_cancelled < 1:
                await trio.sleep(0.01)
        assert await conn.call(ECHO, Value(1)) == Value(2)


async def test_the_server_ends_a_handler_at_the_callers_deadline_without_a_cancel() -> None:
    """A caller that vanishes without sending CANCEL (or never would): the deadline in its
    request still bounds the handler, which gets cancelled and answers ETIMEDOUT."""
    from wire.rpc import ERROR, REQUEST

    service = EchoService()
    async with running_server(service) as address:
        raw = await authenticated_raw_socket(address)
        started = trio.current_time()
        await raw.send_all(raw_frame([REQUEST, 1, "test.sleep", [60_000, ""], 200]))
        with trio.fail_after(5):
            while service.sleeps_cancelled < 1:
                await trio.sleep(0.01)
        assert trio.current_time() - started >= 0.2
        with trio.fail_after(5):
            data = await raw.receive_some(65536)
        header = msgpack.unpackb(data[8:])
        assert header[:3] == [ERROR, 1, errno.ETIMEDOUT]
        await raw.aclose()


async def test_cancelling_a_caller_cancels_the_remote_handler() -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        with trio.move_on_after(0.2):
            await conn.call(SLEEP, Value(10_000))
        with trio.fail_after(5):
            while service.sleeps_cancelled < 1:
                await trio.sleep(0.01)


async def test_bulk_payloads_travel_both_ways_intact() -> None:
    data = bytes(range(256)) * (4 * 4096 + 3)
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        reply, payload = await conn.call_with_payload(BULK, Value(0), payload=memoryview(data))
    assert reply == Value(len(data))
    assert payload is not None and bytes(payload) == data[::-1]


async def _wait_for_eof(stream: trio.SocketStream) -> None:
    with trio.fail_after(5):
        while await stream.receive_some(65536):
            pass


async def test_more_calls_in_flight_than_the_limit_closes_only_that_connection() -> None:
    from wire.rpc import CALLS_IN_FLIGHT_MAX, REQUEST

    async with running_server() as address:
        raw = await authenticated_raw_socket(address)
        frames = b"".join(
            raw_frame([REQUEST, call_id, "test.sleep", [60_000, ""], None])
            for call_id in range(1, CALLS_IN_FLIGHT_MAX + 2)
        )
        async with open_connection(address, KEY, name="bystander") as bystander:
            await raw.send_all(frames)
            await _wait_for_eof(raw)
            assert await bystander.call(ECHO, Value(7)) == Value(8)


async def test_exactly_the_in_flight_limit_is_served() -> None:
    from wire.rpc import CALLS_IN_FLIGHT_MAX, REPLY, REQUEST

    async with running_server() as address:
        raw = await authenticated_raw_socket(address)
        frames = b"".join(
            raw_frame([REQUEST, call_id, "test.sleep", [200, ""], None])
            for call_id in range(1, CALLS_IN_FLIGHT_MAX + 1)
        )
        await raw.send_all(frames)
        unpacker_input = bytearray()
        replies = 0
        with trio.fail_after(20):
            while replies < CALLS_IN_FLIGHT_MAX:
                data = await raw.receive_some(1 << 20)
                assert data, "server closed a connection that stayed within the limit"
                unpacker_input += data
                while len(unpacker_input) >= 8:
                    header_length, payload_length = struct.unpack_from(">II", unpacker_input)
                    end = 8 + header_length + payload_length
                    if len(unpacker_input) < end:
                        break
                    header = msgpack.unpackb(bytes(unpacker_input[8 : 8 + header_length]))
                    assert header[0] == REPLY
                    replies += 1
                    del unpacker_input[:end]
        await raw.aclose()


async def test_a_garbage_frame_closes_that_connection_and_no_other() -> None:
    async with running_server() as address:
        raw = await authenticated_raw_socket(address)
        async with open_connection(address, KEY, name="bystander") as bystander:
            await raw.send_all(struct.pack(">II", 5, 0) + b"\xc1\xc1\xc1\xc1\xc1")
            await _wait_for_eof(raw)
            assert await bystander.call(ECHO, Value(1)) == Value(2)


async def test_a_stranger_speaking_no_protocol_is_dropped() -> None:
    async with running_server() as address:
        stranger = await trio.open_tcp_stream(address.host, address.port)
        await stranger.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await _wait_for_eof(stranger)
        async with open_connection(address, KEY, name="after") as conn:
            assert await conn.call(ECHO, Value(1)) == Value(2)


async def test_one_way_messages_reach_the_handler_in_order_without_replies() -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        for number in range(100):
            await conn.notify(NOTE, Value(number))
        assert await conn.call(ECHO, Value(1)) == Value(2)  # the notes were read before it
        assert service.notes == list(range(100))


@pytest.mark.parametrize("method", [NOTE, UNSERVED_NOTE])
async def test_a_refused_or_unknown_one_way_message_closes_the_connection_with_a_reason(
    method: schema.Method[Value, None], caplog: pytest.LogCaptureFixture
) -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        await conn.notify(method, Value(-1))
        with trio.fail_after(5):
            await conn.wait_closed()
        with pytest.raises(ConnectionLost):
            await conn.notify(NOTE, Value(1))
        async with open_connection(address, KEY, name="t") as other:
            assert await other.call(ECHO, Value(1)) == Value(2)
    assert service.notes == []
    assert "refused" in caplog.text or "no one-way method" in caplog.text


async def test_a_call_to_a_one_way_method_is_eproto_and_a_notify_of_a_call_is_a_bug() -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(NOTE, Value(1))
        assert caught.value.code == errno.EPROTO
        with pytest.raises(AssertionError):
            await conn.notify(ECHO, Value(1))
        assert service.notes == []


async def test_an_immediate_handler_answers_with_its_reply_or_its_errno(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        assert await conn.call(QUICK, Value(1, "x")) == Value(2, "x")
        with pytest.raises(RpcError) as refused:
            await conn.call(QUICK, Value(-errno.EEXIST))
        assert refused.value.code == errno.EEXIST
        with pytest.raises(RpcError) as crashed:
            await conn.call(QUICK, Value(0))
        assert crashed.value.code == errno.EIO
        with pytest.raises(RpcError) as malformed:
            await conn.call(schema.Method("test.quick", str, Value), "not a Value")
        assert malformed.value.code == errno.EPROTO
        assert await conn.call(QUICK, Value(5)) == Value(6)
    assert "ZeroDivisionError" in caplog.text


async def test_a_deferred_reply_arrives_when_settled_in_any_order() -> None:
    service = EchoService()
    results: dict[int, object] = {}
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:

        async def one(number: int) -> None:
            try:
                results[number] = await conn.call(LATER, Value(number, str(number)))
            except RpcError as error:
                results[number] = error.code

        async with trio.open_nursery() as nursery:
            for number in range(3):
                nursery.start_soon(one, number)
            with trio.fail_after(5):
                while len(service.later) < 3:
                    await trio.sleep(0.01)
            assert results == {}
            service.later[2].resolve(20)
            service.later[0].fail(RpcError(errno.EAGAIN, "busy"))
            service.later[1].resolve(-errno.ENOENT)
            service.later[1].resolve(99)  # settled already: ignored
    assert results == {2: Value(20, "2"), 0: errno.EAGAIN, 1: errno.ENOENT}


async def test_a_caller_that_gives_up_on_a_deferred_reply_frees_its_slot() -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(LATER, Value(1), timeout_s=0.1)
        assert caught.value.code == errno.ETIMEDOUT
        with trio.fail_after(5):
            while service.later[1]._callback is not None:  # the CANCEL detaches the reply
                await trio.sleep(0.01)
        service.later[1].resolve(1)  # too late: nobody is told
        assert await conn.call(QUICK, Value(1)) == Value(2)


async def test_a_task_can_wait_for_a_deferred() -> None:
    from wire.rpc import Deferred

    deferred = Deferred(lambda value: value * 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _settle_soon(deferred))
        assert await deferred.wait() == 42
    failed = Deferred()
    failed.fail(RpcError(errno.EIO, "x"))
    with pytest.raises(RpcError):
        await failed.wait()


async def _settle_soon(deferred: object) -> None:
    await trio.sleep(0.01)
    deferred.resolve(21)  # type: ignore[attr-defined]


async def test_a_short_deadline_behind_a_long_one_ends_on_time() -> None:
    from wire.rpc import DEADLINE_GRANULARITY_S

    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: conn.call(SLEEP, Value(10_000), timeout_s=10.0))
            await trio.sleep(0.05)
            started = trio.current_time()
            with pytest.raises(RpcError) as caught:
                await conn.call(SLEEP, Value(10_000), timeout_s=0.1)
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
        assert caught.value.code == errno.ETIMEDOUT
        assert 0.1 <= elapsed < 0.1 + DEADLINE_GRANULARITY_S + 0.2
        assert await conn.call(ECHO, Value(1), timeout_s=0.5) == Value(2)


@pytest.mark.parametrize("code", [2**40, 2**31, -(2**31) - 1, 2**64 - 1, -(2**63)])
async def test_an_error_envelope_with_a_code_beyond_a_c_int_closes_only_that_connection(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Such a code once reached os.strerror (for the empty message) and its
    OverflowError killed the server."""
    from wire.rpc import ERROR

    async with running_server() as address:
        raw = await authenticated_raw_socket(address)
        async with open_connection(address, KEY, name="bystander") as bystander:
            await raw.send_all(raw_frame([ERROR, 1, code, ""]))
            await _wait_for_eof(raw)
            assert await bystander.call(ECHO, Value(7)) == Value(8)
        async with open_connection(address, KEY, name="after") as after:
            assert await after.call(ECHO, Value(1)) == Value(2)
    closings = [r for r in caplog.records if "closing connection" in r.getMessage()]
    assert len(closings) == 1
    assert "error code" in closings[0].getMessage()


async def test_a_handler_error_code_beyond_a_c_int_is_sent_as_eio(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(FAIL, Value(2**40, "huge"))
        assert caught.value.code == errno.EIO
        assert str(2**40) in caught.value.message
        assert await conn.call(ECHO, Value(1)) == Value(2)
    assert "cannot be sent" in caplog.text


async def test_a_request_that_fails_its_messages_own_check_is_eproto() -> None:
    """A body the schema accepts but the message's __post_init__ refuses (a Paxos batch
    whose membership has no voters) once escaped the decoder and killed the server."""
    bad = schema.Method("test.elect", _RawBody, Value)
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(bad, _RawBody([1, [[]]]))
        assert caught.value.code == errno.EPROTO
        assert "at least one voter" in caught.value.message
        assert await conn.call(ELECT, _ballot(2)) == Value(2)


def _ballot(voters: int) -> Ballot:
    from tests.wire_fixtures import Voters

    return Ballot(7, Voters(tuple(range(voters))))


async def test_a_one_way_message_that_fails_its_own_check_closes_only_that_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from wire.rpc import NOTIFY

    service = EchoService()
    async with running_server(service) as address:
        raw = await authenticated_raw_socket(address)
        async with open_connection(address, KEY, name="bystander") as bystander:
            await raw.send_all(raw_frame([NOTIFY, "test.elect_note", [1, [[]]]]))
            await _wait_for_eof(raw)
            assert await bystander.call(ECHO, Value(7)) == Value(8)
            await bystander.notify(ELECT_NOTE, _ballot(1))
            assert await bystander.call(ECHO, Value(1)) == Value(2)
        async with open_connection(address, KEY, name="after") as after:
            assert await after.call(ELECT, _ballot(3)) == Value(3)
    assert service.ballots == [_ballot(1)]
    closings = [r for r in caplog.records if "closing connection" in r.getMessage()]
    assert len(closings) == 1 and "at least one voter" in closings[0].getMessage()


@dataclass(frozen=True)
class _EvenOnly:
    """Read in place of the echo's Value: a reply whose own check refuses odd numbers."""

    number: int
    text: str

    def __post_init__(self) -> None:
        if self.number % 2:
            raise PickyRefusal(f"{self.number} is odd")


async def test_a_reply_that_fails_its_own_check_is_eproto_for_the_caller() -> None:
    refusing = schema.Method("test.echo", Value, _EvenOnly)
    async with running_server() as address, open_connection(address, KEY, name="t") as conn:
        assert await conn.call(refusing, Value(1)) == _EvenOnly(2, "")
        with pytest.raises(RpcError) as caught:
            await conn.call(refusing, Value(2))
        assert caught.value.code == errno.EPROTO
        assert "3 is odd" in caught.value.message
        assert await conn.call(ECHO, Value(1)) == Value(2)


class _SloppyService(EchoService):
    """Handlers whose replies cannot be sent: one schema.encode refuses, one msgpack
    cannot pack (an int past 64 bits); as task, immediate and deferred handlers."""

    async def unencodable(self, request: Value, _context: object) -> object:
        return object()

    async def unpackable(self, request: Value, _context: object) -> Value:
        return Value(2**70)

    def unpackable_now(self, request: Value, _context: object) -> Value:
        return Value(2**70)

    def handlers(self):  # type: ignore[no-untyped-def]
        handlers = super().handlers()
        handlers.register(SLOPPY_ENCODE, self.unencodable)
        handlers.register(SLOPPY_PACK, self.unpackable)
        handlers.register_immediate(SLOPPY_NOW, self.unpackable_now)
        return handlers


SLOPPY_ENCODE = schema.Method("test.sloppy_encode", Value, Value)
SLOPPY_PACK = schema.Method("test.sloppy_pack", Value, Value)
SLOPPY_NOW = schema.Method("test.sloppy_now", Value, Value)


@pytest.mark.parametrize("method", [SLOPPY_ENCODE, SLOPPY_PACK, SLOPPY_NOW])
async def test_a_reply_that_cannot_be_sent_is_eio_and_the_server_keeps_serving(
    method: schema.Method[Value, Value], caplog: pytest.LogCaptureFixture
) -> None:
    service = _SloppyService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        with pytest.raises(RpcError) as caught:
            await conn.call(method, Value(1))
        assert caught.value.code == errno.EIO
        assert await conn.call(ECHO, Value(1)) == Value(2)
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)


async def test_a_deferred_reply_that_cannot_be_sent_is_eio_and_its_settler_is_unharmed() -> None:
    service = EchoService()
    async with running_server(service) as address, open_connection(address, KEY, name="t") as conn:
        async with trio.open_nursery() as nursery:
            outcome: list[object] = []

            async def call() -> None:
                try:
                    outcome.append(await conn.call(LATER, Value(1)))
                except RpcError as error:
                    outcome.append(error.code)

            nursery.start_soon(call)
            with trio.fail_after(5):
                while 1 not in service.later:
                    await trio.sleep(0.01)
            service.later[1].resolve(2**70)  # must not raise here, in the settler
        assert outcome == [errno.EIO]
        assert await conn.call(ECHO, Value(1)) == Value(2)


async def test_a_bug_in_the_receive_path_closes_only_that_connection_with_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The per-connection safety net of serve(): whatever escapes a connection is
    logged at error level with its traceback and the peer's address, and costs only
    that connection."""
    from wire.rpc import RpcConnection

    dispatch = RpcConnection._dispatch

    def buggy_dispatch(self, nursery, header, payload):  # type: ignore[no-untyped-def]
        if header == ["boom"]:
            raise RuntimeError("a bug in dispatch")
        return dispatch(self, nursery, header, payload)

    monkeypatch.setattr(RpcConnection, "_dispatch", buggy_dispatch)
    async with running_server() as address:
        raw = await authenticated_raw_socket(address)
        local = raw.socket.getsockname()
        async with open_connection(address, KEY, name="bystander") as bystander:
            await raw.send_all(raw_frame(["boom"]))
            await _wait_for_eof(raw)
            assert await bystander.call(ECHO, Value(7)) == Value(8)
        async with open_connection(address, KEY, name="after") as after:
            assert await after.call(ECHO, Value(1)) == Value(2)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert f"{local[0]}:{local[1]}" in errors[0].getMessage()
    assert "a bug in dispatch" in errors[0].getMessage()
    assert errors[0].exc_info is not None


async def test_a_bug_in_the_handshake_closes_only_that_connection_with_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wire.transport

    authenticate = wire.transport.authenticate_as_listener
    calls = []

    async def buggy_once(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug in the handshake")
        return await authenticate(*args)

    monkeypatch.setattr(wire.transport, "authenticate_as_listener", buggy_once)
    async with running_server() as address:
        stream = await trio.open_tcp_stream(address.host, address.port)
        await _wait_for_eof(stream)
        async with open_connection(address, KEY, name="after") as after:
            assert await after.call(ECHO, Value(1)) == Value(2)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "a bug in the handshake" in errors[0].getMessage()
