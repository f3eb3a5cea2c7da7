"""Chunk access tokens: the metaserver's signed permission to touch one chunk.

A token names (chunk id, version, mode, expiry) and carries an HMAC-SHA256
under the cluster key, so a dataserver can check it without asking the
metaserver, and a client can reach only the chunks the namespace let it
reach.  ``expires_at_s`` is wall-clock Unix time: the cluster's machines are
expected to keep their clocks within ``CLOCK_SKEW_S`` (or what the metaservers are
configured to assume) of each other.

The allowance for a holder whose clock is behind the signer's is part of the signed
expiry, not added by the checker, so that only the signer needs to know it, and the
signer alone can tell when no dataserver accepts a token any more
(:func:`accepted_until_s`): that is what lets the metaserver leader recover a chunk
version whose writer went away without fencing a writer that may still use it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

from wire import schema
from wire.ids import ChunkId, ChunkVersion

CLOCK_SKEW_S = 30.0
TOKEN_LIFETIME_S = 600.0
_SIGNED = struct.Struct(">QQBd")


class AccessMode(IntEnum):
    READ = 1
    WRITE = 2


class TokenRefused(ValueError):
    """The token is forged, altered, expired, or for another chunk or mode."""


@schema.message("token.chunk")
@dataclass(frozen=True)
class ChunkToken:
    chunk_id: ChunkId
    version: ChunkVersion
    mode: AccessMode
    expires_at_s: float
    signature: bytes


def _signature(key: bytes, chunk_id: int, version: int, mode: int, expires_at_s: float) -> bytes:
    message = b"paxfs-chunk-token|" + _SIGNED.pack(chunk_id, version, mode, expires_at_s)
    return hmac.new(key, message, hashlib.sha256).digest()


def sign_token(
    key: bytes,
    chunk_id: ChunkId,
    version: ChunkVersion,
    mode: AccessMode,
    now_s: float,
    *,
    lifetime_s: float = TOKEN_LIFETIME_S,
    clock_skew_s: float = CLOCK_SKEW_S,
) -> ChunkToken:
    """A token valid for ``lifetime_s`` from ``now_s`` (the signer's clock), plus
    ``clock_skew_s`` for a checker whose clock is ahead of the signer's."""
    expires_at_s = now_s + lifetime_s + clock_skew_s
    return ChunkToken(
        chunk_id,
        version,
        mode,
        expires_at_s,
        _signature(key, chunk_id, version, mode, expires_at_s),
    )


def check_token(
    key: bytes,
    token: ChunkToken,
    chunk_id: ChunkId,
    version: ChunkVersion,
    mode: AccessMode,
    now_s: float,
) -> None:
    """Raise :class:`TokenRefused` unless ``token`` grants ``mode`` on this chunk version now.

    A write token also grants reads (the pipeline reads back what it wrote).
    """
    try:
        expected = _signature(key, token.chunk_id, token.version, token.mode, token.expires_at_s)
    except (struct.error, OverflowError):
        raise TokenRefused("malformed token") from None
    if not hmac.compare_digest(expected, token.signature):
        raise TokenRefused("token signature does not match (forged or altered)")
    if token.chunk_id != chunk_id or token.version != version:
        raise TokenRefused(
            f"token is for chunk {token.chunk_id:x} v{token.version}, not {chunk_id:x} v{version}"
        )
    if mode == AccessMode.WRITE and token.mode != AccessMode.WRITE:
        raise TokenRefused("token grants reading only")
    if token.expires_at_s < now_s:
        raise TokenRefused(f"token expired {now_s - token.expires_at_s:.0f} s ago")


def accepted_until_s(signed_at_s: float, lifetime_s: float, clock_skew_s: float) -> float:
    """The time, on the signer's clock, after which no dataserver whose clock is within
    ``clock_skew_s`` of it accepts a token that :func:`sign_token` made at
    ``signed_at_s`` with these settings (or any earlier one)."""
    return signed_at_s + lifetime_s + 2 * clock_skew_s
