"""The consistency check notices every kind of corruption it claims to look for (a check
that never fails would make every other test that calls ``verify()`` meaningless)."""

from __future__ import annotations

from array import array
from collections.abc import Callable

import pytest

from metaserver.namespace import Namespace
from metaserver.namespace._nodes import DirNode, FileNode
from metaserver.namespace._state import State
from wire.invariant import InvariantViolation

from .test_namespace_support import Client


def populated() -> tuple[Client, State]:
    c = Client()
    d = c.mkdir(b"d")
    f = c.create(b"f", d)
    c.write(f, 0, 40)
    c.mkdir(b"e", d)
    c.write(c.mknod(b"g"), 0, 5)
    state: State = c.ns._state  # the test corrupts internals on purpose
    return c, state


def file_named(state: State, ino: int) -> FileNode:
    node = state.inodes[ino]
    assert isinstance(node, FileNode)
    return node


def directory(state: State, ino: int) -> DirNode:
    node = state.inodes[ino]
    assert isinstance(node, DirNode)
    return node


CORRUPTIONS: dict[str, Callable[[State], None]] = {
    "nlink off by one": lambda s: setattr(file_named(s, 3), "nlink", 2),
    "directory nlink": lambda s: setattr(directory(s, 2), "nlink", 9),
    "wrong parent": lambda s: setattr(directory(s, 4), "parent", directory(s, 1)),
    "entry to a dead inode": lambda s: directory(s, 2).entries.update(
        {b"ghost": FileNode(99, 0o100644, 0, 0, 0, 3, False)}
    ),
    "mode of the wrong kind": lambda s: setattr(file_named(s, 3), "mode", 0o040755),
    "chunk referenced twice": lambda s: setattr(
        file_named(s, 5), "chunks", array("q", file_named(s, 3).chunks or [])
    ),
    "chunk past the size": lambda s: setattr(file_named(s, 3), "file_size", 1),
    "current chunk queued": lambda s: s.deletions.update({1: 1}),
    "counter drift": lambda s: setattr(s, "chunk_bytes", s.chunk_bytes + 1),
    "open count drift": lambda s: s.open_counts.update({3: 7}),
    "unlinked and unopened": lambda s: (
        setattr(file_named(s, 5), "nlink", 0),
        directory(s, 1).entries.pop(b"g"),
    ),
    "reply outside the window": lambda s: next(iter(s.sessions.values())).replies.update(
        {10**6: next(iter(next(iter(s.sessions.values())).replies.values()))}
    ),
    "detached cycle": lambda s: setattr(directory(s, 2), "parent", directory(s, 4)),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_verify_notices(corrupt: Callable[[State], None]) -> None:
    c, state = populated()
    c.ns.verify()
    corrupt(state)
    with pytest.raises(InvariantViolation):
        c.ns.verify()


def test_a_healthy_namespace_passes_and_restores() -> None:
    c, _ = populated()
    c.ns.verify()
    Namespace.restore(c.ns.snapshot()).verify()
