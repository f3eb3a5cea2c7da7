"""``paxfs admin balance``: move replicas, by bytes, until every dataserver's utilisation is
within ``--threshold`` percentage points of the mean (as ``hdfs balancer`` does).

**Planning** (:func:`plan_balance`, pure) takes the live dataservers (after ``--include``
and ``--exclude``), their capacity and used bytes, and the movable replicas of those
above the mean (good current replicas of healthy chunks that nobody writes, copies or
deletes; see :data:`wire.cluster_admin_ops.LIST_REPLICAS`).  It repeatedly moves the
largest replica that fits from the fullest server to the emptiest one, never onto a
server that holds the chunk already, never pushing a source below or a target above the
band, each chunk at most once, until every server is inside the band (aiming at
:data:`PLAN_BAND_SHARE` of it, so that estimated on-disk sizes cannot leave a server
just outside) or nothing more fits; ``--max-move`` caps the bytes moved.  Sizes on disk
are estimated per source from its used bytes per replica.

**Without --apply nothing moves**: the plan is printed.  **With --apply** each move is:
the leader checks it and holds the chunk's trims (``MOVE_BEGIN``); the target copies the
replica from the source (``data.replicate``); both replicas are read in full and their
CRC32C compared (a target copy that differs is deleted); the leader records the target
and queues the delete of the source, only while the chunk keeps its goal without it
(``MOVE_COMMIT``).  ``--bandwidth`` caps the copy traffic (verification reads come on
top).  Ctrl-C stops at once: a move cut short leaves at most an extra replica, trimmed
later, never a chunk below its goal; running the command again plans from the new state,
so it resumes.
"""

from __future__ import annotations

import bisect
import errno
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tools.admin_client import AdminClient, AdminError, match_dataserver
from tools.admin_output import console, ds_id, human_bytes, human_seconds, print_json
from wire.cluster_admin_ops import DataserverReport, MoveRequest, StoredReplica
from wire.dataserver_ops import DELETE, DeleteRequest
from wire.errors import RpcError
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.invariant import invariant
from wire.tokens import AccessMode, sign_token

MIB = 1024 * 1024
THRESHOLD_PCT_DEFAULT = 10.0
PLAN_BAND_SHARE = 0.8
"""The plan aims at this share of the threshold on either side of the mean."""
REPLICAS_FETCHED_PER_SERVER_MAX = 50_000
"""Replicas of one source server the planner considers."""
MOVES_IN_FLIGHT_MAX = 2
"""Moves carried out at once."""
DISK_FACTOR_MIN = 0.01
DISK_FACTOR_MAX = 10.0
"""Bounds of the estimated on-disk bytes per byte of replica length (zstd, headers)."""
SAFE_MODE_WAIT_S = 120.0
SAFE_MODE_POLL_S = 1.0
MOVE_SKIP_CODES = frozenset({errno.EBUSY, errno.ESTALE, errno.EINVAL, errno.ENOENT})
"""MOVE_BEGIN refusals that skip one move (the cluster changed since the plan)."""


@dataclass(frozen=True)
class ServerLoad:
    dataserver_id: DataserverId
    address: str
    capacity_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class Candidate:
    """A movable replica: ``size_bytes`` is its estimated size on disk."""

    chunk: ChunkId
    version: ChunkVersion
    source: DataserverId
    length_bytes: int
    size_bytes: int
    holders: frozenset[DataserverId]


@dataclass(frozen=True)
class PlannedMove:
    chunk: ChunkId
    version: ChunkVersion
    source: DataserverId
    target: DataserverId
    length_bytes: int
    size_bytes: int


@dataclass(frozen=True)
class ServerProjection:
    dataserver_id: DataserverId
    address: str
    capacity_bytes: int
    used_pct: float
    planned_pct: float
    moves_out: int
    moves_in: int


@dataclass(frozen=True)
class BalancePlan:
    """Moves that bring every server within ``threshold_pct`` of ``mean_pct`` (as far as
    whole replicas allow); ``outside_after`` lists those still outside the band."""

    mean_pct: float
    threshold_pct: float
    servers: tuple[ServerProjection, ...]
    moves: tuple[PlannedMove, ...]
    bytes_planned: int
    outside_before: tuple[DataserverId, ...]
    outside_after: tuple[DataserverId, ...]
    capped_by_max_move: bool


def _outside(
    loads: Sequence[ServerLoad], used: dict[DataserverId, int], mean: float, band: float
) -> tuple[DataserverId, ...]:
    return tuple(
        s.dataserver_id
        for s in loads
        if abs(used[s.dataserver_id] / s.capacity_bytes - mean) > band + 1e-12
    )


def plan_balance(
    loads: Sequence[ServerLoad],
    candidates: Sequence[Candidate],
    threshold_pct: float,
    max_move_bytes: int | None = None,
) -> BalancePlan:
    """Plan moves by bytes (see the module docstring); deterministic for equal input."""
    invariant(threshold_pct > 0, "the threshold must be positive")
    loads = [s for s in loads if s.capacity_bytes > 0]
    ids = {s.dataserver_id for s in loads}
    capacity = {s.dataserver_id: s.capacity_bytes for s in loads}
    used = {s.dataserver_id: s.used_bytes for s in loads}
    total = sum(capacity.values())
    mean = sum(used.values()) / total if total else 0.0
    band = threshold_pct / 100
    aim = band * PLAN_BAND_SHARE
    outside_before = _outside(loads, used, mean, band)

    def lower(ds: DataserverId) -> float:
        return (mean - aim) * capacity[ds]

    def upper(ds: DataserverId) -> float:
        return (mean + aim) * capacity[ds]

    def utilisation(ds: DataserverId) -> float:
        return used[ds] / capacity[ds]

    by_source: dict[DataserverId, list[Candidate]] = {}
    holders: dict[ChunkId, set[DataserverId]] = {}
    for candidate in sorted(candidates, key=lambda c: (c.size_bytes, c.chunk, c.source)):
        if candidate.source in ids:
            by_source.setdefault(candidate.source, []).append(candidate)
            holders.setdefault(candidate.chunk, set()).update(candidate.holders)
    sizes = {ds: [c.size_bytes for c in found] for ds, found in by_source.items()}
    moved: set[ChunkId] = set()
    moves: list[PlannedMove] = []
    budget = math.inf if max_move_bytes is None else max_move_bytes
    capped = False
    order = sorted(ids)

    def pick(source: DataserverId, target: DataserverId, room: float) -> Candidate | None:
        nonlocal capped
        found = by_source.get(source, [])
        position = bisect.bisect_right(sizes.get(source, []), room) - 1
        for candidate in reversed(found[: position + 1]):
            if candidate.chunk in moved or target in holders[candidate.chunk]:
                continue
            if candidate.length_bytes > budget:
                capped = True
                continue
            return candidate
        return None

    while True:
        over = [ds for ds in order if used[ds] > upper(ds)]
        under = [ds for ds in order if used[ds] < lower(ds)]
        if not over and not under:
            break
        sources = over or [ds for ds in order if used[ds] > mean * capacity[ds]]
        targets = under or [ds for ds in order if used[ds] < mean * capacity[ds]]
        sources.sort(key=lambda ds: (-utilisation(ds), ds))
        targets.sort(key=lambda ds: (utilisation(ds), ds))
        chosen: tuple[Candidate, DataserverId] | None = None
        for source in sources:
            for target in targets:
                if source == target:
                    continue
                room = min(used[source] - lower(source), upper(target) - used[target])
                if room <= 0:
                    continue
                found = pick(source, target, room)
                if found is not None:
                    chosen = found, target
                    break
            if chosen is not None:
                break
        if chosen is None:
            break
        candidate, target = chosen
        source = candidate.source
        moved.add(candidate.chunk)
        index = by_source[source].index(candidate)
        del by_source[source][index]
        del sizes[source][index]
        used[source] -= candidate.size_bytes
        used[target] += candidate.size_bytes
        holders[candidate.chunk].discard(source)
        holders[candidate.chunk].add(target)
        budget -= candidate.length_bytes
        moves.append(
            PlannedMove(
                candidate.chunk,
                candidate.version,
                source,
                target,
                candidate.length_bytes,
                candidate.size_bytes,
            )
        )
    projections = tuple(
        ServerProjection(
            s.dataserver_id,
            s.address,
            s.capacity_bytes,
            100 * s.used_bytes / s.capacity_bytes,
            100 * used[s.dataserver_id] / s.capacity_bytes,
            sum(1 for m in moves if m.source == s.dataserver_id),
            sum(1 for m in moves if m.target == s.dataserver_id),
        )
        for s in sorted(loads, key=lambda s: s.dataserver_id)
    )
    return BalancePlan(
        mean_pct=100 * mean,
        threshold_pct=threshold_pct,
        servers=projections,
        moves=tuple(moves),
        bytes_planned=sum(m.length_bytes for m in moves),
        outside_before=outside_before,
        outside_after=_outside(loads, used, mean, band),
        capped_by_max_move=capped,
    )


def candidates_of(server: DataserverReport, replicas: Sequence[StoredReplica]) -> list[Candidate]:
    """The movable replicas of ``server`` with their on-disk sizes estimated from its
    used bytes per replica against the replicas' mean length."""
    lengths = [r.length_bytes for r in replicas]
    factor = 1.0
    if lengths and server.replicas and sum(lengths):
        per_replica = server.used_bytes / server.replicas
        factor = per_replica / (sum(lengths) / len(lengths))
        factor = min(DISK_FACTOR_MAX, max(DISK_FACTOR_MIN, factor))
    return [
        Candidate(
            r.chunk,
            r.version,
            server.dataserver_id,
            r.length_bytes,
            max(1, round(r.length_bytes * factor)),
            frozenset(r.holders),
        )
        for r in replicas
        if r.movable
    ]


# ---------------------------------------------------------------- carrying it out


class BandwidthLimiter:
    """Paces moves so that the bytes started, over the time since the first, stay at or
    under ``rate_bytes_s``: a move of n bytes reserves n / rate seconds."""

    def __init__(self, rate_bytes_s: float | None) -> None:
        invariant(rate_bytes_s is None or rate_bytes_s > 0, "the bandwidth must be positive")
        self._rate = rate_bytes_s
        self._next_s: float | None = None

    def delay_s(self, size_bytes: int, now_s: float) -> float:
        """How long to wait before starting a move of ``size_bytes`` at ``now_s``."""
        if self._rate is None:
            return 0.0
        start_s = now_s if self._next_s is None else max(now_s, self._next_s)
        self._next_s = start_s + size_bytes / self._rate
        return start_s - now_s


@dataclass
class BalanceRun:
    """What an ``--apply`` run did so far (kept outside trio so Ctrl-C can report it)."""

    planned: int = 0
    bytes_planned: int = 0
    done: int = 0
    sources_kept: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_moved: int = 0
    started_s: float = field(default_factory=time.monotonic)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        elapsed_s = time.monotonic() - self.started_s
        rate = self.bytes_moved / elapsed_s if elapsed_s > 0 else 0.0
        return (
            f"{self.done} of {self.planned} moves done ({human_bytes(self.bytes_moved)} in "
            f"{human_seconds(elapsed_s)}, {human_bytes(rate)}/s); {self.skipped} skipped, "
            f"{self.failed} failed, {self.sources_kept} sources kept"
        )


async def move_one(client: AdminClient, move: PlannedMove, run: BalanceRun) -> None:
    """Copy, verify, switch, release (see the module docstring)."""
    request = MoveRequest(move.chunk, move.version, move.source, move.target)
    what = f"chunk {move.chunk:#x} {ds_id(move.source)} -> {ds_id(move.target)}"
    try:
        ticket = await client.begin_move(request)
    except RpcError as error:
        if error.code not in MOVE_SKIP_CODES:
            raise
        run.skipped += 1
        run.problems.append(f"{what}: skipped: {error.message}")
        return
    try:
        length = await client.replicate(
            ticket.target_address,
            move.chunk,
            move.version,
            ticket.source_address,
            ticket.token,
            ticket.length_bytes,
        )
    except RpcError as error:
        run.failed += 1
        run.problems.append(f"{what}: copy failed: {error}")
        return
    reads = {}

    async def read(address: str) -> None:
        reads[address] = await client.read_replica(
            address, move.chunk, move.version, length, ticket.token
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, ticket.source_address)
        nursery.start_soon(read, ticket.target_address)
    source, target = reads[ticket.source_address], reads[ticket.target_address]
    if source.crc is None or target.crc != source.crc or target.length_bytes != length:
        run.failed += 1
        run.problems.append(
            f"{what}: verification failed (source: {source.error or 'read'}, "
            f"target: {target.error or 'differs'}); the copy is deleted"
        )
        if target.crc is not None:
            await _delete_copy(client, ticket.target_address, move.chunk, move.version)
        return
    try:
        result = await client.commit_move(request, length)
    except RpcError as error:
        run.failed += 1
        run.problems.append(f"{what}: the leader did not switch the location: {error}")
        return
    run.done += 1
    run.bytes_moved += length
    if not result.source_released:
        run.sources_kept += 1
        run.problems.append(f"{what}: source kept: {result.reason}")


async def _delete_copy(
    client: AdminClient, address: str, chunk: ChunkId, version: ChunkVersion
) -> None:
    """Delete a copy that failed verification (an extra replica nobody counts on)."""
    token = sign_token(client.key, chunk, version, AccessMode.WRITE, time.time())
    try:
        await client.pool.call(address, DELETE, DeleteRequest(chunk, version, token), timeout_s=10)
    except RpcError:
        pass  # it stays an extra replica, trimmed once the move's hold expires


async def carry_out(
    client: AdminClient,
    plan: BalancePlan,
    bandwidth_bytes_s: float | None,
    run: BalanceRun,
    *,
    quiet: bool,
) -> None:
    """Every planned move under the bandwidth cap, with a progress bar."""
    limiter = BandwidthLimiter(bandwidth_bytes_s)
    slots = trio.CapacityLimiter(MOVES_IN_FLIGHT_MAX)
    run.planned = len(plan.moves)
    run.bytes_planned = plan.bytes_planned
    with Progress(
        TextColumn("balancing"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console(),
        disable=quiet,
    ) as progress:
        task = progress.add_task("moves", total=max(1, plan.bytes_planned))

        async def one(move: PlannedMove) -> None:
            try:
                await move_one(client, move, run)
            finally:
                progress.advance(task, move.length_bytes)
                slots.release_on_behalf_of(move)

        async with trio.open_nursery() as nursery:
            for move in plan.moves:
                await slots.acquire_on_behalf_of(move)
                await trio.sleep(limiter.delay_s(move.length_bytes, trio.current_time()))
                nursery.start_soon(one, move)


# ---------------------------------------------------------------- the command


async def gather_plan(
    client: AdminClient,
    threshold_pct: float,
    max_move_bytes: int | None,
    include: Sequence[str],
    exclude: Sequence[str],
    *,
    quiet: bool,
) -> tuple[BalancePlan, list[DataserverReport]]:
    """The plan for the cluster as the leader sees it now (waits out a safe mode)."""
    deadline = trio.current_time() + SAFE_MODE_WAIT_S
    while True:
        servers, safe_mode = await client.dataservers()
        if not safe_mode:
            break
        if trio.current_time() > deadline:
            raise AdminError("the metaserver leader stays in safe mode; try again later")
        if not quiet:
            console().print("the leader is collecting dataserver reports; waiting...")
        await trio.sleep(SAFE_MODE_POLL_S)
    included = {match_dataserver(servers, text).dataserver_id for text in include}
    excluded = {match_dataserver(servers, text).dataserver_id for text in exclude}
    chosen = [
        s
        for s in servers
        if s.state == "live"
        and s.capacity_bytes > 0
        and (not included or s.dataserver_id in included)
        and s.dataserver_id not in excluded
    ]
    if len(chosen) < 2:
        raise AdminError(f"{len(chosen)} live dataservers to balance; at least 2 are needed")
    loads = [ServerLoad(s.dataserver_id, s.address, s.capacity_bytes, s.used_bytes) for s in chosen]
    mean = sum(s.used_bytes for s in chosen) / sum(s.capacity_bytes for s in chosen)
    candidates: list[Candidate] = []
    for server in chosen:
        if server.used_bytes > mean * server.capacity_bytes:
            replicas = await client.replicas_on(
                server.dataserver_id, REPLICAS_FETCHED_PER_SERVER_MAX
            )
            candidates.extend(candidates_of(server, replicas))
    plan = plan_balance(loads, candidates, threshold_pct, max_move_bytes)
    return plan, [s for s in servers if s not in chosen]


def print_plan(plan: BalancePlan, left_out: list[DataserverReport], *, applying: bool) -> None:
    out = console()
    low = plan.mean_pct - plan.threshold_pct
    high = plan.mean_pct + plan.threshold_pct
    out.print(
        f"mean utilisation {plan.mean_pct:.2f} %, threshold ±{plan.threshold_pct:g} points: "
        f"band {max(0.0, low):.2f} .. {high:.2f} %",
        markup=False,
    )
    table = Table()
    for column in ("id", "address", "capacity", "used %", "planned %", "moves out", "moves in"):
        table.add_column(column, justify="left" if column in ("id", "address") else "right")
    for server in plan.servers:
        outside = server.dataserver_id in plan.outside_before
        used = f"{server.used_pct:.2f}" + (" *" if outside else "")
        table.add_row(
            ds_id(server.dataserver_id),
            server.address,
            human_bytes(server.capacity_bytes),
            used,
            f"{server.planned_pct:.2f}",
            str(server.moves_out),
            str(server.moves_in),
        )
    out.print(table)
    if left_out:
        out.print(
            "left out: " + ", ".join(f"{ds_id(s.dataserver_id)} ({s.state})" for s in left_out),
            markup=False,
        )
    out.print(
        f"{len(plan.moves)} moves, {human_bytes(plan.bytes_planned)} planned"
        + (" (capped by --max-move)" if plan.capped_by_max_move else ""),
        markup=False,
    )
    if plan.outside_after:
        out.print(
            "[yellow]still outside the band after the plan: "
            + ", ".join(ds_id(ds) for ds in plan.outside_after)
        )
    if not plan.moves and not plan.outside_before:
        out.print("[green]every dataserver is within the threshold; nothing to do")
    elif not applying:
        out.print("nothing was moved: run again with --apply to carry out the plan")


async def run_balance(
    client: AdminClient,
    *,
    threshold_pct: float,
    bandwidth_mib_s: float | None,
    max_move_bytes: int | None,
    include: Sequence[str],
    exclude: Sequence[str],
    apply: bool,
    as_json: bool,
    run: BalanceRun,
) -> int:
    if threshold_pct <= 0:
        raise AdminError("--threshold must be positive")
    if bandwidth_mib_s is not None and bandwidth_mib_s <= 0:
        raise AdminError("--bandwidth must be positive")
    plan, left_out = await gather_plan(
        client, threshold_pct, max_move_bytes, include, exclude, quiet=as_json
    )
    if not as_json:
        print_plan(plan, left_out, applying=apply)
    if apply and plan.moves:
        rate = None if bandwidth_mib_s is None else bandwidth_mib_s * MIB
        await carry_out(client, plan, rate, run, quiet=as_json)
        if not as_json:
            for problem in run.problems:
                console().print(problem, markup=False)
            console().print(run.line(), markup=False)
    if as_json:
        document: dict[str, object] = {"plan": plan, "applied": apply}
        if apply:
            document["run"] = {
                "planned": run.planned,
                "done": run.done,
                "skipped": run.skipped,
                "failed": run.failed,
                "sources_kept": run.sources_kept,
                "bytes_moved": run.bytes_moved,
                "problems": run.problems,
            }
        print_json(document)
    return 1 if run.failed else 0
