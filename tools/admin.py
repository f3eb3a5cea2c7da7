"""``paxfs admin ACTION``: see, check, heal and rebalance a running cluster.

Actions (each has ``--help``):

* ``report [--json] [--watch S]`` -- metaserver group, dataservers, chunk-health matrix,
  repair queue (:mod:`tools.admin_report`);
* ``fsck PATH [--files] [--chunks] [--locations] [--verify-checksums] [--list-corrupt]
  [--json]`` -- the health of every file under PATH; exit 0 only when all is healthy
  (:mod:`tools.admin_fsck`);
* ``fileinfo PATH [--json]`` and ``setgoal N PATH [-r] [--wait]``;
* ``balance [--threshold PCT] [--bandwidth MIB_S] [--max-move BYTES] [--include IDS]
  [--exclude IDS] [--apply] [--json]`` (:mod:`tools.admin_balance`);
* ``decommission ID [--status | --cancel] [--wait]`` and ``maintenance ID on|off``
  (:mod:`tools.admin_servers`).

PATH is a path in the paxfs namespace (``/`` is its root).  A dataserver ID is its id
in hex (a unique prefix of 4+ digits will do) or its HOST:PORT.  The cluster comes from
the configuration (``-c FILE``, before or after the action).  Exit status: 0 done (and,
for fsck, healthy), 1 a failure at run time or an unhealthy fsck, 2 bad usage, 130
interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from tools.admin_balance import THRESHOLD_PCT_DEFAULT, BalanceRun, run_balance
from tools.admin_client import AdminClient, AdminError, open_admin_client
from tools.admin_fsck import SETGOAL_TIMEOUT_S_DEFAULT, run_fileinfo, run_fsck, run_setgoal
from tools.admin_report import run_report
from tools.admin_servers import DECOMMISSION_TIMEOUT_S_DEFAULT, run_decommission, run_maintenance
from wire.config import Config
from wire.errors import RpcError
from wire.transport import raise_single

EXIT_INTERRUPTED = 130
SETTING_SECTIONS = ("cluster", "client")
"""The configuration sections ``paxfs admin`` uses (as declared in :mod:`tools.cli`)."""


class AdminUsageError(Exception):
    """The arguments make no sense together; the message is one line (exit status 2)."""


def _size(text: str) -> int:
    """``1048576``, ``64M``, ``1.5G`` (binary units) -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = raw[-1:] if raw[-1:] in units and raw[-1:] else ""
    number = raw[: len(raw) - len(suffix)] if suffix else raw
    try:
        value = float(number) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 2G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return int(value)


def _ids(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The actions of ``paxfs admin`` as sub-commands of ``parser``."""
    actions = parser.add_subparsers(dest="admin_action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        """An action's parser; ``-c`` and the setting flags work after the action too
        (SUPPRESS: given there, they override ``paxfs admin``'s own; else they don't)."""
        from tools.cli import add_setting_flags

        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="TOML configuration file (default: $PAXFS_CONFIG)",
        )
        for section in SETTING_SECTIONS:
            add_setting_flags(sub, section)
        for argument in sub._actions:
            if argument.dest.startswith("setting:"):
                argument.default = argparse.SUPPRESS
        return sub

    report = action("report", "the whole cluster: group, dataservers, chunk health, repair")
    report.add_argument("--json", action="store_true", help="one JSON document")
    report.add_argument("--watch", type=float, metavar="S", help="redraw every S seconds")

    fsck = action("fsck", "check the health of every file under PATH (exit 0 when healthy)")
    fsck.add_argument("path", metavar="PATH", help="path in the paxfs namespace")
    fsck.add_argument("--files", action="store_true", help="list every file")
    fsck.add_argument("--chunks", action="store_true", help="list every chunk")
    fsck.add_argument("--locations", action="store_true", help="list every replica")
    fsck.add_argument(
        "--verify-checksums",
        action="store_true",
        help="read every replica in full and compare them",
    )
    fsck.add_argument(
        "--list-corrupt", action="store_true", help="list only missing and corrupt chunks"
    )
    fsck.add_argument("--json", action="store_true", help="one JSON document")

    fileinfo = action("fileinfo", "a file's chunks, versions, replicas and their health")
    fileinfo.add_argument("path", metavar="PATH", help="path in the paxfs namespace")
    fileinfo.add_argument("--json", action="store_true", help="one JSON document")

    setgoal = action("setgoal", "change the replication goal (the cluster converges to it)")
    setgoal.add_argument("goal", metavar="N", type=int, help="replicas wanted (1..16)")
    setgoal.add_argument("path", metavar="PATH", help="path in the paxfs namespace")
    setgoal.add_argument(
        "-r", "--recursive", action="store_true", help="every file and directory under PATH"
    )
    setgoal.add_argument("--wait", action="store_true", help="follow until converged")
    setgoal.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=SETGOAL_TIMEOUT_S_DEFAULT,
        help="give up waiting after S seconds (exit 1)",
    )
    setgoal.add_argument("--json", action="store_true", help="one JSON document")

    balance = action("balance", "move replicas until every dataserver is near the mean")
    balance.add_argument(
        "--threshold",
        type=float,
        metavar="PCT",
        default=THRESHOLD_PCT_DEFAULT,
        help="allowed distance from the mean utilisation, in percentage points "
        f"(default {THRESHOLD_PCT_DEFAULT:g})",
    )
    balance.add_argument(
        "--bandwidth", type=float, metavar="MIB_S", help="cap on copy traffic, MiB/s"
    )
    balance.add_argument(
        "--max-move", type=_size, metavar="BYTES", help="move at most this much (e.g. 10G)"
    )
    balance.add_argument(
        "--include", type=_ids, default=[], metavar="IDS", help="only these dataservers (a,b)"
    )
    balance.add_argument(
        "--exclude", type=_ids, default=[], metavar="IDS", help="leave these dataservers out"
    )
    balance.add_argument(
        "--apply", action="store_true", help="carry out the plan (else only print it)"
    )
    balance.add_argument("--json", action="store_true", help="one JSON document")

    decommission = action("decommission", "drain a dataserver so that it can be removed")
    decommission.add_argument("dataserver", metavar="ID", help="hex id (prefix) or HOST:PORT")
    which = decommission.add_mutually_exclusive_group()
    which.add_argument("--status", action="store_true", help="how far the drain is")
    which.add_argument("--cancel", action="store_true", help="make it a normal server again")
    decommission.add_argument("--wait", action="store_true", help="follow until drained")
    decommission.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=DECOMMISSION_TIMEOUT_S_DEFAULT,
        help="give up waiting after S seconds (exit 1)",
    )
    decommission.add_argument("--json", action="store_true", help="one JSON document")

    maintenance = action("maintenance", "hold back re-replication during a planned restart")
    maintenance.add_argument("dataserver", metavar="ID", help="hex id (prefix) or HOST:PORT")
    maintenance.add_argument("switch", choices=("on", "off"))
    maintenance.add_argument("--json", action="store_true", help="one JSON document")


Action = Callable[[AdminClient], Awaitable[int]]


def _action(args: argparse.Namespace, balance_run: BalanceRun) -> tuple[Action, bool]:
    """The coroutine function for the chosen action and whether it needs a session."""
    name = args.admin_action
    if name == "report":
        if args.watch is not None and (args.watch <= 0 or args.json):
            raise AdminUsageError("--watch needs a positive period and no --json")
        return partial(run_report, as_json=args.json, watch_s=args.watch), False
    if name == "fsck":
        return (
            partial(
                run_fsck,
                path=args.path,
                files=args.files,
                chunks=args.chunks,
                locations=args.locations,
                verify=args.verify_checksums,
                list_corrupt=args.list_corrupt,
                as_json=args.json,
            ),
            False,
        )
    if name == "fileinfo":
        return partial(run_fileinfo, path=args.path, as_json=args.json), False
    if name == "setgoal":
        return (
            partial(
                run_setgoal,
                goal=args.goal,
                path=args.path,
                recursive=args.recursive,
                wait=args.wait,
                timeout_s=args.timeout,
                as_json=args.json,
            ),
            True,
        )
    if name == "balance":
        return (
            partial(
                run_balance,
                threshold_pct=args.threshold,
                bandwidth_mib_s=args.bandwidth,
                max_move_bytes=args.max_move,
                include=args.include,
                exclude=args.exclude,
                apply=args.apply,
                as_json=args.json,
                run=balance_run,
            ),
            False,
        )
    if name == "decommission":
        if args.wait and (args.status or args.cancel):
            raise AdminUsageError("--wait goes with starting a decommission only")
        return (
            partial(
                run_decommission,
                ident=args.dataserver,
                status=args.status,
                cancel=args.cancel,
                wait=args.wait,
                timeout_s=args.timeout,
                as_json=args.json,
            ),
            False,
        )
    if name == "maintenance":
        return (
            partial(
                run_maintenance, ident=args.dataserver, on=args.switch == "on", as_json=args.json
            ),
            False,
        )
    raise AdminUsageError(f"unknown action {name!r}")


async def _main(config: Config, action: Action, session: bool) -> int:
    try:
        async with open_admin_client(config, session=session) as client:
            return await action(client)
    except BaseExceptionGroup as group:
        raise_single(group)  # one failure in a nursery is reported as itself


def run(args: argparse.Namespace, config: Config) -> int:
    """Carry out ``paxfs admin ...``; raises :class:`AdminError` (one line, exit 1) and
    :class:`AdminUsageError` (exit 2) for the caller to print."""
    balance_run = BalanceRun()
    action, session = _action(args, balance_run)
    try:
        return trio.run(_main, config, action, session)
    except RpcError as error:
        raise AdminError(f"the cluster answered: {error}") from None
    except KeyboardInterrupt:
        if args.admin_action == "balance" and args.apply:
            print(
                f"paxfs admin balance: interrupted; {balance_run.line()}; no chunk was left "
                "below its goal; run it again to resume",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
