"""``paxfs admin report``: the whole cluster on one screen (or in one JSON document).

* the metaserver group: every replica's role, ballot, commit and applied index, and,
  from the leader's view, its lag and the time since the leader last heard from it;
* every dataserver: state, capacity, used %, replicas, time since its last heartbeat,
  copies in and out, and what a decommissioning one must still copy;
* the chunk-health matrix (goal x good replicas, as MooseFS's ``mfscli`` shows it) and
  the counts of under-replicated, over-replicated, missing and corrupt chunks;
* the repair queue with its progress, copy rate and ETA.

``--watch S`` redraws every S seconds until Ctrl-C.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tools.admin_client import AdminClient, MetaserverView
from tools.admin_output import (
    console,
    ds_id,
    human_bytes,
    human_seconds,
    percent,
    print_json,
)
from wire.cluster_admin_ops import (
    MATRIX_REPLICAS_MAX,
    ClusterHealthReply,
    DataserverReport,
    MatrixCell,
)


@dataclass(frozen=True)
class MetaserverRow:
    """One metaserver: its own status and, from the leader, its lag and last contact."""

    node_id: int
    address: str
    reachable: bool
    role: str
    is_leader: bool
    voter: bool
    ballot: str
    commit_index: int
    applied_index: int
    lag_slots: int | None
    last_contact_ms_ago: int | None
    error: str


@dataclass(frozen=True)
class ClusterReport:
    leader_id: int | None
    metaservers: tuple[MetaserverRow, ...]
    dataservers: tuple[DataserverReport, ...]
    health: ClusterHealthReply


def metaserver_rows(views: list[MetaserverView]) -> tuple[int | None, tuple[MetaserverRow, ...]]:
    """Join each replica's own status with the leader's view of it."""
    leader = next((v.status for v in views if v.status and v.status.role == "leader"), None)
    seen = {r.node_id: r for r in leader.replicas} if leader else {}
    voters = set(leader.voters) if leader else set()
    rows = []
    for view in views:
        status = view.status
        peer = seen.get(view.node_id)
        is_leader = leader is not None and view.node_id == leader.node_id
        rows.append(
            MetaserverRow(
                node_id=view.node_id,
                address=view.address,
                reachable=status is not None,
                role=status.role if status else "unreachable",
                is_leader=is_leader,
                voter=view.node_id in voters if voters else True,
                ballot=status.ballot if status else "",
                commit_index=status.commit_index if status else 0,
                applied_index=status.applied_index if status else 0,
                lag_slots=0 if is_leader else (peer.lag_slots if peer else None),
                last_contact_ms_ago=0
                if is_leader
                else (peer.last_contact_ms_ago if peer else None),
                error=view.error,
            )
        )
    return (leader.node_id if leader else None), tuple(rows)


async def gather(client: AdminClient) -> ClusterReport:
    """Ask the leader and, meanwhile, every metaserver for its own status."""
    views: list[MetaserverView] = []

    async def ask_group() -> None:
        views.extend(await client.group())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask_group)
        health = await client.health()
        servers, _ = await client.dataservers()
    leader_id, rows = metaserver_rows(views)
    return ClusterReport(leader_id, rows, tuple(servers), health)


# ---------------------------------------------------------------- rendering


def _metaserver_table(report: ClusterReport) -> Table:
    table = Table(title="Metaserver group", title_justify="left")
    for column in ("id", "address", "role", "ballot", "commit", "applied", "lag", "last contact"):
        table.add_column(
            column, justify="right" if column in ("commit", "applied", "lag") else "left"
        )
    for row in report.metaservers:
        role = f"[bold]{row.role}[/bold]" if row.is_leader else row.role
        if not row.reachable:
            role = f"[red]unreachable[/red] {row.error[:40]}"
        contact = "-" if row.last_contact_ms_ago is None else f"{row.last_contact_ms_ago} ms ago"
        lag = "-" if row.lag_slots is None else str(row.lag_slots)
        table.add_row(
            str(row.node_id),
            row.address,
            role if row.voter else f"{role} (learner)",
            row.ballot,
            str(row.commit_index) if row.reachable else "-",
            str(row.applied_index) if row.reachable else "-",
            lag,
            "-" if row.is_leader else contact,
        )
    return table


_STATE_STYLE = {"live": "green", "dead": "red", "decommissioning": "yellow", "maintenance": "cyan"}


def dataserver_table(servers: tuple[DataserverReport, ...] | list[DataserverReport]) -> Table:
    table = Table(title="Dataservers", title_justify="left")
    for column in ("id", "address", "state", "capacity", "used", "used %", "replicas"):
        table.add_column(
            column, justify="left" if column in ("id", "address", "state") else "right"
        )
    table.add_column("last heartbeat", justify="right")
    table.add_column("copies in/out", justify="right")
    table.add_column("to drain", justify="right")
    for server in servers:
        style = _STATE_STYLE.get(server.state, "")
        state = server.state
        if server.decommissioned:
            state = "decommissioned"
        drain = "-"
        if server.state == "decommissioning":
            drain = f"{server.drain_chunks} ({human_bytes(server.drain_bytes)})"
        table.add_row(
            ds_id(server.dataserver_id),
            server.address,
            f"[{style}]{state}[/{style}]" if style else state,
            human_bytes(server.capacity_bytes),
            human_bytes(server.used_bytes),
            f"{percent(server.used_bytes, server.capacity_bytes):.1f}",
            str(server.replicas),
            human_seconds(server.silent_ms / 1000) + " ago",
            f"{server.copies_in}/{server.copies_out}",
            drain,
        )
    return table


def matrix_table(
    counted: tuple[MatrixCell, ...], readable: tuple[MatrixCell, ...]
) -> RenderableType:
    """Goal (rows) x good replicas (columns); ``(n)`` beside a count of replicas that
    count toward goals gives the count by readable replicas where it differs."""
    if not counted and not readable:
        return Text("no chunks yet")
    cells = {(c.goal, c.replicas): c.chunks for c in counted}
    readable_cells = {(c.goal, c.replicas): c.chunks for c in readable}
    goals = sorted({goal for goal, _ in cells} | {goal for goal, _ in readable_cells})
    top = max([r for _, r in cells] + [r for _, r in readable_cells] + [g for g in goals] + [0])
    columns = list(range(0, min(top, MATRIX_REPLICAS_MAX) + 1))
    table = Table()
    table.add_column("goal", justify="right")
    for replicas in columns:
        label = f"{replicas}+" if replicas == MATRIX_REPLICAS_MAX else str(replicas)
        table.add_column(label, justify="right")
    for goal in goals:
        row = [str(goal)]
        for replicas in columns:
            count = cells.get((goal, replicas), 0)
            other = readable_cells.get((goal, replicas), 0)
            text = str(count) if count else "."
            if other != count:
                text += f" ({other})"
            style = "red" if replicas == 0 else "yellow" if replicas < goal else "green"
            if replicas > goal:
                style = "blue"
            row.append(f"[{style}]{text}[/{style}]" if count or other else text)
        table.add_row(*row)
    title = Text(
        "Chunks by goal (rows) and good replicas that count toward it (columns); "
        "(n): by replicas readable now, where different"
    )
    return Group(title, table)


def _chunk_summary(health: ClusterHealthReply) -> Text:
    parts = [
        f"{health.chunks_referenced} chunks referenced",
        f"{health.under_replicated} under-replicated",
        f"{health.over_replicated} over-replicated",
        f"{health.missing} missing",
        f"{health.corrupt_replicas} corrupt replicas",
        f"{health.orphans} orphans",
        f"{health.writes_in_flux} being written",
        f"{health.deletion_queue} deletions queued",
    ]
    return Text(", ".join(parts))


def repair_view(health: ClusterHealthReply) -> RenderableType:
    repair = health.repair
    done = repair.episode_bytes_copied
    total = done + repair.bytes_wanted
    table = Table(title="Repair queue", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("chunks queued", str(repair.queued_chunks))
    table.add_row("copies in flight", str(repair.copies_in_flight))
    table.add_row("copies wanted", f"{repair.replicas_wanted} ({human_bytes(repair.bytes_wanted)})")
    table.add_row(
        "copies done / failed",
        f"{repair.copies_done} / {repair.copies_failed} ({human_bytes(repair.bytes_copied)})",
    )
    rate = (
        f"{human_bytes(repair.rate_bytes_s)}/s over {repair.rate_window_s:.0f} s"
        if repair.rate_window_s
        else "not measured yet"
    )
    table.add_row("copy rate", f"{rate} (cap {human_bytes(repair.rate_cap_bytes_s)}/s)")
    table.add_row("ETA", human_seconds(repair.eta_s))
    if total:
        table.add_row(
            "progress",
            Group(
                ProgressBar(total=float(total), completed=float(done), width=40),
                Text(f"{percent(done, total):.0f} % of {human_bytes(total)}"),
            ),
        )
    return table


def render(report: ClusterReport) -> RenderableType:
    health = report.health
    header = Text(
        f"leader: metaserver {report.leader_id}" if report.leader_id else "leader: none",
        style="bold",
    )
    if health.safe_mode:
        header.append(
            "  [safe mode: the leader is still collecting dataserver reports]", style="yellow"
        )
    return Group(
        header,
        _metaserver_table(report),
        dataserver_table(report.dataservers),
        _chunk_summary(health),
        matrix_table(health.matrix, health.matrix_readable),
        repair_view(health),
    )


async def run_report(client: AdminClient, *, as_json: bool, watch_s: float | None) -> int:
    """Print the report once (or every ``watch_s`` seconds until interrupted)."""
    report = await gather(client)
    if as_json:
        print_json(report)
        return 0
    if watch_s is None:
        console().print(render(report))
        return 0
    with Live(render(report), console=console(), auto_refresh=False) as live:
        while True:
            await trio.sleep(watch_s)
            live.update(render(await gather(client)), refresh=True)
