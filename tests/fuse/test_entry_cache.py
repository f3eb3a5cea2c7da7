"""The mount's entry cache (:class:`fuse_client.entry_cache.EntryCache`), without a kernel: answers
expire with the configured timeouts, changes made through the mount are never hidden
(fetches in flight are fenced), nothing negative is answered, memory is bounded, and a
scan of a directory triggers one listing ahead.

The model test is seeded; replay a failure with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import replace

import hypothesis
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_client.entry_cache import STATAHEAD_FOUND_MISSES, STATAHEAD_PAUSE_S, EntryCache
from wire.ids import InodeId
from wire.namespace_ops import Attr, DirEntry

DIR = InodeId(10)
OTHER_DIR = InodeId(11)


def attr(ino: int, mode: int = 0o644, size: int = 0) -> Attr:
    return Attr(
        ino=InodeId(ino),
        generation=1,
        mode=stat.S_IFREG | mode,
        nlink=1,
        uid=0,
        gid=0,
        rdev=0,
        size=size,
        blocks=0,
        atime_ns=0,
        mtime_ns=0,
        ctime_ns=0,
        goal=3,
        compress=False,
    )


def test_answers_carry_what_is_left_of_the_timeouts_and_then_expire() -> None:
    cache = EntryCache(entry_timeout_s=1.0, attr_timeout_s=2.0)
    cache.add(DIR, b"f", attr(20), cache.stamp(), now_s=100.0)
    assert cache.entry(DIR, b"f", 100.25) == (attr(20), 0.75, 1.75)
    assert cache.attr(InodeId(20), 101.5) == (attr(20), 0.5)
    assert cache.entry(DIR, b"f", 101.0) is None  # the name expired
    assert cache.attr(InodeId(20), 102.0) is None
    assert cache.entry(DIR, b"g", 100.0) is None
    assert cache.entry(OTHER_DIR, b"f", 100.0) is None


def test_nothing_negative_is_answered_and_zero_timeouts_disable_it() -> None:
    cache = EntryCache(1.0, 1.0)
    cache.add(DIR, b"missing", None, cache.stamp(), 0.0)
    assert cache.entry(DIR, b"missing", 0.0) is None
    off = EntryCache(0.0, 0.0)
    off.add(DIR, b"f", attr(20), off.stamp(), 0.0)
    assert off.entry(DIR, b"f", 0.0) is None and off.attr(InodeId(20), 0.0) is None
    assert not off.enabled


def test_a_change_made_here_fences_fetches_that_were_in_flight() -> None:
    cache = EntryCache(1.0, 1.0)
    before = cache.stamp()
    cache.changed(InodeId(20))  # say a chmod through this mount, answered meanwhile
    cache.add(DIR, b"f", attr(20, mode=0o600), before, 0.0)
    assert cache.entry(DIR, b"f", 0.0) is None
    cache.add_listing(DIR, [DirEntry(b"f", 3, attr(20, mode=0o600))], before, 0.0)
    assert cache.attr(InodeId(20), 0.0) is None
    after = cache.stamp()
    cache.add(DIR, b"f", attr(20, mode=0o644), after, 0.0)
    assert cache.entry(DIR, b"f", 0.0) == (attr(20, mode=0o644), 1.0, 1.0)
    cache.changed(InodeId(20))
    assert cache.entry(DIR, b"f", 0.0) is None, "a change drops the cached attributes"


def test_a_listing_started_before_a_change_of_its_directory_is_refused() -> None:
    cache = EntryCache(1.0, 1.0)
    before = cache.stamp()
    cache.removed(DIR, b"gone")  # unknown name: everything is dropped and fenced
    cache.add_listing(DIR, [DirEntry(b"gone", 3, attr(20))], before, 0.0)
    assert cache.entry(DIR, b"gone", 0.0) is None


def test_removal_drops_the_name_and_the_inode_and_an_unknown_name_drops_all() -> None:
    cache = EntryCache(1.0, 1.0)
    stamp = cache.stamp()
    cache.add(DIR, b"a", attr(20), stamp, 0.0)
    cache.add(DIR, b"hardlink", attr(20), stamp, 0.0)
    cache.add(DIR, b"b", attr(21), stamp, 0.0)
    cache.add(OTHER_DIR, b"c", attr(22), stamp, 0.0)
    cache.removed(DIR, b"a")
    assert cache.entry(DIR, b"a", 0.0) is None
    assert cache.entry(DIR, b"hardlink", 0.0) is None, "the inode's nlink changed"
    assert cache.entry(DIR, b"b", 0.0) is not None
    cache.add(DIR, b"absent", None, cache.stamp(), 0.0)
    cache.removed(DIR, b"absent")  # known to be absent: nothing else to drop
    assert cache.entry(DIR, b"b", 0.0) is not None
    cache.removed(DIR, b"never-seen")
    assert cache.entry(DIR, b"b", 0.0) is None and cache.entry(OTHER_DIR, b"c", 0.0) is None
    assert len(cache) == 0


def test_a_name_made_here_is_answered_and_its_directory_attributes_dropped() -> None:
    cache = EntryCache(1.0, 1.0)
    directory = replace(attr(int(DIR)), mode=stat.S_IFDIR | 0o755)
    cache.add_attr(directory, cache.stamp(), 0.0)
    cache.added(DIR, b"new", attr(30), 0.5, new_inode=True)
    assert cache.attr(DIR, 0.5) is None, "its mtime changed"
    assert cache.entry(DIR, b"new", 0.5) == (attr(30), 1.0, 1.0)
    assert cache.xattr_absent(InodeId(30), b"security.capability", 1.4)
    assert not cache.xattr_absent(InodeId(30), b"security.capability", 1.5), "expired"
    cache.added(DIR, b"hardlink", attr(31), 2.0, new_inode=False)
    assert not cache.xattr_absent(InodeId(31), b"user.x", 2.0)


def test_absent_xattrs_are_remembered_until_a_change_here() -> None:
    cache = EntryCache(1.0, 1.0)
    stamp = cache.stamp()
    cache.add_xattr_absent(InodeId(20), b"user.a", stamp, 0.0)
    assert cache.xattr_absent(InodeId(20), b"user.a", 0.5)
    assert not cache.xattr_absent(InodeId(20), b"user.b", 0.5)
    cache.changed(InodeId(20))  # a setxattr through this mount
    assert not cache.xattr_absent(InodeId(20), b"user.a", 0.5)
    cache.add_xattr_absent(InodeId(20), None, stamp, 0.0)  # fenced: asked before
    assert not cache.xattr_absent(InodeId(20), b"user.b", 0.5)


def test_a_scan_of_different_names_asks_for_one_listing_per_entry_timeout() -> None:
    cache = EntryCache(1.0, 1.0)
    names = [b"f%d" % index for index in range(3 * STATAHEAD_FOUND_MISSES)]
    wants = [cache.note_found(DIR, name, 0.0) for name in names[:STATAHEAD_FOUND_MISSES]]
    assert wants == [False] * (STATAHEAD_FOUND_MISSES - 1) + [True]
    cache.listing_started(DIR, 0.0)
    assert not any(cache.note_found(DIR, name, 0.5) for name in names), "one at a time"
    cache.listing_ended(DIR, 0.6, complete=True)
    assert not any(cache.note_found(DIR, name, 0.9) for name in names), "once a timeout"
    assert cache.note_found(DIR, b"later", 1.0)
    cache.listing_started(DIR, 1.0)
    cache.listing_ended(DIR, 1.1, complete=False)  # too large: leave it alone a while
    assert not any(cache.note_found(DIR, name, 2.0) for name in names)
    assert cache.note_found(DIR, b"x", 1.0 + STATAHEAD_PAUSE_S + 0.1)


def test_a_path_walk_or_a_create_loop_is_no_scan() -> None:
    cache = EntryCache(1.0, 1.0)
    assert not any(cache.note_found(DIR, b"same", float(t)) for t in range(20))
    for index in range(20):  # each create looks the new name up first, in vain
        cache.add(DIR, b"n%d" % index, None, cache.stamp(), 0.0)
        assert not cache.note_found(DIR, b"other%d" % index, 0.0)


def test_memory_is_bounded() -> None:
    cache = EntryCache(1.0, 1.0, names_max=8, changes_max=4)
    stamp = cache.stamp()
    for directory in range(4):
        for index in range(4):
            cache.add(
                InodeId(100 + directory),
                b"%d" % index,
                attr(1000 + 10 * directory + index),
                stamp,
                0.0,
            )
    assert len(cache) <= 8
    assert cache.entry(InodeId(103), b"3", 0.0) is not None, "the newest directory stays"
    assert cache.entry(InodeId(100), b"0", 0.0) is None, "the oldest went first"
    for index in range(10):
        cache.add(DIR, b"big%d" % index, attr(2000 + index), cache.stamp(), 0.0)
    assert len(cache) <= 8
    old = cache.stamp()
    for index in range(6):  # past changes_max: every fetch in flight is fenced
        cache.changed(InodeId(5000 + index))
    cache.add(DIR, b"late", attr(6000), old, 0.0)
    assert cache.entry(DIR, b"late", 0.0) is None


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def _check_never_older_than_a_local_change(data: st.DataObject) -> None:
    """Random fetches (each stamped when it started, answered later) and local changes of
    three inodes: an answer is never a version from before that inode's last change."""
    cache = EntryCache(10.0, 10.0, names_max=4, changes_max=3)
    version = {20: 0, 21: 0, 22: 0}
    in_flight: list[tuple[int, int, int]] = []  # (stamp, inode, version when asked)
    for _ in range(data.draw(st.integers(1, 40))):
        ino = data.draw(st.sampled_from(sorted(version)))
        action = data.draw(st.sampled_from(["ask", "answer", "change", "remove"]))
        if action == "ask":
            in_flight.append((cache.stamp(), ino, version[ino]))
        elif action == "answer" and in_flight:
            stamp, asked, seen = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1)))
            cache.add(DIR, b"%d" % asked, attr(asked, size=seen), stamp, 0.0)
        elif action == "change":
            version[ino] += 1
            cache.changed(InodeId(ino))
        elif action == "remove":
            version[ino] += 1  # nlink and ctime change
            cache.removed(DIR, b"%d" % ino)
        for each in version:
            answer = cache.entry(DIR, b"%d" % each, 0.0)
            if answer is not None:
                assert answer[0].size == version[each], f"inode {each}: a stale answer"


def test_answers_are_never_older_than_a_change_made_here() -> None:
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"entry cache model seed {seed} (replay with PAXFS_SEED={seed})")
    hypothesis.seed(seed)(_check_never_older_than_a_local_change)()
