"""Chunk access tokens: only the metaserver's signature, for that chunk, in time, opens it."""

from __future__ import annotations

import dataclasses

import pytest

from wire.ids import ChunkId, ChunkVersion
from wire.tokens import (
    CLOCK_SKEW_S,
    TOKEN_LIFETIME_S,
    AccessMode,
    TokenRefused,
    check_token,
    sign_token,
)

KEY = b"k" * 32
CHUNK, VERSION = ChunkId(0xABC), ChunkVersion(7)
NOW = 1_800_000_000.0


def test_a_signed_write_token_grants_write_and_read() -> None:
    token = sign_token(KEY, CHUNK, VERSION, AccessMode.WRITE, NOW)
    check_token(KEY, token, CHUNK, VERSION, AccessMode.WRITE, NOW + 1)
    check_token(KEY, token, CHUNK, VERSION, AccessMode.READ, NOW + 1)


def test_a_read_token_does_not_grant_write() -> None:
    token = sign_token(KEY, CHUNK, VERSION, AccessMode.READ, NOW)
    with pytest.raises(TokenRefused, match="reading only"):
        check_token(KEY, token, CHUNK, VERSION, AccessMode.WRITE, NOW)


@pytest.mark.parametrize(
    "change",
    [
        {"chunk_id": ChunkId(0xABD)},
        {"version": ChunkVersion(8)},
        {"mode": AccessMode.WRITE},
        {"expires_at_s": NOW + 10 * TOKEN_LIFETIME_S},
        {"signature": b"\x00" * 32},
    ],
)
def test_an_altered_token_is_refused(change: dict[str, object]) -> None:
    token = sign_token(KEY, CHUNK, VERSION, AccessMode.READ, NOW)
    altered = dataclasses.replace(token, **change)  # type: ignore[arg-type]
    with pytest.raises(TokenRefused, match="forged or altered"):
        check_token(KEY, altered, altered.chunk_id, altered.version, AccessMode.READ, NOW)


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = sign_token(b"x" * 32, CHUNK, VERSION, AccessMode.READ, NOW)
    with pytest.raises(TokenRefused, match="forged"):
        check_token(KEY, token, CHUNK, VERSION, AccessMode.READ, NOW)


def test_a_token_for_another_chunk_or_version_is_refused() -> None:
    token = sign_token(KEY, CHUNK, VERSION, AccessMode.WRITE, NOW)
    with pytest.raises(TokenRefused, match="not"):
        check_token(KEY, token, ChunkId(1), VERSION, AccessMode.READ, NOW)
    with pytest.raises(TokenRefused, match="not"):
        check_token(KEY, token, CHUNK, ChunkVersion(6), AccessMode.READ, NOW)


def test_expiry_holds_until_the_skew_allowance_and_not_a_second_longer() -> None:
    token = sign_token(KEY, CHUNK, VERSION, AccessMode.READ, NOW)
    last_good = NOW + TOKEN_LIFETIME_S + CLOCK_SKEW_S
    check_token(KEY, token, CHUNK, VERSION, AccessMode.READ, last_good)
    with pytest.raises(TokenRefused, match="expired"):
        check_token(KEY, token, CHUNK, VERSION, AccessMode.READ, last_good + 1)
