"""Multiplexed RPC over one authenticated connection.

Either end of a connection may call methods the other end registered: many
calls run concurrently on one connection, each with a request id, a deadline
and cancellation.  Envelopes (the frame header) are msgpack lists::

    [REQUEST, call_id, method_name, body, timeout_ms | None]
    [REPLY,   call_id, body]
    [ERROR,   call_id, errno_code, message]
    [CANCEL,  call_id]
    [NOTIFY,  method_name, body]

``body`` is the request or reply dataclass encoded by :mod:`wire.schema`;
bulk data travels as the frame payload beside it.  ``NOTIFY`` carries a
one-way message (a :class:`~wire.schema.Method` declared ``one_way``): no
reply, no call id; the receiver runs its handler in the reading task, in
arrival order, before it reads the next frame (so a slow handler slows its
sender down through TCP instead of piling up tasks).

Failure rules:

* a malformed frame, an envelope of the wrong shape (an ERROR's code must
  be a C int: ``ERROR_CODE_MIN`` to ``ERROR_CODE_MAX``), or more than
  ``calls_in_flight_max`` requests from the peer at once close the connection
  with a logged reason;
* an unknown method (ENOSYS), a body that does not match its schema (EPROTO)
  or a handler that raises get an error reply; the connection stays up;
* a handler's unexpected exception, or a reply that cannot be encoded, is
  logged with its traceback and becomes EIO: it never takes the process down;
* when the connection dies, every call still waiting fails at once with
  :class:`~wire.errors.ConnectionLost`;
* a one-way message cannot be answered, so anything wrong with it (unknown
  or two-way method, bad body, a handler that raises) closes the connection
  with a logged reason; a REQUEST for a one-way method gets EPROTO.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from wire import schema
from wire.errors import (
    ERROR_CODE_MAX,
    ERROR_CODE_MIN,
    ConnectionLost,
    ProtocolError,
    RpcError,
)
from wire.framing import FrameReader, FrameWriter, OutgoingPayload, Payload
from wire.invariant import invariant

log = logging.getLogger(__name__)

REQUEST, REPLY, ERROR, CANCEL, NOTIFY = 0, 1, 2, 3, 4
CALLS_IN_FLIGHT_MAX = 1024
ERROR_MESSAGE_CHARS_MAX = 1024
DEADLINE_GRANULARITY_S = 0.05
"""A call's ``timeout_s`` ends within this much after it passes, on both ends.  Deadlines
are kept in buckets of this width that one timer task per connection sweeps, instead of
a deadline on a cancel scope per call (registering one costs several us per call)."""

FRAMES_PER_YIELD = 16
"""The read loop lets other tasks run after this many frames (a receive from the socket
yields too).  A burst of calls read in one receive is then answered in parts: the first
replies leave, and the peer works on them, while the rest are still being served,
instead of the two ends taking turns on whole bursts.  With 64 calls in flight on one
connection that raised calls/s 1.4-1.9x in alternating runs (8 did as well, 32 less)."""

Req = TypeVar("Req")
Rep = TypeVar("Rep")


@dataclass(frozen=True)
class WithPayload(Generic[Rep]):
    """A handler's reply together with bulk bytes sent beside it (bytes, or a range of
    a file that the connection sends with ``sendfile``)."""

    reply: Rep
    payload: OutgoingPayload


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about the call: the connection it arrived on."""

    connection: RpcConnection
    payload: Payload | None


Handler = Callable[[Any, CallContext], Awaitable[Any]]
ImmediateHandler = Callable[[Any, CallContext], Any]
"""A handler that never blocks: it returns the reply, raises RpcError, or returns a
:class:`Deferred` that someone settles later."""


class Deferred:
    """A result promised now and given later, by whoever holds it, without awaiting.

    Settled once, synchronously, from any task: :meth:`resolve` passes the value through
    ``transform`` (run at that moment; an RpcError it raises fails the Deferred instead),
    :meth:`fail` sets an error; later settlements are ignored.  A task may ``await``
    :meth:`wait`; the RPC layer instead attaches a callback and sends the reply from
    there, so that a call served this way costs no task, cancel scope or event.
    """

    __slots__ = ("_transform", "_callback", "_task", "done", "value", "error")

    def __init__(self, transform: Callable[[Any], Any] | None = None) -> None:
        self._transform = transform
        self._callback: Callable[[Deferred], None] | None = None
        self._task: trio.lowlevel.Task | None = None
        self.done = False
        self.value: Any = None
        self.error: RpcError | None = None

    def resolve(self, value: Any) -> None:
        if self.done:
            return
        if self._transform is not None:
            try:
                value = self._transform(value)
            except RpcError as error:
                self._settle(None, error)
                return
            except Exception:
                log.exception("completing a deferred reply failed")
                self._settle(None, RpcError(errno.EIO, "internal error"))
                return
        self._settle(value, None)

    def fail(self, error: RpcError) -> None:
        if not self.done:
            self._settle(None, error)

    def _settle(self, value: Any, error: RpcError | None) -> None:
        self.done = True
        self.value = value
        self.error = error
        if self._task is not None:
            trio.lowlevel.reschedule(self._task)
            self._task = None
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(self)

    def set_callback(self, callback: Callable[[Deferred], None] | None) -> None:
        """Call ``callback(self)`` once settled (at once if it is); None detaches."""
        self._callback = callback
        if callback is not None and self.done:
            self._callback = None
            callback(self)

    async def wait(self) -> Any:
        """The value, once settled; raises the error it was failed with."""
        if not self.done:
            await _park(self)
        else:
            await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return self.value


def _error_envelope(error: RpcError) -> list[Any]:
    """The ERROR envelope (without its call id) that answers a call with ``error``.

    A code the peer would refuse (not a C int) is a bug here: logged, and sent as EIO.
    """
    code = error.code
    if type(code) is not int or not ERROR_CODE_MIN <= code <= ERROR_CODE_MAX:
        log.error("an RpcError with code %r cannot be sent; answering EIO", code)
        return [ERROR, errno.EIO, f"error code {code!r}: {error.message}"[:ERROR_MESSAGE_CHARS_MAX]]
    return [ERROR, code, error.message[:ERROR_MESSAGE_CHARS_MAX]]


def _unsendable(envelope: list[Any]) -> list[Any]:
    """The EIO envelope that replaces a reply ``[kind, call_id, ...]`` msgpack could not
    pack (an int past 64 bits, say): a local bug, logged with the exception being handled.
    Nothing of the bad frame was queued (the writer packs before it queues)."""
    log.exception("the reply to call %s could not be sent", envelope[1])
    return [ERROR, envelope[1], errno.EIO, "internal error: the reply could not be encoded"]


async def _park(waiting: Deferred | _PendingCall) -> None:
    """Sleep until whoever settles ``waiting`` reschedules the task it records in
    ``_task`` (cancellation simply forgets the task)."""
    waiting._task = trio.lowlevel.current_task()

    def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
        waiting._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


@dataclass(frozen=True, slots=True)
class _Entry:
    method: schema.Method[Any, Any]
    handler: Any
    immediate: bool


class Handlers:
    """The methods one end of a connection serves, declared by :class:`schema.Method`."""

    def __init__(self) -> None:
        self._table: dict[str, _Entry] = {}

    def register(self, method: schema.Method[Req, Rep], handler: Handler) -> None:
        """Serve ``method`` with an async ``handler``: each call runs in a task of its own,
        cancelled by the caller's CANCEL or once the caller's deadline has passed (within
        ``DEADLINE_GRANULARITY_S``)."""
        self._add(_Entry(method, handler, immediate=False))

    def register_immediate(
        self, method: schema.Method[Req, Rep], handler: ImmediateHandler
    ) -> None:
        """Serve ``method`` with a plain function run by the reading task, which returns
        the reply, raises RpcError, or returns a :class:`Deferred` settled later.

        For the hottest calls (no task per call).  The caller's deadline is not enforced
        here: a caller that gives up sends CANCEL, which answers ETIMEDOUT and drops the
        Deferred's eventual result.  No reply payload.
        """
        self._add(_Entry(method, handler, immediate=True))

    def _add(self, entry: _Entry) -> None:
        if entry.method.name in self._table:
            raise ValueError(f"method {entry.method.name} registered twice")
        self._table[entry.method.name] = entry

    def lookup(self, name: str) -> _Entry | None:
        return self._table.get(name)


NO_HANDLERS = Handlers()


class _PendingCall:
    """One outstanding call: the waiting task is parked directly on trio's
    scheduler (cheaper than an Event, which matters at tens of thousands of
    calls per second)."""

    __slots__ = ("name", "finished", "outcome", "payload", "_task")

    def __init__(self, name: str) -> None:
        self.name = name
        self.finished = False
        self.outcome: Any = None
        self.payload: Payload | None = None
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        await _park(self)

    def finish(self, outcome: Any, payload: Payload | None) -> None:
        self.finished = True
        self.outcome = outcome
        self.payload = payload
        if self._task is not None:
            trio.lowlevel.reschedule(self._task)
            self._task = None


class RpcConnection:
    """One authenticated, multiplexed RPC connection.

    Build it with :func:`wire.transport.connect` or let
    :func:`wire.transport.serve` build it; its :meth:`run` loop reads frames
    until the peer goes away.  ``peer_name`` is the name the peer declared in
    the handshake (e.g. ``"dataserver-3"``).
    """

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        reader: FrameReader,
        writer: FrameWriter,
        handlers: Handlers = NO_HANDLERS,
        *,
        peer_name: str = "?",
        calls_in_flight_max: int = CALLS_IN_FLIGHT_MAX,
    ) -> None:
        self._stream = stream
        self._reader = reader
        self._writer = writer
        self._handlers = handlers
        self.peer_name = peer_name
        self._calls_in_flight_max = calls_in_flight_max
        self._call_ids = itertools.count(1)
        self._pending: dict[int, _PendingCall] = {}
        self._outgoing_slots = trio.Semaphore(calls_in_flight_max)
        self._deadlines: dict[int, list[int]] = {}
        """Call ids by deadline bucket (``ceil(deadline / DEADLINE_GRANULARITY_S)``)."""
        self._handler_deadlines: dict[int, list[int]] = {}
        """Ids of the peer's calls served in tasks, by deadline bucket.  Only ids: a peer
        that reuses the id of a finished call early gets the old deadline."""
        self._deadlines_added = trio.Event()
        self._incoming: dict[int, trio.CancelScope | Deferred] = {}
        self._closed = trio.Event()
        self.close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ------------------------------------------------------------ calling

    async def call(
        self,
        method: schema.Method[Req, Rep],
        request: Req,
        *,
        payload: Payload | None = None,
        timeout_s: float | None = None,
    ) -> Rep:
        """Call ``method`` on the peer and return its reply (see :meth:`call_with_payload`)."""
        reply, _ = await self.call_with_payload(
            method, request, payload=payload, timeout_s=timeout_s
        )
        return reply

    async def call_with_payload(
        self,
        method: schema.Method[Req, Rep],
        request: Req,
        *,
        payload: Payload | None = None,
        timeout_s: float | None = None,
    ) -> tuple[Rep, Payload | None]:
        """Call ``method``; return ``(reply, reply payload)``.

        Raises :class:`RpcError` with the peer's errno, ETIMEDOUT when
        ``timeout_s`` passes (the peer is told to cancel), and
        :class:`ConnectionLost` when the connection dies first.
        """
        if self.closed:
            raise ConnectionLost(f"connection to {self.peer_name} is closed: {self.close_reason}")
        body = schema.encode(request)
        pending = _PendingCall(method.name)
        if timeout_s is None:
            await self._exchange(body, payload, None, pending)
        elif self._nursery is None:  # not running yet: no deadline sweeper
            with trio.move_on_after(timeout_s) as deadline_scope:
                await self._exchange(body, payload, None, pending)
            if deadline_scope.cancelled_caught:
                raise RpcError(errno.ETIMEDOUT, f"{method.name} to {self.peer_name} timed out")
        else:
            await self._exchange(body, payload, timeout_s, pending)
        if isinstance(pending.outcome, RpcError):
            raise pending.outcome
        try:
            reply = schema.decode(method.reply, pending.outcome, method.name)
        except schema.SchemaError as error:
            raise RpcError(errno.EPROTO, f"bad reply from {self.peer_name}: {error}") from None
        return reply, pending.payload

    async def _exchange(
        self,
        body: Any,
        payload: Payload | None,
        timeout_s: float | None,
        pending: _PendingCall,
    ) -> None:
        """Send one request and wait for its outcome (stored in ``pending``)."""
        try:
            # Skip the checkpoint of an uncontended acquire: it costs a trip
            # through the scheduler on every call.
            self._outgoing_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._outgoing_slots.acquire()
        call_id = next(self._call_ids)
        self._pending[call_id] = pending
        timeout_ms = None
        if timeout_s is not None:
            timeout_ms = max(1, math.ceil(timeout_s * 1000))
            self._add_deadline(self._deadlines, timeout_s, call_id)
        try:
            await self._send([REQUEST, call_id, pending.name, body, timeout_ms], payload)
            await pending.wait()
        except BaseException:
            if not pending.finished and not self.closed:
                self._cancel_remote_soon(call_id)
            raise
        finally:
            self._pending.pop(call_id, None)
            self._outgoing_slots.release()

    def _add_deadline(self, buckets: dict[int, list[int]], timeout_s: float, call_id: int) -> None:
        """File ``call_id`` under the bucket of the deadline ``timeout_s`` from now."""
        bucket = math.ceil((trio.current_time() + timeout_s) / DEADLINE_GRANULARITY_S)
        call_ids = buckets.get(bucket)
        if call_ids is None:
            buckets[bucket] = [call_id]
            self._deadlines_added.set()
        else:
            call_ids.append(call_id)

    async def _expire_calls(self) -> None:
        """Fail our calls whose deadline passed with ETIMEDOUT (telling the peer to cancel),
        and cancel the handlers of the peer's calls whose deadline passed."""
        while True:
            if not self._deadlines and not self._handler_deadlines:
                await self._deadlines_added.wait()
                self._deadlines_added = trio.Event()
                continue
            # At least every DEADLINE_GRANULARITY_S: a shorter timeout than those already
            # waiting may have opened an earlier bucket meanwhile.
            first = min(itertools.chain(self._deadlines, self._handler_deadlines))
            await trio.sleep_until(
                min(first * DEADLINE_GRANULARITY_S, trio.current_time() + DEADLINE_GRANULARITY_S)
            )
            last = math.floor(trio.current_time() / DEADLINE_GRANULARITY_S)
            for bucket in [b for b in self._deadlines if b <= last]:
                for call_id in self._deadlines.pop(bucket):
                    pending = self._pending.get(call_id)
                    if pending is not None and not pending.finished:
                        message = f"{pending.name} to {self.peer_name} timed out"
                        pending.finish(RpcError(errno.ETIMEDOUT, message), None)
                        self._cancel_remote_soon(call_id)
            for bucket in [b for b in self._handler_deadlines if b <= last]:
                for call_id in self._handler_deadlines.pop(bucket):
                    serving = self._incoming.get(call_id)
                    if isinstance(serving, trio.CancelScope):
                        serving.cancel()

    async def notify(self, method: schema.Method[Req, Any], message: Req) -> None:
        """Send a one-way ``message`` to the peer's handler of ``method``.

        Returns once the frame is handed to the kernel: nothing says the peer
        took it (a handler that fails closes the connection).  Raises
        :class:`ConnectionLost` when the connection is or gets closed.
        """
        invariant(method.one_way, f"{method.name} expects replies: use call()")
        if self.closed:
            raise ConnectionLost(f"connection to {self.peer_name} is closed: {self.close_reason}")
        # Waiting for the write lets a sender's messages pile up meanwhile and leave as
        # one batch: a stream of one-way messages is batched by its own back-pressure.
        await self._send([NOTIFY, method.name, schema.encode(message)], None, wait=True)

    def notify_nowait(self, method: schema.Method[Req, Any], message: Req) -> bool:
        """Send a one-way ``message`` without yielding: written at once when nothing
        waits to be written, else queued behind it; False (nothing sent) when the
        connection is closed or its writer's queue is full."""
        invariant(method.one_way, f"{method.name} expects replies: use call()")
        if self.closed:
            return False
        return self._writer.send_nowait([NOTIFY, method.name, schema.encode(message)])

    def _cancel_remote_soon(self, call_id: int) -> None:
        # Best effort: a cancel that cannot be written now is pointless later.
        if self._writer.queue([CANCEL, call_id]):
            return
        if not self._writer.broken and self._nursery is not None:
            self._nursery.start_soon(self._send_quietly, [CANCEL, call_id])

    async def _send_quietly(self, header: list[Any]) -> None:
        try:
            await self._send(header, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLost):
            pass

    async def _send(
        self, header: list[Any], payload: OutgoingPayload | None, *, wait: bool = False
    ) -> None:
        """Hand a frame to the writer: queued without waiting when it can be (no payload
        to keep untouched, room in the writer's queue, no ``wait`` for the write), else
        written before returning."""
        if payload is None and not wait and self._writer.queue(header):
            return
        try:
            await self._writer.send(header, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._close(f"write failed: {error}")
            raise ConnectionLost(f"connection to {self.peer_name} lost while sending") from None

    # ------------------------------------------------------------ serving

    _nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Read and dispatch frames until the peer closes or breaks the protocol."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer.run_flusher)
                nursery.start_soon(self._expire_calls)
                try:
                    await self._read_loop(nursery)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._close(self.close_reason or "closed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        frames = 0
        while True:
            frames += 1
            if frames % FRAMES_PER_YIELD == 0:
                await trio.lowlevel.checkpoint()
            try:
                frame = await self._reader.receive()
            except ProtocolError as error:
                self._close(f"protocol error from {self.peer_name}: {error}")
                log.warning("closing connection from %s: %s", self.peer_name, error)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                self._close(f"connection broken: {error}")
                return
            if frame is None:
                self._close("peer closed the connection")
                return
            header, payload = frame
            try:
                if type(header) is list and header and header[0] == NOTIFY:
                    await self._run_notification(header, payload)
                else:
                    self._dispatch(nursery, header, payload)
            except ProtocolError as error:
                self._close(f"protocol error from {self.peer_name}: {error}")
                log.warning("closing connection from %s: %s", self.peer_name, error)
                return

    def _dispatch(self, nursery: trio.Nursery, header: Any, payload: Payload | None) -> None:
        if type(header) is not list or not header or type(header[0]) is not int:
            raise ProtocolError("envelope is not [kind, call_id, ...]")
        kind = header[0]
        if len(header) < 2 or type(header[1]) is not int:
            raise ProtocolError("envelope without a call id")
        call_id = header[1]
        if kind == REQUEST:
            self._start_request(nursery, header, payload)
        elif kind == REPLY:
            if len(header) != 3:
                raise ProtocolError("reply envelope of the wrong length")
            self._complete(call_id, header[2], payload)
        elif kind == ERROR:
            if len(header) != 4 or type(header[2]) is not int or type(header[3]) is not str:
                raise ProtocolError("error envelope of the wrong shape")
            if not ERROR_CODE_MIN <= header[2] <= ERROR_CODE_MAX:
                raise ProtocolError(f"error code {header[2]} is not a C int")
            self._complete(call_id, RpcError(header[2], header[3][:ERROR_MESSAGE_CHARS_MAX]), None)
        elif kind == CANCEL:
            serving = self._incoming.get(call_id)
            if isinstance(serving, Deferred):
                serving.set_callback(None)
                del self._incoming[call_id]
                self._reply(call_id, [ERROR, errno.ETIMEDOUT, "cancelled by the caller"])
            elif serving is not None:
                serving.cancel()
        else:
            raise ProtocolError(f"unknown envelope kind {kind}")

    def _complete(self, call_id: int, outcome: Any, payload: Payload | None) -> None:
        pending = self._pending.get(call_id)
        if pending is None or pending.finished:
            return  # the caller gave up (timeout or cancellation); drop the late reply
        pending.finish(outcome, payload)

    async def _run_notification(self, header: list[Any], payload: Payload | None) -> None:
        """Run the handler of a one-way message; any failure is a ProtocolError."""
        if len(header) != 3 or type(header[1]) is not str or payload is not None:
            raise ProtocolError("one-way envelope of the wrong shape")
        name = header[1]
        entry = self._handlers.lookup(name)
        if entry is None or not entry.method.one_way or entry.immediate:
            raise ProtocolError(f"no one-way method {name[:64]!r}")
        method, handler = entry.method, entry.handler
        try:
            message = schema.decode(method.request, header[2], name)
        except schema.SchemaError as error:
            raise ProtocolError(str(error)[:ERROR_MESSAGE_CHARS_MAX]) from None
        try:
            await handler(message, CallContext(self, None))
        except RpcError as error:
            raise ProtocolError(f"{name} refused: {error.message}") from None
        except Exception:
            log.exception("handler for one-way %s failed", name)
            raise ProtocolError(f"internal error in {name}") from None

    def _start_request(
        self, nursery: trio.Nursery, header: list[Any], payload: Payload | None
    ) -> None:
        if len(header) != 5 or type(header[2]) is not str:
            raise ProtocolError("request envelope of the wrong shape")
        call_id, name, body, timeout_ms = header[1], header[2], header[3], header[4]
        if timeout_ms is not None and (type(timeout_ms) is not int or timeout_ms <= 0):
            raise ProtocolError("request timeout must be a positive int or nil")
        if call_id in self._incoming:
            raise ProtocolError(f"call id {call_id} reused while in flight")
        if len(self._incoming) >= self._calls_in_flight_max:
            raise ProtocolError(
                f"more than {self._calls_in_flight_max} calls in flight on one connection"
            )
        entry = self._handlers.lookup(name)
        if entry is not None and entry.immediate:
            self._serve_immediately(call_id, name, entry, body, payload)
            return
        scope = trio.CancelScope()
        if timeout_ms is not None:
            self._add_deadline(self._handler_deadlines, timeout_ms / 1000, call_id)
        self._incoming[call_id] = scope
        nursery.start_soon(self._serve_request, scope, call_id, name, body, payload)

    def _serve_immediately(
        self, call_id: int, name: str, entry: _Entry, body: Any, payload: Payload | None
    ) -> None:
        """Run an immediate handler; reply now, or when its Deferred is settled."""
        try:
            request = schema.decode(entry.method.request, body, name)
        except schema.SchemaError as error:
            self._reply(call_id, [ERROR, errno.EPROTO, str(error)[:ERROR_MESSAGE_CHARS_MAX]])
            return
        try:
            result = entry.handler(request, CallContext(self, payload))
        except RpcError as error:
            self._reply(call_id, _error_envelope(error))
            return
        except Exception:
            log.exception("handler for %s failed", name)
            self._reply(call_id, [ERROR, errno.EIO, f"internal error in {name}"])
            return
        if isinstance(result, Deferred):
            self._incoming[call_id] = result
            result.set_callback(lambda done: self._deferred_done(call_id, name, done))
        else:
            self._reply(call_id, self._reply_envelope(name, result, None))

    def _deferred_done(self, call_id: int, name: str, deferred: Deferred) -> None:
        """The callback of a settled Deferred (runs in whichever task settled it)."""
        if self._incoming.get(call_id) is not deferred:
            return  # cancelled, or the connection closed
        del self._incoming[call_id]
        self._reply(call_id, self._reply_envelope(name, deferred.value, deferred.error))

    def _reply_envelope(self, name: str, value: Any, error: RpcError | None) -> list[Any]:
        if error is not None:
            return _error_envelope(error)
        try:
            return [REPLY, schema.encode(value)]
        except Exception:
            log.exception("encoding the reply of %s failed", name)
            return [ERROR, errno.EIO, f"internal error in {name}"]

    def _reply(self, call_id: int, envelope: list[Any]) -> None:
        """Send a reply without blocking; under back-pressure a task waits to send it,
        holding the call's in-flight slot meanwhile."""
        if self.closed:
            return
        envelope.insert(1, call_id)
        try:
            queued = self._writer.queue(envelope)
        except Exception:
            # Runs in the reading task or in whichever task settled a Deferred: a reply
            # msgpack cannot pack must not raise into either.
            envelope = _unsendable(envelope)
            queued = self._writer.queue(envelope)
        if queued or self._nursery is None:
            return
        scope = trio.CancelScope()
        self._incoming[call_id] = scope
        self._nursery.start_soon(self._send_reply_later, scope, call_id, envelope)

    async def _send_reply_later(
        self, scope: trio.CancelScope, call_id: int, envelope: list[Any]
    ) -> None:
        try:
            with scope:
                await self._send_reply(envelope, None, wait=True)
        except ConnectionLost:
            pass
        finally:
            self._incoming.pop(call_id, None)

    async def _send_reply(
        self, envelope: list[Any], payload: OutgoingPayload | None, *, wait: bool = False
    ) -> None:
        """Send a reply envelope; one msgpack cannot pack goes out as EIO instead."""
        try:
            await self._send(envelope, payload, wait=wait)
        except ConnectionLost:
            raise
        except Exception:
            await self._send(_unsendable(envelope), None, wait=wait)

    async def _serve_request(
        self, scope: trio.CancelScope, call_id: int, name: str, body: Any, payload: Payload | None
    ) -> None:
        envelope: list[Any] = [ERROR, errno.ETIMEDOUT, f"{name}: deadline passed or cancelled"]
        reply_payload: OutgoingPayload | None = None
        try:
            with scope:
                envelope, reply_payload = await self._run_handler(name, body, payload)
            envelope.insert(1, call_id)
            await self._send_reply(envelope, reply_payload)
        except ConnectionLost:
            pass
        finally:
            self._incoming.pop(call_id, None)

    async def _run_handler(
        self, name: str, body: Any, payload: Payload | None
    ) -> tuple[list[Any], OutgoingPayload | None]:
        """Run the handler; return the envelope without its call id, and any payload."""
        entry = self._handlers.lookup(name)
        if entry is None:
            return [ERROR, errno.ENOSYS, f"unknown method {name[:64]!r}"], None
        method, handler = entry.method, entry.handler
        if method.one_way:
            return [ERROR, errno.EPROTO, f"{name[:64]} is one-way: it takes no calls"], None
        try:
            request = schema.decode(method.request, body, name)
        except schema.SchemaError as error:
            return [ERROR, errno.EPROTO, str(error)[:ERROR_MESSAGE_CHARS_MAX]], None
        try:
            result = await handler(request, CallContext(self, payload))
        except RpcError as error:
            return _error_envelope(error), None
        except Exception:
            log.exception("handler for %s failed", name)
            return [ERROR, errno.EIO, f"internal error in {name}"], None
        try:
            if isinstance(result, WithPayload):
                return [REPLY, schema.encode(result.reply)], result.payload
            return [REPLY, schema.encode(result)], None
        except Exception:
            log.exception("encoding the reply of %s failed", name)
            return [ERROR, errno.EIO, f"internal error in {name}"], None

    def _close(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self.close_reason = reason
        self._closed.set()
        for call_id, serving in list(self._incoming.items()):
            if isinstance(serving, Deferred):
                serving.set_callback(None)
                del self._incoming[call_id]
        for pending in self._pending.values():
            if not pending.finished:
                pending.finish(
                    ConnectionLost(f"connection to {self.peer_name} lost: {reason}"), None
                )

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionLost."""
        self._close("closed locally")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)
