"""Mutual authentication of a new connection against the cluster key.

HMAC-SHA256 challenge-response with a fresh 32-byte nonce from each side::

    dialer   -> listener : ["paxfs/1", dialer_name, nonce_d]
    listener -> dialer   : [nonce_l, HMAC(key, "listener" | nonce_d | nonce_l)]
    dialer   -> listener : [HMAC(key, "dialer" | nonce_d | nonce_l)]
    listener -> dialer   : ["ok"]

A dialer that finds the listener's proof wrong answers ``["key-mismatch"]``
instead of its own proof, so that both ends log the real cause.

Each side proves knowledge of the key over a nonce the *other* side just
chose, so a recorded handshake is useless later (the peer's nonce differs),
and the role labels stop a proof made as one side from being reflected as the
other.  This authenticates; it does not encrypt (the cluster runs on a
trusted network, as HDFS without Kerberos or MooseFS do).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

import trio

from wire.errors import AuthenticationFailed, ProtocolError
from wire.framing import FrameReader, FrameWriter

PROTOCOL = "paxfs/1"
NONCE_BYTES = 32
KEY_BYTES_MIN = 16
HANDSHAKE_TIMEOUT_S = 5.0
PEER_NAME_CHARS_MAX = 128
KEY_MISMATCH = "key-mismatch"

log = logging.getLogger(__name__)


def proof(key: bytes, role: bytes, dialer_nonce: bytes, listener_nonce: bytes) -> bytes:
    """HMAC-SHA256 of the role label and both nonces under the cluster key."""
    return hmac.new(
        key, role + b"|" + dialer_nonce + b"|" + listener_nonce, hashlib.sha256
    ).digest()


def check_key(key: bytes) -> None:
    """Refuse keys too short to be a secret."""
    if len(key) < KEY_BYTES_MIN:
        raise ValueError(f"cluster key must be at least {KEY_BYTES_MIN} bytes")


async def _receive(reader: FrameReader) -> list[object]:
    frame = await reader.receive()
    if frame is None:
        raise AuthenticationFailed("peer closed the connection during the handshake")
    header, _payload = frame
    if not isinstance(header, list):
        raise AuthenticationFailed("malformed handshake message")
    return header


def _nonce(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise AuthenticationFailed("malformed handshake nonce")
    return value


async def authenticate_as_dialer(
    reader: FrameReader, writer: FrameWriter, key: bytes, name: str
) -> None:
    """Run the dialer's half; raises AuthenticationFailed unless the listener knows the key."""
    dialer_nonce = secrets.token_bytes(NONCE_BYTES)
    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
        await writer.send([PROTOCOL, name[:PEER_NAME_CHARS_MAX], dialer_nonce])
        reply = await _receive(reader)
        if len(reply) != 2 or not isinstance(reply[1], bytes):
            raise AuthenticationFailed("malformed handshake reply")
        listener_nonce = _nonce(reply[0])
        expected = proof(key, b"listener", dialer_nonce, listener_nonce)
        if not hmac.compare_digest(expected, reply[1]):
            # Tell the listener why we hang up, so both sides log the real cause.
            await writer.send([KEY_MISMATCH])
            raise AuthenticationFailed("listener does not hold the cluster key")
        await writer.send([proof(key, b"dialer", dialer_nonce, listener_nonce)])
        verdict = await _receive(reader)
        if verdict != ["ok"]:
            raise AuthenticationFailed("listener refused our proof")


async def authenticate_as_listener(reader: FrameReader, writer: FrameWriter, key: bytes) -> str:
    """Run the listener's half; return the dialer's self-declared name."""
    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
        hello = await _receive(reader)
        if len(hello) != 3 or hello[0] != PROTOCOL or not isinstance(hello[1], str):
            raise AuthenticationFailed(f"not a {PROTOCOL} client")
        dialer_nonce = _nonce(hello[2])
        listener_nonce = secrets.token_bytes(NONCE_BYTES)
        await writer.send([listener_nonce, proof(key, b"listener", dialer_nonce, listener_nonce)])
        answer = await _receive(reader)
        expected = proof(key, b"dialer", dialer_nonce, listener_nonce)
        if answer == [KEY_MISMATCH]:
            raise AuthenticationFailed(
                f"dialer {hello[1][:PEER_NAME_CHARS_MAX]!r} holds a different cluster key"
            )
        if len(answer) != 1 or not isinstance(answer[0], bytes):
            raise AuthenticationFailed("malformed handshake proof")
        if not hmac.compare_digest(expected, answer[0]):
            raise AuthenticationFailed("dialer does not hold the cluster key")
        await writer.send(["ok"])
        return hello[1]


__all__ = [
    "AuthenticationFailed",
    "ProtocolError",
    "authenticate_as_dialer",
    "authenticate_as_listener",
    "check_key",
    "proof",
]
