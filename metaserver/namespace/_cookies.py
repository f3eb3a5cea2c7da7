"""Stable readdir cookies: a directory listed in the order of a hash of each name.

Why a hash and not an insertion counter: a cookie that is a pure function of the name
never changes while an entry exists, needs no per-entry storage in the snapshot, and is
the same on every replica and after a restore.  Adding or removing other names cannot
move an entry across a cookie a reader holds, so a listing resumed from any cookie
neither repeats nor skips an entry that exists throughout (the ext4 htree approach).

Two names may share a cookie (a 62-bit hash collision).  A page therefore never ends
between entries with equal cookies: a reader resuming after that cookie has seen them
all.  Equal cookies are ordered by name so the order is deterministic.

The sorted index is a list of blocks of at most ``BLOCK_ENTRIES_MAX`` entries (each a
cookie array and a parallel name list), plus the last cookie of every block: adding or
removing a name costs O(log n + block), not O(n).
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from wire.invariant import invariant
from wire.namespace_ops import READDIR_FIRST_COOKIE

BLOCK_ENTRIES_MAX = 1024
"""A block splits in two when it grows past this many entries."""


def cookie_of(name: bytes) -> int:
    """The readdir cookie of ``name``: 62 hash bits offset past the reserved cookies."""
    digest = hashlib.blake2b(name, digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 2) + READDIR_FIRST_COOKIE


class CookieIndex:
    """The names of one directory sorted by (cookie, name)."""

    __slots__ = ("_keys", "_names", "_maxes", "_length")

    def __init__(self, names: Iterable[bytes] = ()) -> None:
        pairs = sorted((cookie_of(name), name) for name in names)
        self._keys: list[array[int]] = []
        self._names: list[list[bytes]] = []
        self._maxes: array[int] = array("q")
        self._length = len(pairs)
        half = BLOCK_ENTRIES_MAX // 2
        for start in range(0, len(pairs), half):
            block = pairs[start : start + half]
            self._keys.append(array("q", [cookie for cookie, _ in block]))
            self._names.append([name for _, name in block])
            self._maxes.append(block[-1][0])

    def __len__(self) -> int:
        return self._length

    def add(self, name: bytes) -> None:
        cookie = cookie_of(name)
        if not self._keys:
            self._keys.append(array("q", [cookie]))
            self._names.append([name])
            self._maxes.append(cookie)
            self._length = 1
            return
        block = min(bisect_left(self._maxes, cookie), len(self._keys) - 1)
        keys, names = self._keys[block], self._names[block]
        position = bisect_left(keys, cookie)
        while True:
            while position < len(keys) and keys[position] == cookie and names[position] < name:
                position += 1
            # A run of equal cookies may continue in the next block.
            following = block + 1
            if (
                position < len(keys)
                or following == len(self._keys)
                or self._keys[following][0] != cookie
                or self._names[following][0] > name
            ):
                break
            block, position = following, 0
            keys, names = self._keys[block], self._names[block]
        keys.insert(position, cookie)
        names.insert(position, name)
        self._maxes[block] = keys[-1]
        self._length += 1
        if len(keys) > BLOCK_ENTRIES_MAX:
            half = len(keys) // 2
            self._keys[block : block + 1] = [keys[:half], keys[half:]]
            self._names[block : block + 1] = [names[:half], names[half:]]
            self._maxes[block : block + 1] = array("q", [keys[half - 1], keys[-1]])

    def remove(self, name: bytes) -> None:
        cookie = cookie_of(name)
        block = bisect_left(self._maxes, cookie)
        while True:
            invariant(block < len(self._keys), "readdir index lost a name")
            keys, names = self._keys[block], self._names[block]
            position = bisect_left(keys, cookie)
            while position < len(keys) and keys[position] == cookie and names[position] != name:
                position += 1
            if position < len(keys) and keys[position] == cookie:
                break
            # Equal cookies may straddle a block boundary: look in the next block.
            block += 1
        del keys[position]
        del names[position]
        self._length -= 1
        if keys:
            self._maxes[block] = keys[-1]
        else:
            del self._keys[block]
            del self._names[block]
            del self._maxes[block]

    def page_after(self, cookie: int, limit: int) -> tuple[list[tuple[int, bytes]], bool]:
        """Up to ``limit`` (cookie, name) pairs with cookie > ``cookie``, extended so a page
        never ends inside a run of equal cookies; and whether the listing is complete."""
        page: list[tuple[int, bytes]] = []
        block = bisect_right(self._maxes, cookie)
        if block >= len(self._keys):
            return page, True
        position = bisect_right(self._keys[block], cookie)
        while block < len(self._keys):
            keys, names = self._keys[block], self._names[block]
            while position < len(keys):
                key = keys[position]
                if len(page) >= limit and key != page[-1][0]:
                    return page, False
                page.append((key, names[position]))
                position += 1
            block += 1
            position = 0
        return page, True

    def pairs(self) -> list[tuple[int, bytes]]:
        """Every (cookie, name) in order (for checks)."""
        return [
            (key, name)
            for keys, names in zip(self._keys, self._names, strict=True)
            for key, name in zip(keys, names, strict=True)
        ]
