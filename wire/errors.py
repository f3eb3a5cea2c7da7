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
        self.message = message or describe(code)
        super().__init__(code, self.message)

    def __str__(self) -> str:
        name = _NAMES.get(self.code) or errno.errorcode.get(self.code, str(self.code))
        return f"[{name}] {self.message}"


ERROR_CODE_MIN = -(2**31)
ERROR_CODE_MAX = 2**31 - 1
"""The codes an ERROR envelope may carry: a C ``int``, what errno and ``strerror`` take.
A peer that sends another code breaks the protocol (see :mod:`wire.rpc`)."""


def describe(code: int) -> str:
    """``os.strerror(code)`` for a code it can take, else a plain fallback.

    ``strerror`` raises OverflowError for an int beyond a C int, and a code may come
    from a peer: an RpcError must be constructible from any int without raising.
    """
    if type(code) is int and ERROR_CODE_MIN <= code <= ERROR_CODE_MAX:
        return os.strerror(code)  # "Unknown error N" for a code without a name
    return f"error code {code}"


# Codes above the errno range, for conditions POSIX has no name for.
NOT_LEADER = 10_001  # message: the leader's address, or "" when none is known
STALE_VERSION = 10_002  # a chunk replica of another version than the one asked for
TOKEN_REFUSED = 10_003  # a chunk access token is forged, altered or expired


class ConnectionLost(RpcError):
    """The connection closed before the reply arrived (the call may or may not have run)."""

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__(errno.ECONNRESET, message)


_NAMES = {NOT_LEADER: "NOT_LEADER", STALE_VERSION: "STALE_VERSION", TOKEN_REFUSED: "TOKEN_REFUSED"}


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed with this reason."""


class AuthenticationFailed(ProtocolError):
    """The peer could not prove it holds the cluster key."""
