"""Determinism, snapshots and digests: replicas that apply the same log agree byte for
byte, also when one of them restarts from a snapshot taken at any point."""

from __future__ import annotations

import errno
import random
import stat
from typing import Any

import msgpack
import pytest
import zstandard

from metaserver.namespace import (
    Namespace,
    NamespaceConfig,
    SnapshotError,
    decode_command,
    encode_command,
)
from wire.cluster_admin_ops import DataserverMode
from wire.ids import (
    ROOT_INODE,
    ChunkId,
    ChunkVersion,
    ClientId,
    DataserverId,
    InodeId,
    SequenceNumber,
)
from wire.namespace_ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_CREDENTIALS,
    XATTR_CREATE,
    AckDeletions,
    ChunkReply,
    ChunkWrite,
    ClientCommand,
    CloseSession,
    Command,
    CommitRecovery,
    CommitWrite,
    Create,
    Credentials,
    DeletedChunk,
    EntryReply,
    ExpireSessions,
    GetAttr,
    GetDeletions,
    KeepAlive,
    Link,
    Mkdir,
    Mknod,
    MutationCall,
    NsError,
    OkReply,
    Open,
    OpenChunk,
    OpenSession,
    RecoverChunk,
    Release,
    RemoveXattr,
    Rename,
    RequestContext,
    Rmdir,
    ScanChunks,
    SessionCommand,
    SessionReply,
    SetAttr,
    SetDataserverMode,
    SetGoal,
    SetXattr,
    Symlink,
    SystemCommand,
    Unlink,
)

from .test_namespace_support import SMALL_CHUNK, Client, seed_from_environment

CONFIG = NamespaceConfig(chunk_size_bytes=SMALL_CHUNK, session_timeout_ns=2_000_000)
NAMES = [b"a", b"b", b"c", b"d", b"e", b".", b"..", b""]
USERS = [Credentials(0, 0), Credentials(1000, 1000, (1000, 5)), Credentials(1001, 5)]


class CommandGenerator:
    """Random but plausible commands; learns inode and chunk ids from the replies."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now_ns = 0
        self.inodes: list[int] = [ROOT_INODE]
        self.directories: list[int] = [ROOT_INODE]
        self.chunks: list[tuple[OpenChunk, ChunkReply, int]] = []
        self.recoveries: list[tuple[int, int, int]] = []
        self.clients: dict[int, int] = {}
        self.last: dict[int, ClientCommand] = {}

    def next(self) -> Command:
        rng = self.rng
        self.now_ns += rng.randrange(1, 5_000)
        roll = rng.random()
        if not self.clients or roll < 0.01:
            return SessionCommand(self.now_ns, OpenSession())
        client = rng.choice(sorted(self.clients))
        if roll < 0.03:
            return SessionCommand(self.now_ns, KeepAlive(ClientId(client)))
        if roll < 0.032:
            return SessionCommand(self.now_ns, CloseSession(ClientId(client)))
        if roll < 0.04:
            return SystemCommand(self.now_ns, ExpireSessions())
        if roll < 0.05:
            entries = tuple(
                DeletedChunk(ChunkId(rng.randrange(1, 40)), ChunkVersion(rng.randrange(1, 4)))
                for _ in range(rng.randrange(4))
            )
            return SystemCommand(self.now_ns, AckDeletions(entries))
        if roll < 0.055:
            mode = rng.choice(list(DataserverMode))
            address = f"127.0.0.1:{rng.randrange(1, 4)}"
            op = SetDataserverMode(DataserverId(rng.randrange(4)), mode, address)
            return SystemCommand(self.now_ns, op)
        if roll < 0.065 and self.chunks:
            _, chunk, opened_ns = rng.choice(self.chunks)
            # A recovery of a version as it was opened (some are stale by then), and the
            # commit of the version it made.
            if rng.random() < 0.5:
                op: Any = RecoverChunk(chunk.chunk, chunk.version, opened_ns)
                self.recoveries.append((chunk.chunk, chunk.version + 1, self.now_ns))
            else:
                made = rng.choice(self.recoveries or [(chunk.chunk, chunk.version, opened_ns)])
                op = CommitRecovery(ChunkId(made[0]), ChunkVersion(made[1]), made[2])
            return SystemCommand(self.now_ns, op)
        if roll < 0.1 and client in self.last:
            retry = self.last[client]  # the client lost the reply and resends
            return ClientCommand(self.now_ns, retry.call)
        seq = self.clients[client] + 1
        self.clients[client] = seq
        context = RequestContext(
            ClientId(client),
            SequenceNumber(seq),
            SequenceNumber(max(0, seq - rng.randrange(3))),
            rng.choice(USERS),
        )
        command = ClientCommand(self.now_ns, MutationCall(context, self.op()))
        self.last[client] = command
        return command

    def op(self) -> Any:
        rng = self.rng
        ino = InodeId(rng.choice(self.inodes))
        directory = InodeId(rng.choice(self.directories if rng.random() < 0.9 else self.inodes))
        other = InodeId(rng.choice(self.directories))
        name = rng.choice(NAMES)
        kind = rng.randrange(17)
        if kind == 0:
            return Mkdir(directory, name, rng.choice([0o755, 0o1777, 0o2775]))
        if kind == 1:
            return Mknod(directory, name, rng.choice([0o100644, 0o104755, 0o010600]))
        if kind == 2:
            return Create(directory, name, 0o644, rng.random() < 0.5)
        if kind == 3:
            return Symlink(directory, name, b"target")
        if kind == 4:
            return Link(ino, other, name)
        if kind == 5:
            return Unlink(directory, name)
        if kind == 6:
            return Rmdir(directory, name)
        if kind == 7:
            flags = rng.choice([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
            return Rename(directory, name, other, rng.choice(NAMES), flags)
        if kind == 8:
            return SetAttr(ino, size=rng.randrange(0, 5 * SMALL_CHUNK))
        if kind == 9:
            return SetAttr(ino, mode=rng.choice([0o644, 0o2755, 0o4711]), uid=rng.choice([None, 7]))
        if kind == 10:
            return SetXattr(ino, b"user." + name, b"v" * rng.randrange(3), XATTR_CREATE)
        if kind == 11:
            return RemoveXattr(ino, b"user." + name)
        if kind == 12:
            return SetGoal(ino, rng.randrange(0, 5), rng.choice([None, True]))
        if kind == 13:
            return Open(ino)
        if kind == 14:
            return Release(ino)
        if kind == 15 or not self.chunks:
            return OpenChunk(ino, rng.randrange(4))
        opened, chunk, _ = rng.choice(self.chunks)
        if rng.random() < 0.2:
            opened = OpenChunk(ino, rng.randrange(4))
        write = ChunkWrite(opened.index, chunk.chunk, chunk.version, rng.randrange(17))
        return CommitWrite(opened.inode, (write,))

    def learn(self, command: Command, reply: Any) -> None:
        if isinstance(reply, EntryReply) and reply.attr.ino not in self.inodes:
            self.inodes.append(reply.attr.ino)
            if stat.S_ISDIR(reply.attr.mode):
                self.directories.append(reply.attr.ino)
        elif isinstance(reply, ChunkReply):
            assert isinstance(command, ClientCommand) and isinstance(command.call.op, OpenChunk)
            self.chunks.append((command.call.op, reply, command.time_ns))
        elif isinstance(reply, SessionReply):
            self.clients[reply.client] = 0


def generate(seed: int, count: int) -> list[Command]:
    """A command log produced against a reference replica."""
    generator = CommandGenerator(random.Random(seed))
    reference = Namespace(CONFIG)
    log = []
    for _ in range(count):
        command = generator.next()
        generator.learn(command, reference.apply(command))
        log.append(command)
    return log


def test_replicas_applying_the_same_log_have_the_same_digest_and_replies() -> None:
    seed = seed_from_environment("same log, same digest")
    log = generate(seed, 1500)
    first, second = Namespace(CONFIG), Namespace(CONFIG)
    for i, command in enumerate(log):
        reply_first = first.apply(command)
        reply_second = second.apply(decode_command(encode_command(command)))
        assert reply_first == reply_second, f"step {i}: {command}"
        if i % 100 == 0:
            assert first.digest() == second.digest(), f"diverged at step {i}"
    assert first.snapshot() == second.snapshot()
    first.verify()


def test_a_replica_restored_from_a_snapshot_at_any_point_stays_in_step() -> None:
    seed = seed_from_environment("restore at random points")
    rng = random.Random(seed)
    log = generate(seed, 1200)
    leader = Namespace(CONFIG)
    follower = Namespace(CONFIG)
    cuts = sorted(rng.sample(range(len(log)), 8))
    for i, command in enumerate(log):
        if cuts and i == cuts[0]:
            cuts.pop(0)
            data = follower.snapshot()
            follower = Namespace.restore(data)
            assert follower.digest() == leader.digest(), f"restore at {i} changed the state"
            assert follower.snapshot() == data
        assert leader.apply(command) == follower.apply(command), f"step {i}"
    assert leader.digest() == follower.digest()
    follower.verify()


def test_the_log_exercises_most_outcomes() -> None:
    """Guard against a generator that only produces errors."""
    seed = seed_from_environment("log coverage")
    log = generate(seed, 1500)
    namespace = Namespace(CONFIG)
    kinds = {type(namespace.apply(command)).__name__ for command in log}
    assert {"EntryReply", "AttrReply", "OkReply", "NsError", "ChunkReply"} <= kinds


def referenced_chunks(namespace: Namespace) -> dict[int, int]:
    """Chunk id -> current version of every chunk some file references (a whole scan)."""
    found: dict[int, int] = {}
    inode, index = InodeId(0), 0
    while True:
        page = namespace.query(ScanChunks(inode, index), ROOT_CREDENTIALS)
        found.update((entry.chunk, entry.version) for entry in page.entries)
        if page.done:
            return found
        inode, index = page.next_inode, page.next_index


def queued_chunks(namespace: Namespace) -> dict[int, int]:
    """Chunk id -> version of every entry of the deletion queue."""
    reply = namespace.query(GetDeletions(), ROOT_CREDENTIALS)
    assert reply.total == len(reply.entries), "the queue outgrew one page"
    return {entry.chunk: entry.version for entry in reply.entries}


def test_no_chunk_version_handed_out_is_ever_leaked() -> None:
    """Every chunk version given out (to a writer by OpenChunk, or to the leader by
    RecoverChunk) stays accounted for: it is the current version of some file's chunk,
    or the deletion queue covers it, or an AckDeletions removed the entry that covered it.
    ``verify()`` checks only the converse (nothing referenced is queued)."""
    seed = seed_from_environment("no chunk is leaked")
    rng = random.Random(seed)
    generator = CommandGenerator(random.Random(seed))
    namespace = Namespace(CONFIG)
    handed_out: set[tuple[int, int]] = set()
    acknowledged: dict[int, int] = {}

    seen: set[str] = set()

    def check(step: int) -> None:
        referenced, queued = referenced_chunks(namespace), queued_chunks(namespace)
        for chunk, version in sorted(handed_out):
            if referenced.get(chunk) == version:
                seen.add("referenced")
            elif queued.get(chunk, 0) >= version:
                seen.add("queued")
            elif acknowledged.get(chunk, 0) >= version:
                seen.add("acknowledged")
            else:
                current = referenced.get(chunk)
                raise AssertionError(f"step {step}: chunk {chunk} v{version} leaked ({current=})")

    def acknowledge(command: SystemCommand) -> None:
        before = queued_chunks(namespace)
        assert namespace.apply(command) == OkReply()
        after = queued_chunks(namespace)
        for chunk, version in before.items():
            if chunk not in after:
                acknowledged[chunk] = max(acknowledged.get(chunk, 0), version)

    for step in range(1500):
        command = generator.next()
        if isinstance(command, SystemCommand) and isinstance(command.op, AckDeletions):
            queued = queued_chunks(namespace)
            if queued and rng.random() < 0.5:
                # As the cluster manager does: acknowledge an entry read from the queue.
                chunk = rng.choice(sorted(queued))
                entry = DeletedChunk(ChunkId(chunk), ChunkVersion(queued[chunk]))
                command = SystemCommand(command.time_ns, AckDeletions((entry,)))
            acknowledge(command)
            continue
        reply = namespace.apply(command)
        generator.learn(command, reply)
        if isinstance(reply, ChunkReply):
            handed_out.add((reply.chunk, reply.version))
        elif isinstance(command, SystemCommand) and isinstance(reply, OkReply):
            op = command.op
            if isinstance(op, RecoverChunk):
                handed_out.add((op.chunk, op.version + 1))
        if step % 100 == 0:
            check(step)
    # Every session ends (the files only they held open are freed with their chunks),
    # then the cluster manager deletes whatever is queued.
    end_ns = generator.now_ns + CONFIG.session_timeout_ns
    namespace.apply(SystemCommand(end_ns, ExpireSessions()))
    check(1500)
    entries = tuple(
        DeletedChunk(ChunkId(chunk), ChunkVersion(version))
        for chunk, version in queued_chunks(namespace).items()
    )
    acknowledge(SystemCommand(end_ns + 1, AckDeletions(entries)))
    check(1501)
    assert seen == {"referenced", "queued", "acknowledged"}, seen
    namespace.verify()


def test_inode_numbers_are_never_reused_not_even_across_a_snapshot() -> None:
    """Attr.generation is a constant (wire.namespace_ops.INODE_GENERATION): that is sound
    only because no inode number is ever given out twice, even after the newest inode
    is freed and the replica restarts from a snapshot (a FUSE kernel may still hold the
    old number until it sends FORGET)."""
    seed = seed_from_environment("inode numbers never reused")
    rng = random.Random(seed)
    generator = CommandGenerator(random.Random(seed))
    namespace = Namespace(CONFIG)
    allocated: set[int] = {ROOT_INODE}
    newest = ROOT_INODE
    requests: set[tuple[int, int]] = set()
    cuts = set(rng.sample(range(1500), 30))
    for step in range(1500):
        if step in cuts:
            namespace = Namespace.restore(namespace.snapshot())
        command = generator.next()
        reply = namespace.apply(command)
        generator.learn(command, reply)
        if not isinstance(command, ClientCommand):
            continue
        context, op = command.call.context, command.call.op
        retry = (context.client, context.seq) in requests
        requests.add((context.client, context.seq))
        if retry or not isinstance(reply, EntryReply):
            continue  # a retry answers the kept reply
        ino = reply.attr.ino
        # Create of an existing name opens it; the other three always make an inode.
        if isinstance(op, (Mknod, Mkdir, Symlink)) or (
            isinstance(op, Create) and ino not in allocated
        ):
            assert ino not in allocated and ino > newest, f"step {step}: {ino} after {newest}"
            allocated.add(ino)
            newest = ino
    freed = [
        ino
        for ino in allocated
        if namespace.query(GetAttr(InodeId(ino)), ROOT_CREDENTIALS) == NsError(errno.ENOENT)
    ]
    assert len(allocated) > 20 and freed, "the log never freed an inode it made"

    # The sharpest case: the newest inode is freed, then the replica restarts.
    c = Client(Namespace(CONFIG))
    first = c.mknod(b"f")
    c.ok(Unlink(InodeId(ROOT_INODE), b"f"))
    c.ns = Namespace.restore(c.ns.snapshot())
    assert c.mknod(b"f") > first


def test_the_digest_changes_with_any_change() -> None:
    c = Client(Namespace(CONFIG))
    f = c.mknod(b"f")
    seen = {c.ns.digest()}
    for op in [SetAttr(f, mode=0o600), SetXattr(f, b"user.a", b""), SetGoal(f, goal=1)]:
        c.ok(op)
        seen.add(c.ns.digest())
    assert len(seen) == 4


def test_a_snapshot_keeps_sessions_kept_replies_and_open_files() -> None:
    c = Client(Namespace(CONFIG))
    f = c.create(b"f")
    c.write(f, 0, 40)
    cmd = c.command(Unlink(InodeId(ROOT_INODE), b"f"))
    reply = c.ns.apply(cmd)
    restored = Namespace.restore(c.ns.snapshot())
    assert restored.apply(cmd) == reply  # the retry is still recognised
    c.ns = restored
    assert c.attr(f).nlink == 0
    c.ok(Release(f))
    assert c.qok(GetDeletions()).total == 3


def test_an_empty_namespace_round_trips() -> None:
    namespace = Namespace(NamespaceConfig(created_ns=5, root_mode=0o700, root_uid=9))
    restored = Namespace.restore(namespace.snapshot())
    assert restored.digest() == namespace.digest() and restored.config == namespace.config


@pytest.mark.parametrize(
    "mangle",
    [
        lambda data: data[: len(data) // 2],
        lambda data: b"not zstd at all",
        lambda data: data + b"x",
        lambda data: zstandard.ZstdCompressor().compress(msgpack.packb(["paxfs-namespace", 99])),
        lambda data: zstandard.ZstdCompressor().compress(msgpack.packb(["other", 1])),
        lambda data: zstandard.ZstdCompressor().compress(b"\xc1"),
    ],
    ids=["truncated", "garbage", "trailing", "future-format", "foreign", "bad-msgpack"],
)
def test_a_bad_snapshot_is_refused_with_a_clear_error(mangle: Any) -> None:
    c = Client(Namespace(CONFIG))
    c.write(c.mknod(b"f"), 0, 40)
    with pytest.raises(SnapshotError) as raised:
        Namespace.restore(mangle(c.ns.snapshot()))
    assert "snapshot" in str(raised.value)


def test_an_inconsistent_snapshot_is_refused() -> None:
    c = Client(Namespace(CONFIG))
    c.mkdir(b"d")
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(c.ns.snapshot())
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(raw)
    records = list(unpacker)
    root = records[4]
    root[4] = 7  # wrong nlink for the root directory
    data = zstandard.ZstdCompressor().compress(b"".join(msgpack.packb(r) for r in records))
    with pytest.raises(SnapshotError, match="inconsistent"):
        Namespace.restore(data)
