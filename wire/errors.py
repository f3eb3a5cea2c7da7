"""Typed RPC errors: an errno-like code and a human message."""

from __future__ import annotations

import errno
import os


class RpcError(Exception):
    """A call failed; ``code`` is a POSIX errno value, ``message`` says why.

    Errors travel on the wire as ``(code, message)`` so the caller of a remote
    method sees the same errno the callee chose (ENOENT from the namespace,
    ETIMEDOUT from a deadline, EPROTO from a malformed message).
    """

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        self.message = message or os.strerror(code)
        super().__init__(code, self.message)

    def __str__(self) -> str:
        name = errno.errorcode.get(self.code, str(self.code))
        return f"[{name}] {self.message}"


class ConnectionLost(RpcError):
    """The connection closed before the reply arrived (the call may or may not have run)."""

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__(errno.ECONNRESET, message)


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed with this reason."""


class AuthenticationFailed(ProtocolError):
    """The peer could not prove it holds the cluster key."""
