"""``paxfs admin decommission`` and ``paxfs admin maintenance``: dataserver states.

**Decommission** drains a dataserver: from then on it is never written to but still read
from, and its replicas no longer count toward goals, so the cluster manager copies every
chunk on it elsewhere (most endangered first, under the re-replication rate) while the
replicas on it stay readable: no chunk is ever below its goal.  It is *decommissioned*
once every chunk with a good replica on it has its goal of counted replicas elsewhere;
then it can be switched off.  ``--status`` shows how far the drain is, ``--cancel`` makes
it a normal server again, ``--wait`` follows the drain with a progress bar until done.

**Maintenance** is for a planned restart: the server is neither read nor written, but
its replicas keep counting toward goals, so its silence causes no re-replication.

Both are durable, like HDFS's exclude and maintenance files: the mode goes through the
metaservers' replicated log before the command answers, so a new leader carries on a
drain and keeps a dataserver in maintenance (even one that is down and has not reported
to it) from being re-replicated.  A mode can be set on a dataserver the leader knows: one
registered with it, or one that already has a mode.
"""

from __future__ import annotations

import trio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tools.admin_client import AdminClient, AdminError
from tools.admin_output import console, ds_id, human_bytes, print_json
from tools.admin_report import dataserver_table
from wire.cluster_admin_ops import DataserverMode, DataserverReport

DRAIN_POLL_S = 0.5
DECOMMISSION_TIMEOUT_S_DEFAULT = 3600.0


def describe(server: DataserverReport) -> str:
    name = f"dataserver {ds_id(server.dataserver_id)} ({server.address})"
    if server.decommissioned:
        return (
            f"{name} is decommissioned: every chunk on it has its goal elsewhere; "
            "it can be switched off"
        )
    if server.state == "decommissioning":
        return (
            f"{name} is decommissioning: {server.drain_chunks} chunks "
            f"({human_bytes(server.drain_bytes)}) still to copy elsewhere"
        )
    if server.state == "maintenance":
        return f"{name} is in maintenance: its replicas count, nothing is re-replicated"
    return f"{name} is {server.state}"


def _show(server: DataserverReport, *, as_json: bool) -> None:
    if as_json:
        print_json(server)
    else:
        console().print(describe(server), markup=False)


async def _current(client: AdminClient, server: DataserverReport) -> DataserverReport:
    servers, _ = await client.dataservers()
    for found in servers:
        if found.dataserver_id == server.dataserver_id:
            return found
    raise AdminError(f"dataserver {ds_id(server.dataserver_id)} is no longer known")


async def follow_drain(
    client: AdminClient, server: DataserverReport, timeout_s: float, *, quiet: bool
) -> DataserverReport:
    """Poll until ``server`` is decommissioned; AdminError when its decommission is
    cancelled meanwhile (by another admin) or after ``timeout_s``."""
    largest = max(1, server.drain_chunks)
    with Progress(
        TextColumn(f"draining {ds_id(server.dataserver_id)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeElapsedColumn(),
        console=console(),
        disable=quiet,
    ) as progress:
        task = progress.add_task("drain", total=largest)
        with trio.move_on_after(timeout_s):
            while True:
                current = await _current(client, server)
                if current.state in ("live", "maintenance"):
                    raise AdminError(
                        f"the decommission of dataserver {ds_id(server.dataserver_id)} was "
                        f"cancelled: it is {current.state} now"
                    )
                largest = max(largest, current.drain_chunks)
                progress.update(task, total=largest, completed=largest - current.drain_chunks)
                if current.decommissioned:
                    return current
                await trio.sleep(DRAIN_POLL_S)
    raise AdminError(
        f"dataserver {ds_id(server.dataserver_id)} not drained within {timeout_s:g} s "
        "(it keeps decommissioning; see --status)"
    )


async def run_decommission(
    client: AdminClient,
    ident: str,
    *,
    status: bool,
    cancel: bool,
    wait: bool,
    timeout_s: float,
    as_json: bool,
) -> int:
    server = await client.find_dataserver(ident)
    if status:
        _show(server, as_json=as_json)
        return 0
    if cancel:
        _show(await client.set_mode(server.dataserver_id, DataserverMode.NORMAL), as_json=as_json)
        return 0
    if server.state == "dead":
        raise AdminError(
            f"dataserver {ds_id(server.dataserver_id)} is dead: its replicas are already "
            "being re-created elsewhere"
        )
    server = await client.set_mode(server.dataserver_id, DataserverMode.DECOMMISSION)
    if wait:
        server = await follow_drain(client, server, timeout_s, quiet=as_json)
    _show(server, as_json=as_json)
    return 0


async def run_maintenance(client: AdminClient, ident: str, on: bool, *, as_json: bool) -> int:
    server = await client.find_dataserver(ident)
    mode = DataserverMode.MAINTENANCE if on else DataserverMode.NORMAL
    server = await client.set_mode(server.dataserver_id, mode)
    if as_json:
        print_json(server)
    else:
        console().print(describe(server), markup=False)
        console().print(dataserver_table([server]))
    return 0
