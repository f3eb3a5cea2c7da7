"""Length-prefixed msgpack frames over a trio byte stream.

A frame is::

    u32 header_length | u32 payload_length | header (msgpack) | payload (raw bytes)

The header is a small msgpack value (an RPC envelope).  The payload is bulk
data (chunk contents) that never passes through msgpack: it is written with
``writev`` straight from the caller's buffer and read with ``readv`` straight
into its own buffer, so megabytes are copied once by the kernel on each side,
with no Python loop over bytes or blocks; a payload that is a range of a file
(:class:`FileRange`) goes out with ``sendfile`` and is not copied by the sender
at all.  Payload buffers are recycled (:class:`PayloadBuffers`) once their
receiver has dropped them.

Every length is checked against :class:`FrameLimits` *before* anything is
allocated; a violation raises :class:`~wire.errors.ProtocolError`, and the
owner closes that connection.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from wire.errors import ProtocolError

PREFIX = struct.Struct(">II")
PREFIX_BYTES = PREFIX.size
RECEIVE_BYTES = 64 * 1024
"""Capacity of a reader's receive buffer, held by every connection: one ``readv`` takes
hundreds of small frames at once (a payload longer than what is buffered is read into its
own buffer)."""
RECEIVE_ROOM_BYTES_MIN = 16 * 1024
"""Below this much free room at its end, the receive buffer is compacted before a read."""
SMALL_PART_BYTES = 64 * 1024
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
"""Most buffers one ``writev`` takes."""
QUEUED_BYTES_MAX = 1024 * 1024
"""Frames waiting for the flusher beyond which :meth:`FrameWriter.queue` refuses (the
caller then waits in :meth:`FrameWriter.send`): what a peer that stops reading costs."""

Payload = bytes | bytearray | memoryview


class FileRange:
    """``length`` bytes of an open file from ``offset``, sent as a frame's payload with
    ``sendfile(2)``: the kernel hands page-cache pages to the socket, and this process
    copies nothing.  The object owns ``fd`` (pass a duplicate): it is closed once the
    bytes are sent, or when the range is dropped unsent.  A file that ends before the
    range does breaks the writer (the frame cannot be completed)."""

    __slots__ = ("fd", "offset", "remaining")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.remaining = length

    def __len__(self) -> int:
        return self.remaining

    def read(self) -> bytes:
        """What is left of the range, read with ``pread`` (for streams without a socket)."""
        data = os.pread(self.fd, self.remaining, self.offset)
        if len(data) != self.remaining:
            raise trio.BrokenResourceError("file ended inside the range being sent")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


OutgoingPayload = Payload | FileRange
"""What a frame's payload may be on the way out."""

RECYCLED_PAYLOAD_BYTES_MIN = 64 * 1024
"""Payloads below this size get a fresh buffer: small allocations are cheap."""
RECYCLED_PAYLOAD_BYTES_MAX = 16 * 1024 * 1024
"""Payloads above this size (rare: no chunk read or write piece is that large) get a
fresh buffer, so that one of them does not stay allocated for good."""
SPARE_PAYLOAD_BYTES_MAX = 128 * 1024 * 1024
"""Bytes of payload buffers a process keeps for reuse, busy or free (a buffer is only
allocated when that many are alive at once): room for a client's read-ahead window of
4 MiB pieces, the window it has already opened into the next chunk, and the pieces
arriving behind them.  At 64 MiB a 32 MiB window overflowed it: a fifth of the pieces
got fresh buffers, whose first touch cost the client half again as much CPU per MiB
read (0.71 against 0.47 ms, one run of each)."""
SPARE_PAYLOADS_MAX = 32
"""Buffers a process keeps for reuse, busy or free: bounds the scan for a free one."""


@dataclass(frozen=True)
class FrameLimits:
    """Hard limits on what one frame may contain."""

    header_bytes_max: int = 1024 * 1024
    payload_bytes_max: int = 16 * 1024 * 1024
    container_items_max: int = 100_000
    string_bytes_max: int = 1024 * 1024
    nesting_depth_max: int = 32

    @functools.cached_property
    def unpack_options(self) -> dict[str, Any]:
        """Keyword arguments for ``msgpack.unpackb`` that enforce these limits."""
        return {
            "raw": False,
            "strict_map_key": False,
            "use_list": True,
            "max_str_len": self.string_bytes_max,
            "max_bin_len": self.string_bytes_max,
            "max_array_len": self.container_items_max,
            "max_map_len": self.container_items_max,
            "max_ext_len": 0,
            # max_ext_len 0 still lets an ext of no data through (as an ExtType).
            "ext_hook": _refuse_ext,
        }


def _refuse_ext(code: int, _data: bytes) -> Any:
    """No paxfs message uses msgpack's ext types: any ext in a header is malformed."""
    raise ValueError(f"msgpack ext type {code} is not allowed")


DEFAULT_LIMITS = FrameLimits()
HANDSHAKE_LIMITS = FrameLimits(
    header_bytes_max=512,
    payload_bytes_max=0,
    container_items_max=8,
    string_bytes_max=256,
    nesting_depth_max=2,
)


_CONTAINER_MARKERS = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
"""First bytes of msgpack maps and arrays: fixmap, fixarray, array 16/32, map 16/32."""


def pack_header(header: Any) -> bytes:
    """Encode a header value (bytes stay bytes, str stays str)."""
    return msgpack.packb(header, use_bin_type=True)


def frame_prefix(header_bytes: bytes, payload_length: int) -> bytes:
    """The fixed prefix followed by the packed header: everything but the payload."""
    return PREFIX.pack(len(header_bytes), payload_length) + header_bytes


def check_depth(value: Any, depth_max: int) -> None:
    """Refuse containers nested deeper than ``depth_max`` (iterative, no recursion).

    Walks one nesting level at a time and looks only at containers: msgpack yields
    lists and dicts (whose keys are never containers), and skipping scalars keeps
    this cheap on headers full of small fields, which every frame has.
    """
    level = [value] if type(value) is list or type(value) is dict else []
    depth = 1
    while level:
        if depth > depth_max:
            raise ProtocolError(f"header nested deeper than {depth_max}")
        nested = []
        for item in level:
            children = item.values() if type(item) is dict else item
            for child in children:
                if type(child) is list or type(child) is dict:
                    nested.append(child)
        level = nested
        depth += 1


def decode_header(data: bytes | memoryview, limits: FrameLimits) -> Any:
    """Unpack and depth-check one header; malformed input raises ProtocolError."""
    try:
        header = msgpack.unpackb(data, **limits.unpack_options)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise ProtocolError(f"malformed frame header: {error}") from None
    except Exception as error:  # msgpack raises assorted types on hostile input
        raise ProtocolError(f"malformed frame header: {type(error).__name__}") from None
    if len(data) > limits.nesting_depth_max and (
        len(data) - len(bytes(data).translate(None, _CONTAINER_MARKERS)) > limits.nesting_depth_max
    ):
        # Each level of nesting starts with a container header, one byte from
        # _CONTAINER_MARKERS: a header with no more such bytes than the limit (most,
        # counted in C) cannot be too deep and skips the walk.
        check_depth(header, limits.nesting_depth_max)
    return header


def _socket_of(stream: object) -> trio.socket.SocketType | None:
    """The trio socket under a :class:`trio.SocketStream`, for direct system calls.

    trio's stream methods wrap every ``send``/``recv`` in context managers and two
    scheduler checkpoints (about 15 us per send and receive pair); frames are read
    and written here with ``os.read``/``os.writev`` on the descriptor and trio is
    asked only to wait when the socket is not ready.
    """
    sock = getattr(stream, "socket", None)
    return sock if isinstance(sock, trio.socket.SocketType) else None


def _buffers_before_file(parts: list[OutgoingPayload]) -> list[Payload]:
    """The leading buffers of ``parts`` that one ``writev`` takes: up to the first
    :class:`FileRange`, at most ``IOV_MAX``."""
    buffers: list[Payload] = []
    for part in parts[:IOV_MAX]:
        if isinstance(part, FileRange):
            break
        buffers.append(part)
    return buffers


def _os_error(error: OSError, sock: trio.socket.SocketType) -> Exception:
    """trio's exception for a failed system call on ``sock``."""
    if sock.fileno() == -1:
        return trio.ClosedResourceError("socket was closed")
    return trio.BrokenResourceError(error)


def _unreferenced_count() -> int:
    """What ``sys.getrefcount(spares[index])`` says of an object only ``spares`` holds."""
    spares = [bytearray(1)]
    index = 0
    return sys.getrefcount(spares[index])


_UNREFERENCED = _unreferenced_count()


class PayloadBuffers:
    """Buffers for received payloads, reused once their receiver has let go of them.

    A fresh multi-MiB ``bytearray`` is zero-filled and, being fresh memory, faults in
    page by page: on the read path that cost more CPU than the kernel's copy of the
    bytes.  A buffer handed out belongs to the receiver as long as anything refers to
    it (the bytearray, a memoryview or slice of one, a C-level export, which all hold a
    reference); the pool takes it back only when its own list holds the last reference,
    which CPython's reference count says exactly.  Nothing is zeroed on reuse: the
    reader overwrites every byte before the payload is handed out.

    Only payloads of ``RECYCLED_PAYLOAD_BYTES_MIN`` to ``RECYCLED_PAYLOAD_BYTES_MAX``
    bytes are pooled, at most ``spare_bytes_max`` bytes in ``spares_max`` buffers; a free
    buffer of another size gives way to a new one.  Thread-safe (one pool may serve trio
    loops in several threads): a buffer is found free and handed out under one lock.
    """

    def __init__(
        self,
        spare_bytes_max: int = SPARE_PAYLOAD_BYTES_MAX,
        spares_max: int = SPARE_PAYLOADS_MAX,
    ) -> None:
        self._spare_bytes_max = spare_bytes_max
        self._spares_max = spares_max
        self._spares: list[bytearray] = []
        self._spare_bytes = 0
        self._lock = threading.Lock()

    @property
    def spare_bytes(self) -> int:
        """Bytes of the buffers kept, in use or free."""
        return self._spare_bytes

    def take(self, length: int) -> bytearray:
        """A buffer of exactly ``length`` bytes, with arbitrary contents, for the caller alone."""
        if not RECYCLED_PAYLOAD_BYTES_MIN <= length <= RECYCLED_PAYLOAD_BYTES_MAX:
            return bytearray(length)
        with self._lock:
            spares = self._spares
            unused = -1
            for index in range(len(spares)):
                if sys.getrefcount(spares[index]) == _UNREFERENCED:
                    if len(spares[index]) == length:
                        return spares[index]
                    unused = index
            buffer = bytearray(length)
            if unused >= 0 and (
                self._spare_bytes + length > self._spare_bytes_max
                or len(spares) == self._spares_max
            ):
                self._spare_bytes -= len(spares.pop(unused))
            if (
                self._spare_bytes + length <= self._spare_bytes_max
                and len(spares) < self._spares_max
            ):
                spares.append(buffer)
                self._spare_bytes += length
            return buffer


PAYLOAD_BUFFERS = PayloadBuffers()
"""The process's payload buffers, shared by every reader."""


class FrameReader:
    """Reads whole frames from a stream, enforcing :class:`FrameLimits`.

    ``limits`` may be replaced between frames: a connection reads its
    handshake under tight limits and then widens them, keeping whatever the
    reader has already buffered.

    Bytes arrive in a receive buffer of ``RECEIVE_BYTES`` (grown for a longer
    header), read into in place, so a burst of small frames costs one system call;
    a payload that does not fit what is buffered is read straight into its own
    buffer from ``buffers``.
    """

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        limits: FrameLimits = DEFAULT_LIMITS,
        buffers: PayloadBuffers = PAYLOAD_BUFFERS,
    ):
        self._stream = stream
        self._socket = _socket_of(stream)
        self.limits = limits
        self._buffers = buffers
        self._buffer = bytearray(RECEIVE_BYTES)
        self._start = 0
        """First unread byte of ``_buffer``."""
        self._end = 0
        """End of the bytes received into ``_buffer``."""

    async def _fill(self, needed: int) -> bool:
        """Make at least ``needed`` unread bytes available; False on a clean EOF."""
        while self._end - self._start < needed:
            if self._start == self._end:
                self._start = self._end = 0
            if self._end + RECEIVE_ROOM_BYTES_MIN > len(self._buffer) or (
                self._start + needed > len(self._buffer)
            ):
                self._make_room(needed)
            received = await self._receive_into(memoryview(self._buffer)[self._end :])
            if not received:
                if self._end > self._start:
                    raise ProtocolError("connection closed in the middle of a frame")
                return False
            self._end += received
        return True

    def _make_room(self, needed: int) -> None:
        """Move the unread bytes (fewer than ``needed``) to the front, in a larger buffer
        if ``needed`` asks, leaving at least ``RECEIVE_ROOM_BYTES_MIN`` free behind them."""
        unread = bytes(memoryview(self._buffer)[self._start : self._end])
        if needed + RECEIVE_ROOM_BYTES_MIN > len(self._buffer):
            self._buffer = bytearray(needed + RECEIVE_ROOM_BYTES_MIN)
        self._buffer[: len(unread)] = unread
        self._start, self._end = 0, len(unread)

    async def _receive_into(self, view: memoryview) -> int:
        """Receive at most ``len(view)`` bytes into ``view``; 0 at the end of the stream."""
        sock = self._socket
        if sock is None:
            data = await self._stream.receive_some(len(view))
            view[: len(data)] = data
            return len(data)
        while True:
            try:
                received = os.readv(sock.fileno(), [view])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as error:
                raise _os_error(error, sock) from error
            # Data was there at once: yield anyway, so that a peer that never stops
            # sending cannot starve this process's other tasks (as trio's recv does).
            await trio.lowlevel.checkpoint()
            return received

    async def receive(self) -> tuple[Any, Payload | None] | None:
        """Return ``(header, payload or None)``, or None when the peer closed cleanly."""
        if not await self._fill(PREFIX_BYTES):
            return None
        header_length, payload_length = PREFIX.unpack_from(self._buffer, self._start)
        if header_length == 0 or header_length > self.limits.header_bytes_max:
            raise ProtocolError(
                f"frame header of {header_length} bytes (limit {self.limits.header_bytes_max})"
            )
        if payload_length > self.limits.payload_bytes_max:
            raise ProtocolError(
                f"frame payload of {payload_length} bytes (limit {self.limits.payload_bytes_max})"
            )
        self._start += PREFIX_BYTES
        if not await self._fill(header_length):
            raise ProtocolError("connection closed in the middle of a frame")
        start = self._start
        self._start += header_length
        header = decode_header(memoryview(self._buffer)[start : self._start], self.limits)
        if payload_length == 0:
            return header, None
        return header, await self._receive_payload(payload_length)

    async def _receive_payload(self, length: int) -> Payload:
        buffered = self._end - self._start
        if buffered >= length:
            end = self._start + length
            small = bytes(memoryview(self._buffer)[self._start : end])
            self._start = end
            return small
        payload = self._buffers.take(length)
        view = memoryview(payload)
        view[:buffered] = memoryview(self._buffer)[self._start : self._end]
        self._start = self._end = 0
        filled = buffered
        while filled < length:
            # Straight from the kernel into the payload buffer: one copy.
            received = await self._receive_into(view[filled:])
            if not received:
                raise ProtocolError("connection closed in the middle of a payload")
            filled += received
        view.release()
        return payload


class FrameWriter:
    """Writes frames; frames queued by many tasks go out in few ``send_all`` calls.

    Before :meth:`run_flusher` is started (during the handshake) each
    ``send`` writes its own frame under a lock.  Once the flusher runs,
    ``send`` only queues its frame and waits: the flusher wakes after every
    task runnable in the current scheduler batch has queued its frame, and
    writes them all at once, which under load carries dozens of small frames
    per system call.  ``send`` returns once its frame has been handed to the
    kernel: natural back-pressure, and a caller's payload buffer is not
    touched after ``send`` returns.  :meth:`queue` is the cheap path for a
    frame without a payload whose sender need not wait: it returns at once
    while fewer than ``QUEUED_BYTES_MAX`` bytes wait.  A write cut short
    (timeout, broken peer) leaves the byte stream unusable; the writer is then
    ``broken`` for good.
    """

    def __init__(self, stream: trio.abc.SendStream, send_timeout_s: float = 30.0):
        self._stream = stream
        self._socket = _socket_of(stream)
        self._send_timeout_s = send_timeout_s
        self._lock = trio.Lock()
        self._queue: list[OutgoingPayload] = []
        self._queued_bytes = 0
        self._queued_files = 0
        """FileRange payloads in the queue: only then must a write look for them."""
        self._queue_written = trio.Event()
        self._work = trio.Event()
        self._flusher_running = False
        self.broken = False

    async def send(self, header: Any, payload: OutgoingPayload | None = None) -> None:
        """Queue one frame and return once it has been written."""
        if self.broken:
            raise trio.ClosedResourceError("frame writer is broken")
        header_bytes = pack_header(header)
        payload_length = len(payload) if payload is not None else 0
        prefix = frame_prefix(header_bytes, payload_length)
        self._queue.append(prefix)
        self._queued_bytes += len(prefix) + payload_length
        if payload is not None and payload_length:
            self._queue.append(payload)
            self._queued_files += isinstance(payload, FileRange)
        written = self._queue_written
        if self._flusher_running:
            self._work.set()
            await written.wait()
        else:
            async with self._lock:
                if not written.is_set():
                    await self._write_queue()
        if self.broken:
            raise trio.BrokenResourceError("connection broke while writing")

    def queue(self, header: Any) -> bool:
        """Queue a frame without payload for the flusher and return at once.

        False (nothing queued) when the caller must ``await send`` instead: before
        the flusher runs, once the writer broke, or while ``QUEUED_BYTES_MAX`` bytes
        already wait (back-pressure on whoever produces frames faster than the peer
        reads them).  Whether the frame is then written is not reported: a failed
        write breaks the writer, and the owner closes the connection.
        """
        if not self._may_queue():
            return False
        self._queue_frame(frame_prefix(pack_header(header), 0))
        return True

    def send_nowait(self, header: Any) -> bool:
        """Write a frame without payload at once if nothing waits to be written (else
        queue it behind what does), without yielding; False when :meth:`queue` would
        refuse.  For a sender that batches by itself and wants no task switch before
        the bytes leave (a replica about to block on its own fsync)."""
        if not self._may_queue():
            return False
        frame: Payload = frame_prefix(pack_header(header), 0)
        if self._socket is not None and not self._queue and not self._lock.locked():
            try:
                rest = self._write_now(self._socket, [frame])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True
                self._work.set()  # the flusher ends; the connection closes
                return False
            if not rest:
                return True
            frame = rest[0]  # the kernel took part of it: the flusher sends the rest
        self._queue_frame(frame)
        return True

    def _may_queue(self) -> bool:
        """Whether :meth:`queue` and :meth:`send_nowait` may take a frame now."""
        return not self.broken and self._flusher_running and self._queued_bytes < QUEUED_BYTES_MAX

    def _queue_frame(self, frame: Payload) -> None:
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        self._work.set()

    async def run_flusher(self) -> None:
        """Write queued frames until the stream breaks; run it in the connection's nursery."""
        self._flusher_running = True
        try:
            while not self.broken:
                await self._work.wait()
                self._work = trio.Event()
                # The lock keeps out a direct-mode send begun before the flusher started.
                async with self._lock:
                    await self._write_queue()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.broken = True
            self._queue_written.set()

    async def _write_queue(self) -> None:
        pending, self._queue = self._queue, []
        self._queued_bytes = 0
        with_files, self._queued_files = self._queued_files > 0, 0
        written, self._queue_written = self._queue_written, trio.Event()
        try:
            if self._socket is not None:
                # Usually the kernel takes everything at once: no cancel scopes needed.
                pending = self._write_now(self._socket, pending, with_files)
            if pending:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self._send_timeout_s) as timeout:
                        await self._send_parts(pending, with_files)
                    if timeout.cancelled_caught:
                        raise trio.BrokenResourceError(
                            f"peer did not read for {self._send_timeout_s} s"
                        )
        except BaseException:
            self.broken = True
            self._queue_written.set()
            raise
        finally:
            written.set()

    @staticmethod
    def _write_now(
        sock: trio.socket.SocketType, parts: list[OutgoingPayload], with_files: bool = False
    ) -> list[OutgoingPayload]:
        """Write what the socket takes without waiting (``writev``, or ``sendfile`` for
        a :class:`FileRange`, which only a list ``with_files`` holds); what is left."""
        fd = sock.fileno()
        while parts:
            first = parts[0]
            if with_files and isinstance(first, FileRange):
                try:
                    sent = os.sendfile(fd, first.fd, first.offset, first.remaining)
                except BlockingIOError:
                    return parts
                except OSError as error:
                    raise _os_error(error, sock) from error
                if sent == 0:
                    raise trio.BrokenResourceError("file ended inside the range being sent")
                first.offset += sent
                first.remaining -= sent
                if not first.remaining:
                    first.close()
                    parts = parts[1:]
                continue
            buffers = _buffers_before_file(parts) if with_files else parts[:IOV_MAX]
            try:
                sent = os.writev(fd, buffers)
            except BlockingIOError:
                return parts
            except OSError as error:
                raise _os_error(error, sock) from error
            index = 0
            while index < len(buffers) and sent >= len(buffers[index]):
                sent -= len(buffers[index])
                index += 1
            parts = parts[index:]
            if sent:
                parts[0] = memoryview(buffers[index])[sent:]
        return parts

    async def _send_parts(self, parts: list[OutgoingPayload], with_files: bool) -> None:
        sock = self._socket
        if sock is not None:
            # The descriptor directly, as in _write_now: trio's send_all pays its per-call
            # overhead again for every socket buffer's worth of a multi-MiB payload.
            while parts:
                await trio.lowlevel.wait_writable(sock)
                parts = self._write_now(sock, parts, with_files)
            return
        small: list[Payload] = []
        for part in parts:
            if isinstance(part, FileRange):
                part = part.read()
            if len(part) >= SMALL_PART_BYTES:
                if small:
                    await self._stream.send_all(b"".join(small))
                    small = []
                await self._stream.send_all(part)
            else:
                small.append(part)
        if small:
            await self._stream.send_all(b"".join(small))
