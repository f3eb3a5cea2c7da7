"""Namespace state machine benchmark: prints applies/s, queries/s, readdir paging speed,
memory per file, and snapshot/digest cost.

    .venv/bin/python benchmarks/bench_namespace.py [--files 1000000] [--ops 200000]

Targets (issue 3): >= 100,000 applies/s on the create-heavy mix, <= 1 KiB per
single-chunk file.  Commands are generated up front; "apply" times ``apply()`` on
decoded commands, "decode+apply" adds ``decode_command`` of the log bytes.  Numbers on
a shared machine vary by tens of percent from run to run; the create-only baseline of
the same run is printed so mixes can be compared with it.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from metaserver.namespace import Namespace, NamespaceConfig, decode_command, encode_command
from wire.ids import ROOT_INODE, ChunkId, ChunkVersion, ClientId, InodeId, SequenceNumber
from wire.namespace_ops import (
    ChunkWrite,
    ClientCommand,
    Command,
    CommitWrite,
    Credentials,
    GetAttr,
    Lookup,
    Mkdir,
    Mknod,
    MutationCall,
    OpenChunk,
    OpenSession,
    ReadDir,
    Rename,
    RequestContext,
    SessionCommand,
    SessionReply,
    SetAttr,
    Unlink,
)

USER = Credentials(1000, 1000, (1000,))
FILES_PER_DIRECTORY = 1000
CHUNK_BYTES = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class Log:
    """Numbers client commands of one session and stamps them with a fake leader clock."""

    def __init__(self, namespace: Namespace) -> None:
        opened = namespace.apply(SessionCommand(1, OpenSession()))
        assert isinstance(opened, SessionReply)
        self.client: ClientId = opened.client
        self.seq = 0
        self.now_ns = 1_700_000_000_000_000_000

    def command(self, op: Any) -> ClientCommand:
        self.seq += 1
        self.now_ns += 1000
        seq = SequenceNumber(self.seq)
        context = RequestContext(self.client, seq, seq, USER)
        return ClientCommand(self.now_ns, MutationCall(context, op))


def build(files: int) -> tuple[Namespace, Log, list[InodeId], array[int], array[int], float]:
    """``files`` single-chunk files in directories of FILES_PER_DIRECTORY; returns the
    namespace, its session, the directories, the files' inode numbers and chunk ids (as
    compact arrays, so the bookkeeping barely weighs on the memory figure), and the
    seconds taken."""
    namespace = Namespace(NamespaceConfig(chunk_size_bytes=64 << 20))
    log = Log(namespace)
    directories: list[InodeId] = []
    inodes, chunks = array("q"), array("q")
    started = time.perf_counter()
    for d in range(max(1, files // FILES_PER_DIRECTORY)):
        reply = namespace.apply(log.command(Mkdir(InodeId(ROOT_INODE), b"dir%05d" % d, 0o755)))
        directories.append(reply.attr.ino)  # type: ignore[union-attr]
    for i in range(files):
        parent = directories[i // FILES_PER_DIRECTORY]
        reply = namespace.apply(log.command(Mknod(parent, b"file%07d" % i, 0o100644)))
        ino = reply.attr.ino  # type: ignore[union-attr]
        opened = namespace.apply(log.command(OpenChunk(ino, 0)))
        chunk = opened.chunk  # type: ignore[union-attr]
        write = ChunkWrite(0, chunk, opened.version, CHUNK_BYTES)  # type: ignore[union-attr]
        namespace.apply(log.command(CommitWrite(ino, (write,))))
        inodes.append(ino)
        chunks.append(chunk)
    return namespace, log, directories, inodes, chunks, time.perf_counter() - started


class MixGenerator:
    """Create-heavy mixes: 60% creates, 5% mkdir, 10% chmod or utimes, 8% unlink,
    7% rename, 10% writes (open chunk + commit).  Successive mixes use fresh names and
    files never written before, so every command succeeds."""

    def __init__(
        self,
        log: Log,
        directories: list[InodeId],
        inodes: array[int],
        chunks: array[int],
        rng: random.Random,
    ) -> None:
        self.log, self.directories, self.inodes, self.chunks = log, directories, inodes, chunks
        self.rng = rng
        self.unwritten = list(range(len(inodes)))
        rng.shuffle(self.unwritten)
        self.serial = 0

    def mix(self, count: int) -> list[Command]:
        rng, log = self.rng, self.log
        commands: list[Command] = []
        created: list[tuple[InodeId, bytes]] = []
        for _ in range(count):
            self.serial += 1
            roll = rng.random()
            parent = rng.choice(self.directories)
            if roll < 0.60 or not created:
                name = b"new%08d" % self.serial
                op: Any = Mknod(parent, name, 0o100644)
                created.append((parent, name))
            elif roll < 0.65:
                op = Mkdir(parent, b"sub%08d" % self.serial, 0o755)
            elif roll < 0.75:
                target = InodeId(rng.choice(self.inodes))
                op = SetAttr(target, mode=0o600) if roll < 0.70 else SetAttr(target, mtime_now=True)
            elif roll < 0.83:
                where, name = created.pop(rng.randrange(len(created)))
                op = Unlink(where, name)
            elif roll < 0.90:
                where, name = created.pop(rng.randrange(len(created)))
                op = Rename(where, name, where, name + b".renamed")
                created.append((where, name + b".renamed"))
            else:
                position = self.unwritten.pop()
                target, chunk = InodeId(self.inodes[position]), ChunkId(self.chunks[position])
                commands.append(log.command(OpenChunk(target, 0)))
                # Built files hold version 1; the open makes it 2.
                op = CommitWrite(target, (ChunkWrite(0, chunk, ChunkVersion(2), CHUNK_BYTES),))
            commands.append(log.command(op))
        return commands


def timed_apply(namespace: Namespace, commands: Sequence[Command]) -> tuple[float, int]:
    """Seconds to apply ``commands``; and how many failed (should be 0)."""
    apply = namespace.apply
    gc.collect()
    started = time.perf_counter()
    replies = [apply(command) for command in commands]
    elapsed = time.perf_counter() - started
    failures = sum(1 for reply in replies if type(reply).__name__ == "NsError")
    return elapsed, failures


def timed_decode_apply(namespace: Namespace, raw: Sequence[bytes]) -> float:
    apply = namespace.apply
    gc.collect()
    started = time.perf_counter()
    for entry in raw:
        apply(decode_command(entry))
    return time.perf_counter() - started


def report(label: str, count: int, seconds: float, unit: str = "applies/s") -> None:
    print(f"  {label:<44} {count / seconds:>12,.0f} {unit}   ({count:,} in {seconds:.2f} s)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--directory-entries", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    print(f"namespace benchmark: {args.files:,} files, {args.ops:,} ops, seed {args.seed}")

    gc.collect()
    before = rss_bytes()
    namespace, log, directories, inodes, chunks, seconds = build(args.files)
    gc.collect()
    grown = rss_bytes() - before - inodes.itemsize * (len(inodes) + len(chunks))
    print("build")
    report("mknod + open chunk + commit, per file", args.files, seconds, "files/s")
    print(f"  {'memory per single-chunk file (RSS growth)':<44} {grown / args.files:>12,.0f} bytes")

    mixes = MixGenerator(log, directories, inodes, chunks, rng)
    print("create-only baseline")
    baseline = [
        log.command(Mknod(directories[i % len(directories)], b"base%08d" % i, 0o644))
        for i in range(args.ops)
    ]
    elapsed, failures = timed_apply(namespace, baseline)
    report("apply mknod", len(baseline), elapsed)
    print("create-heavy mix on the full namespace")
    commands = mixes.mix(args.ops)
    elapsed, failures = timed_apply(namespace, commands)
    assert failures == 0, f"{failures} commands of the mix failed"
    report("apply (decoded commands)", len(commands), elapsed)
    raw = [encode_command(command) for command in mixes.mix(args.ops)]
    report("decode + apply (log bytes)", len(raw), timed_decode_apply(namespace, raw))

    print("lookup/getattr mix (queries on the leader)")
    queries: list[Any] = []
    for _ in range(args.ops):
        i = rng.randrange(len(inodes))
        if rng.random() < 0.5:
            queries.append(Lookup(directories[i // FILES_PER_DIRECTORY], b"file%07d" % i))
        else:
            queries.append(GetAttr(inodes[i]))
    query = namespace.query
    started = time.perf_counter()
    for op in queries:
        query(op, USER)
    report("query", len(queries), time.perf_counter() - started, "queries/s")

    print(f"readdir of one directory with {args.directory_entries:,} entries")
    made = namespace.apply(log.command(Mkdir(InodeId(ROOT_INODE), b"big", 0o755)))
    big = made.attr.ino  # type: ignore[union-attr]
    for i in range(args.directory_entries):
        namespace.apply(log.command(Mknod(big, b"entry%07d" % i, 0o644)))
    for label in ("first listing (builds the cookie index)", "second listing"):
        started = time.perf_counter()
        listed = list_all(lambda cookie: namespace.query(ReadDir(big, cookie, 1024), USER))
        seconds = time.perf_counter() - started
        assert listed == args.directory_entries
        report(label, listed, seconds, "entries/s")
    started = time.perf_counter()
    for i in range(10_000):
        namespace.apply(log.command(Mknod(big, b"late%07d" % i, 0o644)))
    report("creates into the listed directory", 10_000, time.perf_counter() - started)

    print("snapshot and digest of the whole namespace")
    started = time.perf_counter()
    data = namespace.snapshot()
    print(f"  {'snapshot':<44} {time.perf_counter() - started:>12.2f} s   ({len(data):,} bytes)")
    started = time.perf_counter()
    namespace.digest()
    print(f"  {'digest':<44} {time.perf_counter() - started:>12.2f} s")
    started = time.perf_counter()
    Namespace.restore(data)
    restore_seconds = time.perf_counter() - started
    print(f"  {'restore (with full consistency check)':<44} {restore_seconds:>12.2f} s")


def list_all(page: Callable[[int], Any]) -> int:
    listed, cookie = 0, 0
    while True:
        reply = page(cookie)
        listed += len(reply.entries)
        if reply.eof:
            return listed
        cookie = reply.entries[-1].cookie


if __name__ == "__main__":
    main()
