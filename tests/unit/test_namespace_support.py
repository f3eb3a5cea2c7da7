"""Shared helpers for the namespace tests: a client driver and seeded randomness.

Not a test module itself (pytest collects nothing here); the name keeps it in the
namespace tests' room.
"""

from __future__ import annotations

import errno
import functools
import os
import random
from collections.abc import Callable
from typing import Any, TypeVar

import hypothesis
import msgpack
import zstandard

from metaserver.namespace import Namespace, NamespaceConfig
from wire.ids import ROOT_INODE, ChunkId, ChunkVersion, ClientId, InodeId, SequenceNumber
from wire.namespace_ops import (
    ROOT_CREDENTIALS,
    Attr,
    ChunkReply,
    ChunkWrite,
    ClientCommand,
    CommitWrite,
    Create,
    Credentials,
    EntryReply,
    GetAttr,
    Lookup,
    Mkdir,
    Mknod,
    MutationCall,
    NsError,
    OpenChunk,
    OpenSession,
    ReadDir,
    Reply,
    RequestContext,
    SessionCommand,
    SessionReply,
    Symlink,
)

T = TypeVar("T")

ALICE = Credentials(1000, 1000, (1000,))
BOB = Credentials(1001, 1001, (1001,))
CAROL = Credentials(1002, 1002, (1002, 1000))
"""Carol is also in Alice's group 1000."""
ROOT = ROOT_CREDENTIALS
SMALL_CHUNK = 16
"""Chunk size of the test namespaces: a few bytes show every boundary case."""


def seed_from_environment(test_name: str) -> int:
    """The seed of a randomised test: ``PAXFS_SEED`` if set, else a fresh one; printed
    so a failure can be replayed with ``PAXFS_SEED=<seed> pytest ...``."""
    raw = os.environ.get("PAXFS_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 32)
    print(f"{test_name}: PAXFS_SEED={seed}")
    return seed


def seeded(test: Callable[..., T]) -> Callable[..., T]:
    """Seed a Hypothesis test from PAXFS_SEED; the seed is printed when the test runs
    (pytest shows it with the failure)."""
    seed = seed_from_environment(test.__name__)
    inner = hypothesis.seed(seed)(test)

    @functools.wraps(inner)
    def run(*args: Any, **kwargs: Any) -> T:
        print(f"{test.__name__}: PAXFS_SEED={seed}")
        return inner(*args, **kwargs)

    return run


class Client:
    """One session on a namespace: numbers requests and advances a fake leader clock."""

    def __init__(self, namespace: Namespace | None = None, credentials: Credentials = ROOT) -> None:
        self.ns = namespace or Namespace(NamespaceConfig(chunk_size_bytes=SMALL_CHUNK))
        self.credentials = credentials
        self.now_ns = 1_000_000_000
        opened = self.ns.apply(SessionCommand(self.tick(), OpenSession()))
        assert isinstance(opened, SessionReply)
        self.client: ClientId = opened.client
        self.seq = 0

    def tick(self) -> int:
        self.now_ns += 1_000
        return self.now_ns

    def command(self, op: Any, cred: Credentials | None = None) -> ClientCommand:
        """The next client command for ``op`` (not applied)."""
        self.seq += 1
        seq = SequenceNumber(self.seq)
        context = RequestContext(self.client, seq, seq, cred or self.credentials)
        return ClientCommand(self.tick(), MutationCall(context, op))

    def run(self, op: Any, cred: Credentials | None = None) -> Reply:
        return self.ns.apply(self.command(op, cred))

    def ok(self, op: Any, cred: Credentials | None = None) -> Any:
        reply = self.run(op, cred)
        assert not isinstance(reply, NsError), f"{op} failed: {errname(reply.errno)}"
        return reply

    def err(self, op: Any, cred: Credentials | None = None) -> int:
        reply = self.run(op, cred)
        assert isinstance(reply, NsError), f"{op} succeeded: {reply}"
        return reply.errno

    def query(self, op: Any, cred: Credentials | None = None) -> Any:
        return self.ns.query(op, cred or self.credentials)

    def qok(self, op: Any, cred: Credentials | None = None) -> Any:
        reply = self.query(op, cred)
        assert not isinstance(reply, NsError), f"{op} failed: {errname(reply.errno)}"
        return reply

    def qerr(self, op: Any, cred: Credentials | None = None) -> int:
        reply = self.query(op, cred)
        assert isinstance(reply, NsError), f"{op} succeeded: {reply}"
        return reply.errno

    # ---------------------------------------------------------------- shortcuts

    def mkdir(
        self,
        name: bytes,
        parent: int = ROOT_INODE,
        mode: int = 0o755,
        cred: Credentials | None = None,
    ) -> InodeId:
        reply: EntryReply = self.ok(Mkdir(InodeId(parent), name, mode), cred)
        return reply.attr.ino

    def mknod(
        self,
        name: bytes,
        parent: int = ROOT_INODE,
        mode: int = 0o100644,
        cred: Credentials | None = None,
    ) -> InodeId:
        reply: EntryReply = self.ok(Mknod(InodeId(parent), name, mode), cred)
        return reply.attr.ino

    def create(
        self,
        name: bytes,
        parent: int = ROOT_INODE,
        mode: int = 0o644,
        cred: Credentials | None = None,
    ) -> InodeId:
        """Create and open (like open(O_CREAT|O_EXCL))."""
        reply: EntryReply = self.ok(Create(InodeId(parent), name, mode, True), cred)
        return reply.attr.ino

    def symlink(self, name: bytes, target: bytes, parent: int = ROOT_INODE) -> InodeId:
        reply: EntryReply = self.ok(Symlink(InodeId(parent), name, target))
        return reply.attr.ino

    def attr(self, ino: int) -> Attr:
        return self.qok(GetAttr(InodeId(ino))).attr  # type: ignore[no-any-return]

    def lookup(self, name: bytes, parent: int = ROOT_INODE) -> Attr:
        return self.qok(Lookup(InodeId(parent), name)).attr  # type: ignore[no-any-return]

    def names(self, directory: int = ROOT_INODE) -> set[bytes]:
        found: set[bytes] = set()
        cookie = 0
        while True:
            page = self.qok(ReadDir(InodeId(directory), cookie, 7))
            found.update(entry.name for entry in page.entries)
            if page.eof:
                return found
            cookie = page.entries[-1].cookie

    def write(self, ino: int, offset: int, length: int, cred: Credentials | None = None) -> Attr:
        """Write ``length`` bytes at ``offset`` the way a client does: open each chunk
        touched, then commit them all in one CommitWrite."""
        chunk_size = self.ns.config.chunk_size_bytes
        writes = []
        position, end = offset, offset + length
        while position < end:
            index = position // chunk_size
            chunk_end = min(end, (index + 1) * chunk_size)
            opened: ChunkReply = self.ok(OpenChunk(InodeId(ino), index), cred)
            writes.append(
                ChunkWrite(index, opened.chunk, opened.version, chunk_end - index * chunk_size)
            )
            position = chunk_end
        return self.ok(CommitWrite(InodeId(ino), tuple(writes)), cred).attr  # type: ignore[no-any-return]


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def chunk_write(index: int, chunk: int, version: int, end: int) -> ChunkWrite:
    return ChunkWrite(index, ChunkId(chunk), ChunkVersion(version), end)


def snapshot_records(snapshot: bytes) -> list[object]:
    """The msgpack records of a namespace snapshot, to edit (an older format, a bad row)."""
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(snapshot)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(raw)
    return list(unpacker)


def pack_snapshot(records: list[object]) -> bytes:
    """A snapshot made of ``records`` (the inverse of :func:`snapshot_records`)."""
    raw = b"".join(msgpack.packb(record, use_bin_type=True) for record in records)
    return zstandard.ZstdCompressor().compress(raw)
