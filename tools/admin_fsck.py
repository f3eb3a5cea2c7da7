"""``paxfs admin fsck``, ``fileinfo`` and ``setgoal``: the health of files, one by one.

``fsck PATH`` walks the namespace under PATH and judges every chunk of every regular file
from the leader's replica map (:data:`wire.cluster_admin_ops.FILE_CHUNKS`).  A chunk is
healthy when it has its goal of good replicas of its current version on servers that
keep it safe (live, in maintenance, or decommissioning and still serving), no replica of
that version is known corrupt, and, with ``--verify-checksums``, every readable replica
was read in full (the dataserver verifies each block's checksum, and reports a bad
replica to the leader itself, which replaces it) and all of them hold the same bytes.
Chunks being written are left alone (noted, not judged).  The exit status is 0 only when
everything under PATH is healthy and the leader was not in safe mode.

``fileinfo PATH`` shows one file's chunks, versions, replica locations and their health;
``setgoal N PATH [-r]`` changes the replication goal, and with ``--wait`` follows the
cluster until it converges to it.
"""

from __future__ import annotations

import errno
import stat
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import trio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tools.admin_client import AdminClient, AdminError, FileView, ReplicaRead
from tools.admin_output import chunk_id, console, ds_id, human_bytes, plural, print_json
from wire.cluster_admin_ops import ChunkStatus
from wire.errors import RpcError
from wire.ids import InodeId
from wire.namespace_ops import GOAL_MAX, Attr, SetGoal

FILES_IN_FLIGHT_MAX = 8
"""Files fsck examines at once."""
READS_IN_FLIGHT_MAX = 4
"""Replicas ``--verify-checksums`` reads at once."""
SAFE_STATES = frozenset({"live", "maintenance", "decommissioning"})
"""Servers whose good replicas keep a chunk safe (decommissioning ones until drained)."""
READ_STATES = frozenset({"live", "decommissioning"})
"""Servers whose replicas can be read now."""
CONVERGE_POLL_S = 0.5
SETGOAL_TIMEOUT_S_DEFAULT = 300.0


@dataclass(frozen=True)
class ReplicaCheck:
    """The verification of one replica: read in full, compared with the others."""

    dataserver_id: int
    address: str
    ok: bool
    crc32c: int | None
    problem: str


@dataclass(frozen=True)
class ChunkVerdict:
    """What fsck concluded about one chunk."""

    index: int
    chunk: int
    version: int
    length: int
    goal: int
    health: str
    counted: int
    safe_replicas: int
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    status: ChunkStatus
    checks: tuple[ReplicaCheck, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class FileVerdict:
    path: str
    inode: int
    size: int
    goal: int
    chunks: tuple[ChunkVerdict, ...]

    @property
    def ok(self) -> bool:
        return all(chunk.ok for chunk in self.chunks)


@dataclass
class FsckSummary:
    """Totals over everything fsck looked at."""

    directories: int = 0
    files: int = 0
    other_inodes: int = 0
    bytes_total: int = 0
    chunks: int = 0
    healthy_chunks: int = 0
    chunks_by_health: Counter[str] = field(default_factory=Counter)
    corrupt_replicas: int = 0
    replicas_counted: int = 0
    replicas_verified: int = 0
    replicas_bad: int = 0
    unhealthy_files: int = 0
    vanished: int = 0
    safe_mode: bool = False


def judge_chunk(status: ChunkStatus) -> ChunkVerdict:
    """Judge one chunk from the leader's view (checksums are judged separately)."""
    good = [
        r
        for r in status.replicas
        if r.version == status.current_version and not r.corrupt and not r.deleting
    ]
    safe = sum(1 for r in good if r.server_state in SAFE_STATES)
    corrupt = [r for r in status.replicas if r.version == status.current_version and r.corrupt]
    problems: list[str] = []
    notes: list[str] = []
    if status.health == "writing":
        notes.append("being written")
    elif status.health == "missing":
        problems.append("missing: no readable good replica")
    elif safe < status.goal:
        problems.append(f"under-replicated: {safe} of {status.goal} replicas")
    if status.health == "over-replicated":
        notes.append(f"over-replicated: {status.counted} of {status.goal} replicas")
    if safe >= status.goal > status.counted:
        notes.append("replicas on decommissioning servers are being copied")
    for replica in corrupt:
        problems.append(f"corrupt replica on {replica.address}")
    if status.copying_to:
        notes.append("copying to " + ", ".join(status.copying_to))
    return ChunkVerdict(
        index=status.index,
        chunk=status.chunk,
        version=status.current_version,
        length=status.length,
        goal=status.goal,
        health=status.health,
        counted=status.counted,
        safe_replicas=safe,
        problems=tuple(problems),
        notes=tuple(notes),
        status=status,
    )


def compare_reads(status: ChunkStatus, reads: list[ReplicaRead]) -> tuple[ReplicaCheck, ...]:
    """Judge the replicas read in full: each must read without error, and all must hold
    the same bytes (the CRC32C most of them agree on; ties go to the first replica)."""
    by_address = {r.address: r for r in status.replicas}
    crcs = Counter(read.crc for read in reads if read.crc is not None)
    majority = crcs.most_common(1)[0][0] if crcs else None
    checks = []
    for read in reads:
        replica = by_address[read.address]
        problem = ""
        if read.crc is None:
            problem = read.error or "unreadable"
        elif read.length_bytes != status.length:
            problem = f"holds {read.length_bytes} of {status.length} bytes"
        elif majority is not None and read.crc != majority:
            problem = f"its bytes differ from {crcs[majority]} other replicas"
        checks.append(
            ReplicaCheck(replica.dataserver_id, read.address, not problem, read.crc, problem)
        )
    return tuple(checks)


async def verify_chunk(
    client: AdminClient, verdict: ChunkVerdict, reads_limit: trio.CapacityLimiter
) -> ChunkVerdict:
    """``verdict`` with every readable replica of the current version read and compared."""
    status = verdict.status
    targets = [
        r
        for r in status.replicas
        if r.version == status.current_version and r.server_state in READ_STATES
    ]
    reads: list[ReplicaRead | None] = [None] * len(targets)

    async def read(slot: int, address: str) -> None:
        async with reads_limit:
            reads[slot] = await client.read_replica(
                address, status.chunk, status.current_version, status.length, status.token
            )

    async with trio.open_nursery() as nursery:
        for slot, replica in enumerate(targets):
            nursery.start_soon(read, slot, replica.address)
    checks = compare_reads(status, [r for r in reads if r is not None])
    problems = list(verdict.problems)
    for check in checks:
        if not check.ok:
            problems.append(f"replica on {check.address}: {check.problem}")
    return replace(verdict, problems=tuple(problems), checks=checks)


async def examine_file(
    client: AdminClient,
    path: str,
    attr: Attr,
    *,
    verify: bool,
    reads_limit: trio.CapacityLimiter,
) -> tuple[FileVerdict, bool] | None:
    """The verdict on one file and whether the leader was in safe mode (None when the
    file vanished meanwhile)."""
    try:
        view = await client.file_view(InodeId(attr.ino))
    except RpcError as error:
        if error.code in (errno.ENOENT, errno.EISDIR, errno.EINVAL):
            return None
        raise
    verdicts = [judge_chunk(status) for status in view.chunks]
    if verify:
        verdicts = [await verify_chunk(client, v, reads_limit) for v in verdicts]
    return FileVerdict(path, attr.ino, view.size, view.goal, tuple(verdicts)), view.safe_mode


@dataclass
class FsckResult:
    path: str
    healthy: bool
    summary: FsckSummary
    files: list[FileVerdict]


async def fsck(
    client: AdminClient,
    path: str,
    *,
    verify: bool,
    keep_all: bool,
) -> FsckResult:
    """Walk ``path``; keep every file's verdict when ``keep_all``, else the unhealthy ones."""
    root = await client.resolve(path)
    summary = FsckSummary()
    kept: list[FileVerdict] = []
    reads_limit = trio.CapacityLimiter(READS_IN_FLIGHT_MAX)
    send, receive = trio.open_memory_channel[tuple[str, Attr]](FILES_IN_FLIGHT_MAX)

    async def worker(inbox: trio.MemoryReceiveChannel[tuple[str, Attr]]) -> None:
        async with inbox:
            async for where, attr in inbox:
                found = await examine_file(
                    client, where, attr, verify=verify, reads_limit=reads_limit
                )
                if found is None:
                    summary.vanished += 1
                    continue
                verdict, safe_mode = found
                summary.safe_mode |= safe_mode
                _tally(summary, verdict)
                if keep_all or not verdict.ok:
                    kept.append(verdict)

    async with trio.open_nursery() as nursery:
        for _ in range(FILES_IN_FLIGHT_MAX):
            nursery.start_soon(worker, receive.clone())
        await receive.aclose()
        async with send:
            async for where, attr in client.walk(path, root):
                if stat.S_ISDIR(attr.mode):
                    summary.directories += 1
                elif stat.S_ISREG(attr.mode):
                    summary.files += 1
                    summary.bytes_total += attr.size
                    await send.send((where, attr))
                else:
                    summary.other_inodes += 1
    kept.sort(key=lambda v: v.path)
    healthy = summary.unhealthy_files == 0 and not summary.safe_mode
    return FsckResult(path, healthy, summary, kept)


def _tally(summary: FsckSummary, verdict: FileVerdict) -> None:
    if not verdict.ok:
        summary.unhealthy_files += 1
    for chunk in verdict.chunks:
        summary.chunks += 1
        summary.healthy_chunks += chunk.ok
        summary.chunks_by_health[chunk.health] += 1
        summary.replicas_counted += chunk.counted
        summary.corrupt_replicas += sum(
            1 for r in chunk.status.replicas if r.corrupt and r.version == chunk.version
        )
        summary.replicas_verified += len(chunk.checks)
        summary.replicas_bad += sum(1 for check in chunk.checks if not check.ok)


# ---------------------------------------------------------------- printing


def _replica_lines(chunk: ChunkVerdict) -> list[str]:
    lines = []
    checks = {c.address: c for c in chunk.checks}
    for replica in chunk.status.replicas:
        flags = []
        if replica.version != chunk.version:
            flags.append(f"stale v{replica.version}")
        if replica.corrupt:
            flags.append("corrupt")
        if replica.deleting:
            flags.append("deleting")
        check = checks.get(replica.address)
        if check is not None:
            flags.append("verified" if check.ok else f"BAD: {check.problem}")
        lines.append(
            f"      {replica.address} ({ds_id(replica.dataserver_id)}, {replica.server_state})"
            + (f" [{', '.join(flags)}]" if flags else "")
        )
    return lines


def print_fsck(
    result: FsckResult,
    *,
    files: bool,
    chunks: bool,
    locations: bool,
    list_corrupt: bool,
    verify: bool,
) -> None:
    out = console()
    for verdict in result.files:
        if list_corrupt:
            for chunk in verdict.chunks:
                bad = [p for p in chunk.problems if "corrupt" in p or "missing" in p or "BAD" in p]
                bad += [p for p in chunk.problems if "replica on" in p and p not in bad]
                if bad:
                    out.print(
                        f"{verdict.path} chunk {chunk.index} ({chunk_id(chunk.chunk)}): "
                        + "; ".join(bad),
                        markup=False,
                    )
            continue
        if not (files or chunks or locations or not verdict.ok):
            continue
        state = "OK" if verdict.ok else "UNHEALTHY"
        out.print(
            f"{verdict.path}  {human_bytes(verdict.size)}, {len(verdict.chunks)} chunks, "
            f"goal {verdict.goal}: {state}",
            markup=False,
        )
        for chunk in verdict.chunks:
            if not (chunks or locations or not chunk.ok):
                continue
            words = [chunk.health, f"{chunk.counted}/{chunk.goal} replicas"]
            words += list(chunk.problems) + list(chunk.notes)
            out.print(
                f"   chunk {chunk.index} {chunk_id(chunk.chunk)} v{chunk.version} "
                f"{human_bytes(chunk.length)}: " + "; ".join(words),
                markup=False,
            )
            if locations:
                for line in _replica_lines(chunk):
                    out.print(line, markup=False)
    summary = result.summary
    table = Table(title=f"fsck {result.path}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    status = "[green]HEALTHY[/green]" if result.healthy else "[red]UNHEALTHY[/red]"
    table.add_row("status", status)
    table.add_row("directories", str(summary.directories))
    table.add_row("files", f"{summary.files} ({human_bytes(summary.bytes_total)})")
    table.add_row("unhealthy files", str(summary.unhealthy_files))
    table.add_row("chunks", str(summary.chunks))
    for health in ("healthy", "under-replicated", "over-replicated", "missing", "writing"):
        table.add_row(f"  {health}", str(summary.chunks_by_health.get(health, 0)))
    table.add_row("chunks with problems", str(summary.chunks - summary.healthy_chunks))
    table.add_row("corrupt replicas", str(summary.corrupt_replicas))
    average = summary.replicas_counted / summary.chunks if summary.chunks else 0.0
    table.add_row("average replicas per chunk", f"{average:.2f}")
    if verify:
        table.add_row(
            "replicas verified / bad", f"{summary.replicas_verified} / {summary.replicas_bad}"
        )
    if summary.safe_mode:
        table.add_row("note", "[yellow]leader in safe mode: its replica map may be incomplete")
    out.print(table)


async def run_fsck(
    client: AdminClient,
    path: str,
    *,
    files: bool,
    chunks: bool,
    locations: bool,
    verify: bool,
    list_corrupt: bool,
    as_json: bool,
) -> int:
    result = await fsck(client, path, verify=verify, keep_all=files or chunks or locations)
    if as_json:
        print_json(_fsck_document(result, chunks=chunks or locations, locations=locations))
    else:
        print_fsck(
            result,
            files=files,
            chunks=chunks,
            locations=locations,
            list_corrupt=list_corrupt,
            verify=verify,
        )
    return 0 if result.healthy else 1


def _chunk_document(chunk: ChunkVerdict, *, locations: bool) -> dict[str, object]:
    document: dict[str, object] = {
        "index": chunk.index,
        "chunk": chunk.chunk,
        "version": chunk.version,
        "length": chunk.length,
        "goal": chunk.goal,
        "health": chunk.health,
        "counted": chunk.counted,
        "ok": chunk.ok,
        "problems": list(chunk.problems),
        "notes": list(chunk.notes),
    }
    if locations:
        document["replicas"] = chunk.status.replicas
    if chunk.checks:
        document["checks"] = chunk.checks
    return document


def _fsck_document(result: FsckResult, *, chunks: bool, locations: bool) -> dict[str, object]:
    summary = result.summary
    return {
        "path": result.path,
        "healthy": result.healthy,
        "summary": {
            "directories": summary.directories,
            "files": summary.files,
            "other_inodes": summary.other_inodes,
            "bytes": summary.bytes_total,
            "unhealthy_files": summary.unhealthy_files,
            "chunks": summary.chunks,
            "healthy_chunks": summary.healthy_chunks,
            "chunks_by_health": dict(summary.chunks_by_health),
            "corrupt_replicas": summary.corrupt_replicas,
            "replicas_verified": summary.replicas_verified,
            "replicas_bad": summary.replicas_bad,
            "safe_mode": summary.safe_mode,
        },
        "files": [
            {
                "path": verdict.path,
                "inode": verdict.inode,
                "size": verdict.size,
                "goal": verdict.goal,
                "ok": verdict.ok,
                "chunks": [
                    _chunk_document(chunk, locations=locations)
                    for chunk in verdict.chunks
                    if chunks or not chunk.ok
                ],
            }
            for verdict in result.files
        ],
    }


# ---------------------------------------------------------------- fileinfo


async def run_fileinfo(client: AdminClient, path: str, *, as_json: bool) -> int:
    attr = await client.resolve(path)
    if stat.S_ISDIR(attr.mode):
        raise AdminError(f"{path} is a directory (fsck walks directories)")
    if not stat.S_ISREG(attr.mode):
        raise AdminError(f"{path} is not a regular file")
    view = await client.file_view(InodeId(attr.ino))
    verdicts = [judge_chunk(status) for status in view.chunks]
    if as_json:
        print_json(
            {
                "path": path,
                "inode": view.inode,
                "size": view.size,
                "chunk_size": view.chunk_size,
                "goal": view.goal,
                "safe_mode": view.safe_mode,
                "ok": all(v.ok for v in verdicts),
                "chunks": [
                    {**_chunk_document(v, locations=True), "copying_to": v.status.copying_to}
                    for v in verdicts
                ],
            }
        )
        return 0
    print_fileinfo(path, view, verdicts)
    return 0


def print_fileinfo(path: str, view: FileView, verdicts: list[ChunkVerdict]) -> None:
    out = console()
    out.print(
        f"{path}: {human_bytes(view.size)} in {len(view.chunks)} chunks of "
        f"{human_bytes(view.chunk_size)}, goal {view.goal}",
        markup=False,
    )
    if view.safe_mode:
        out.print("[yellow]the leader is in safe mode: its replica map may be incomplete")
    table = Table()
    for column in ("chunk", "id", "version", "length", "health", "replicas", "locations"):
        table.add_column(column)
    for verdict in verdicts:
        status = verdict.status
        version = f"v{status.current_version}"
        if status.version != status.current_version:
            version += f" (v{status.version} opened)"
        health = verdict.health if verdict.ok else f"[red]{verdict.health}[/red]"
        detail = "\n".join(line.strip() for line in _replica_lines(verdict))
        extra = list(verdict.problems) + list(verdict.notes)
        if extra:
            detail += "\n" + "\n".join(extra)
        table.add_row(
            str(status.index),
            chunk_id(status.chunk),
            version,
            human_bytes(status.length),
            health,
            f"{status.counted}/{status.goal}",
            detail,
        )
    out.print(table)


# ---------------------------------------------------------------- setgoal


async def run_setgoal(
    client: AdminClient,
    goal: int,
    path: str,
    *,
    recursive: bool,
    wait: bool,
    timeout_s: float,
    as_json: bool,
) -> int:
    if not 1 <= goal <= GOAL_MAX:
        raise AdminError(f"goal {goal} is outside 1..{GOAL_MAX}")
    root = await client.resolve(path)
    changed = Counter[str]()
    files: list[tuple[str, InodeId]] = []
    targets = client.walk(path, root) if recursive else _just(path, root)
    async for where, attr in targets:
        kind = "directories" if stat.S_ISDIR(attr.mode) else "files"
        if not (stat.S_ISDIR(attr.mode) or stat.S_ISREG(attr.mode)):
            continue
        try:
            await client.meta.mutate(SetGoal(InodeId(attr.ino), goal=goal))
        except RpcError as error:
            if error.code == errno.ENOENT:
                continue
            raise
        changed[kind] += 1
        if kind == "files":
            files.append((where, InodeId(attr.ino)))
    converged: bool | None = None
    if wait:
        converged = await _wait_converged(client, files, goal, timeout_s, quiet=as_json)
    if as_json:
        print_json(
            {
                "path": path,
                "goal": goal,
                "files": changed["files"],
                "directories": changed["directories"],
                "converged": converged,
            }
        )
    else:
        console().print(
            f"goal {goal} set on {plural(changed['files'], 'file')} and "
            f"{plural(changed['directories'], 'directory', 'directories')} under {path}"
            + ("" if converged is None else "; converged" if converged else "; NOT converged"),
            markup=False,
        )
    return 0 if converged is not False else 1


async def _just(path: str, attr: Attr) -> AsyncIterator[tuple[str, Attr]]:
    yield path, attr


def chunk_converged(status: ChunkStatus, goal: int) -> bool:
    """Exactly ``goal`` good replicas of the current version, no copy under way."""
    current = [r for r in status.replicas if r.version == status.current_version]
    return (
        status.counted == goal
        and len(current) == goal
        and not status.copying_to
        and status.health == "healthy"
    )


async def _wait_converged(
    client: AdminClient,
    files: list[tuple[str, InodeId]],
    goal: int,
    timeout_s: float,
    *,
    quiet: bool,
) -> bool:
    """Poll until every chunk of ``files`` has exactly ``goal`` replicas (or time out)."""
    pending = dict(files)
    with Progress(
        TextColumn("converging to goal {task.fields[goal]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(),
        disable=quiet,
    ) as progress:
        task = progress.add_task("setgoal", total=len(files), goal=goal)
        with trio.move_on_after(timeout_s):
            while pending:
                for where, inode in list(pending.items()):
                    try:
                        view = await client.file_view(inode)
                    except RpcError as error:
                        if error.code != errno.ENOENT:
                            raise
                        view = None
                    if view is None or all(chunk_converged(c, goal) for c in view.chunks):
                        del pending[where]
                        progress.advance(task)
                if pending:
                    await trio.sleep(CONVERGE_POLL_S)
            return True
    return False
