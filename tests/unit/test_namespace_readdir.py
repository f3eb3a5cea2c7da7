"""readdir: complete listings, bounded pages, and cookies that stay valid while the
directory changes."""

from __future__ import annotations

import errno
import random

import pytest

import metaserver.namespace._cookies as cookies
from metaserver.namespace._cookies import BLOCK_ENTRIES_MAX, CookieIndex, cookie_of
from wire.ids import ROOT_INODE, InodeId
from wire.namespace_ops import (
    READDIR_FIRST_COOKIE,
    READDIR_PAGE_MAX,
    Mknod,
    ReadDir,
    Unlink,
)

from .test_namespace_support import Client, seed_from_environment

ROOT = InodeId(ROOT_INODE)


@pytest.fixture
def c() -> Client:
    return Client()


def test_an_empty_directory_lists_nothing(c: Client) -> None:
    page = c.qok(ReadDir(ROOT))
    assert page.entries == () and page.eof


def test_entries_carry_their_attributes_and_cookies_above_the_reserved_ones(c: Client) -> None:
    f = c.mknod(b"f")
    (entry,) = c.qok(ReadDir(ROOT)).entries
    assert entry.name == b"f" and entry.attr == c.attr(f)
    assert entry.cookie >= READDIR_FIRST_COOKIE
    assert c.qok(ReadDir(ROOT, 2)).entries == (entry,)


def test_paging_lists_every_entry_exactly_once(c: Client) -> None:
    names = {b"n%04d" % i for i in range(300)}
    for name in names:
        c.mknod(name)
    listed: list[bytes] = []
    cookie = 0
    while True:
        page = c.qok(ReadDir(ROOT, cookie, 17))
        assert len(page.entries) <= 17
        listed.extend(entry.name for entry in page.entries)
        if page.eof:
            break
        cookie = page.entries[-1].cookie
    assert sorted(listed) == sorted(names)


def test_a_page_is_clamped_to_the_maximum(c: Client) -> None:
    for i in range(READDIR_PAGE_MAX + 5):
        c.mknod(b"%d" % i)
    page = c.qok(ReadDir(ROOT, 0, 10**9))
    assert len(page.entries) == READDIR_PAGE_MAX and not page.eof


def test_bad_readdir_arguments_are_refused(c: Client) -> None:
    assert c.qerr(ReadDir(ROOT, -1)) == errno.EINVAL
    assert c.qerr(ReadDir(ROOT, 0, 0)) == errno.EINVAL
    assert c.qerr(ReadDir(c.mknod(b"f"))) == errno.ENOTDIR
    assert c.qerr(ReadDir(InodeId(999))) == errno.ENOENT


def test_a_listing_never_skips_or_repeats_while_others_come_and_go(c: Client) -> None:
    """Entries present throughout appear exactly once; churned ones at most once."""
    rng = random.Random(seed_from_environment("readdir churn"))
    stable = {b"stable%03d" % i for i in range(200)}
    for name in stable:
        c.mknod(name)
    churn = [b"churn%04d" % i for i in range(400)]
    present: set[bytes] = set()
    listed: list[bytes] = []
    cookie = 0
    while True:
        page = c.qok(ReadDir(ROOT, cookie, 9))
        listed.extend(entry.name for entry in page.entries)
        if page.eof:
            break
        cookie = page.entries[-1].cookie
        for _ in range(20):
            name = rng.choice(churn)
            if name in present:
                c.ok(Unlink(ROOT, name))
                present.discard(name)
            else:
                c.ok(Mknod(ROOT, name, 0o644))
                present.add(name)
    assert sorted(n for n in listed if n in stable) == sorted(stable)
    assert len(listed) == len(set(listed))
    c.ns.verify()


def test_a_cookie_of_a_removed_entry_still_resumes_the_listing(c: Client) -> None:
    for i in range(50):
        c.mknod(b"%02d" % i)
    first = c.qok(ReadDir(ROOT, 0, 10))
    last = first.entries[-1]
    c.ok(Unlink(ROOT, last.name))
    rest = c.names()  # sanity: full listing still works
    resumed: list[bytes] = []
    cookie = last.cookie
    while True:
        page = c.qok(ReadDir(ROOT, cookie, 10))
        resumed.extend(entry.name for entry in page.entries)
        if page.eof:
            break
        cookie = page.entries[-1].cookie
    seen = [entry.name for entry in first.entries[:-1]]
    assert sorted(seen + resumed) == sorted(rest)


def test_cookies_are_the_same_on_every_replica_and_after_restore(c: Client) -> None:
    for i in range(20):
        c.mknod(b"%d" % i)
    before = c.qok(ReadDir(ROOT)).entries
    restored = Client(type(c.ns).restore(c.ns.snapshot()))
    assert [(e.name, e.cookie) for e in restored.qok(ReadDir(ROOT)).entries] == [
        (e.name, e.cookie) for e in before
    ]


# ---------------------------------------------------------------- the index itself


def test_the_cookie_index_survives_block_splits_and_merges() -> None:
    rng = random.Random(seed_from_environment("cookie index"))
    index = CookieIndex()
    names: set[bytes] = set()
    for _ in range(6 * BLOCK_ENTRIES_MAX):
        name = b"%d" % rng.randrange(4 * BLOCK_ENTRIES_MAX)
        if name in names:
            index.remove(name)
            names.discard(name)
        else:
            index.add(name)
            names.add(name)
    assert index.pairs() == sorted((cookie_of(n), n) for n in names)
    assert len(index) == len(names)
    for name in list(names):
        index.remove(name)
    assert index.pairs() == [] and index.page_after(0, 5) == ([], True)


def test_a_page_never_ends_inside_a_run_of_equal_cookies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force collisions by hashing names to few cookies."""
    monkeypatch.setattr(cookies, "cookie_of", lambda name: READDIR_FIRST_COOKIE + name[0] % 3)
    index = cookies.CookieIndex([b"%c%d" % (65 + i % 6, i) for i in range(3000)])
    for i in range(3000, 3400):
        index.add(b"%c%d" % (65 + i % 6, i))
    seen: list[bytes] = []
    cookie = 0
    while True:
        page, done = index.page_after(cookie, 2)
        seen.extend(name for _, name in page)
        if done:
            break
        cookie = page[-1][0]
    assert len(seen) == 3400 == len(set(seen))
    assert index.pairs() == sorted(index.pairs())
