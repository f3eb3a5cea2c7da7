"""Local reads: a dataserver hands a client on its own host a replica's file to read itself.

This is HDFS's short-circuit local read (HDFS-347): when a replica lives on the client's
host, going through the dataserver costs two processes' CPU per byte, for the dataserver's
checksumming and ``sendfile`` and for loopback TCP on both ends, where the client reading
the file costs one. The dataserver still decides who reads what: it hands over a
read-only descriptor, never a path, and only for a valid read token.

**Where.** Each dataserver listens on an abstract Unix socket named after the address it
advertises (:func:`local_socket_name`). Abstract names belong to a network namespace, as
the advertised address does, so a client reaches one exactly when the dataserver is on its
own host; there is no socket file to clean up or to guard with permissions.

**Protocol.** The connection starts with the cluster key's mutual handshake
(:mod:`wire.auth`), then carries requests one at a time. The client sends an
:class:`OpenReplicaRequest` frame. The dataserver answers ``[OK, OpenReplicaReply]`` with
one descriptor attached (``SCM_RIGHTS``), or ``[FAILED, code, message]`` with none, where
code is what a :data:`~wire.dataserver_ops.READ` of the replica would fail with
(TOKEN_REFUSED, STALE_VERSION, ENOENT, CHECKSUM_MISMATCH), or EBUSY for a replica with
changes not yet synced: its file's index is only brought up to date by a sync, so those
are read through the dataserver.

**What the client owes.** It reads the replica in the format of :mod:`wire.replica_format`,
verifies every block's checksum as the dataserver would, and reads only the durable index.
Whatever goes wrong locally (a checksum, a short read, a file renamed to a newer version,
which the reply's ``file_name`` lets it see) it does not judge: it reads through the
dataserver instead, which verifies and, if the replica is bad, reports it.
"""

from __future__ import annotations

import array
import errno
import hashlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from wire import schema
from wire.errors import ERROR_CODE_MAX, ERROR_CODE_MIN, ProtocolError, RpcError
from wire.framing import (
    PREFIX,
    PREFIX_BYTES,
    FrameLimits,
    FrameWriter,
    decode_header,
    frame_prefix,
    pack_header,
)
from wire.ids import ChunkId, ChunkVersion
from wire.tokens import ChunkToken
from wire.transport import handshake_as_dialer, handshake_as_listener

log = logging.getLogger(__name__)

SOCKET_NAME_PREFIX = b"\0paxfs-dataserver "
SOCKET_NAME_BYTES_MAX = 107
"""Longest abstract socket name (``sun_path`` holds 108 bytes)."""
LISTEN_BACKLOG = 64
CONNECT_TIMEOUT_S = 2.0
REPLY_TIMEOUT_S = 10.0
OK = "ok"
FAILED = "failed"
MESSAGE_LIMITS = FrameLimits(
    header_bytes_max=4096,
    payload_bytes_max=0,
    container_items_max=16,
    string_bytes_max=1024,
    nesting_depth_max=4,
)
"""Both directions carry a few small fields and never a payload."""
_FD_BYTES = array.array("i").itemsize


@schema.message("local.open_replica")
@dataclass(frozen=True)
class OpenReplicaRequest:
    """Hand over a read-only descriptor of ``(chunk_id, version)``'s file; needs a token
    as a :data:`~wire.dataserver_ops.READ` does."""

    chunk_id: ChunkId
    version: ChunkVersion
    token: ChunkToken


@schema.message("local.open_replica_reply")
@dataclass(frozen=True)
class OpenReplicaReply:
    """``file_name``: the file's name in the data directory when it was opened. Deriving a
    newer version renames the file, and deleting it unlinks it, so a reader that finds its
    descriptor under another name (``/proc/self/fd``) knows it no longer reads this version."""

    file_name: str


OpenReplica = Callable[[OpenReplicaRequest], Awaitable[tuple[OpenReplicaReply, int]]]
"""The dataserver's side: the reply and a descriptor the caller closes after sending, or
:class:`RpcError`."""


def local_socket_name(address: str) -> bytes:
    """The abstract socket name of the dataserver advertising ``address`` ("host:port")."""
    name = SOCKET_NAME_PREFIX + address.encode()
    if len(name) > SOCKET_NAME_BYTES_MAX:
        name = SOCKET_NAME_PREFIX + hashlib.sha256(address.encode()).hexdigest().encode()
    return name


async def _send_message(sock: trio.socket.SocketType, header: object, fd: int | None) -> None:
    frame = frame_prefix(pack_header(header), 0)
    rights = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sent = await sock.sendmsg([frame], rights)
    while sent < len(frame):
        sent += await sock.send(frame[sent:])


async def _receive_message(sock: trio.socket.SocketType) -> tuple[object, list[int]] | None:
    """One frame and the descriptors that came with it; None on a clean end of stream.

    Reads exactly the frame's bytes (never into the next), so descriptors stay with the
    message they were sent with."""
    data = bytearray()
    fds: list[int] = []
    try:
        needed = PREFIX_BYTES
        while len(data) < needed:
            chunk, ancillary, flags, _ = await sock.recvmsg(
                needed - len(data), socket.CMSG_SPACE(_FD_BYTES)
            )
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % _FD_BYTES])
                    fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("more descriptors than one arrived with a message")
            if not chunk:
                if data:
                    raise ProtocolError("connection closed in the middle of a message")
                return None
            data += chunk
            if needed == PREFIX_BYTES and len(data) == PREFIX_BYTES:
                header_length, payload_length = PREFIX.unpack(data)
                if not 0 < header_length <= MESSAGE_LIMITS.header_bytes_max or payload_length:
                    raise ProtocolError(f"malformed local read message prefix {bytes(data)!r}")
                needed += header_length
        return decode_header(memoryview(data)[PREFIX_BYTES:], MESSAGE_LIMITS), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# ---------------------------------------------------------------- the dataserver's side


async def serve_local_reads(
    open_replica: OpenReplica,
    key: bytes,
    address: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve local reads for the dataserver advertising ``address`` until cancelled.

    Raises OSError (EADDRINUSE) when another process holds the name."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(local_socket_name(address))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(sock)
    task_status.started()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _serve_connection(stream, open_replica, key)
        except Exception as error:
            # A bug, not a peer's doing: logged with its traceback, this connection only.
            log.error("local reads: closing a connection after %r", error, exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, [listener])


async def _serve_connection(
    stream: trio.SocketStream, open_replica: OpenReplica, key: bytes
) -> None:
    authenticated = await handshake_as_listener(stream, key, "local socket")
    if authenticated is None:
        return
    reader, _writer, peer_name = authenticated
    reader.limits = MESSAGE_LIMITS
    sock = stream.socket
    while True:
        try:
            frame = await reader.receive()
            if frame is None:
                return
            request = schema.decode(OpenReplicaRequest, frame[0])
        except (ProtocolError, schema.SchemaError) as error:
            log.warning("local reads: closing the connection of %r: %s", peer_name, error)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        try:
            reply, fd = await open_replica(request)
        except RpcError as error:
            message: list[object] = [FAILED, error.code, error.message]
            fd = None
        else:
            message = [OK, schema.encode(reply)]
        try:
            await _send_message(sock, message, fd)
        except OSError as error:  # the client went away
            log.info("local reads: %r hung up: %s", peer_name, error)
            return
        finally:
            if fd is not None:
                os.close(fd)


# ---------------------------------------------------------------- the client's side


class LocalReadLink:
    """An authenticated connection to the dataserver of ``address`` on this host."""

    def __init__(self, stream: trio.SocketStream, writer: FrameWriter, address: str) -> None:
        self._sock = stream.socket
        self._writer = writer
        self.address = address
        self._lock = trio.Lock()
        self.closed = False

    @classmethod
    async def connect(cls, address: str, key: bytes, *, name: str) -> LocalReadLink:
        """Reach the dataserver of ``address`` on this host; :class:`RpcError` ECONNREFUSED
        when it is not here (or serves no local reads), EACCES for another cluster key."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await sock.connect(local_socket_name(address))
        except (OSError, trio.TooSlowError) as error:
            sock.close()
            code = getattr(error, "errno", None) or errno.ECONNREFUSED
            raise RpcError(code, f"no local dataserver for {address}: {error}") from None
        stream = trio.SocketStream(sock)
        # The handshake's reader is dropped: replies carry descriptors, which only
        # recvmsg receives (a plain read would discard them).
        _reader, writer = await handshake_as_dialer(
            stream, key, name, f"local dataserver {address}"
        )
        return cls(stream, writer, address)

    async def open_replica(self, request: OpenReplicaRequest) -> tuple[OpenReplicaReply, int]:
        """The replica's reply and descriptor (the caller owns it); :class:`RpcError` with
        the dataserver's code, or ECONNRESET when the link broke (it is then closed)."""
        async with self._lock:
            try:
                with trio.fail_after(REPLY_TIMEOUT_S):
                    await self._writer.send(schema.encode(request))
                    message = await _receive_message(self._sock)
            except (
                OSError,
                ProtocolError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
            ) as error:
                self.close()
                raise RpcError(errno.ECONNRESET, f"local link to {self.address}: {error}") from None
        if message is None:
            self.close()
            raise RpcError(errno.ECONNRESET, f"local dataserver {self.address} hung up")
        header, fds = message
        return self._reply(header, fds)

    def _reply(self, header: object, fds: list[int]) -> tuple[OpenReplicaReply, int]:
        try:
            if isinstance(header, list) and len(header) == 2 and header[0] == OK and len(fds) == 1:
                return schema.decode(OpenReplicaReply, header[1]), fds.pop()
            if (
                isinstance(header, list)
                and len(header) == 3
                and header[0] == FAILED
                and type(header[1]) is int
                and ERROR_CODE_MIN <= header[1] <= ERROR_CODE_MAX
                and isinstance(header[2], str)
                and not fds
            ):
                raise RpcError(header[1], header[2])
            self.close()
            raise RpcError(errno.EPROTO, f"local dataserver {self.address}: malformed reply")
        except schema.SchemaError as error:
            self.close()
            raise RpcError(errno.EPROTO, f"local dataserver {self.address}: {error}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
