"""The ``paxfs`` command line: one entry point, one subcommand per process or tool.

Settings come from the TOML file named by ``-c/--config`` (or the
``PAXFS_CONFIG`` environment variable); flags override the file.  Each
subcommand gets a flag for every setting of the sections it uses, derived from
the dataclasses in :mod:`wire.config`, so the file and the flags cannot drift
apart.  Every error is one line on stderr: exit status 2 for a bad
configuration or usage, 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from wire.config import Config, ConfigError, load_config, set_setting

EXIT_FAILURE = 1
EXIT_USAGE = 2

Runner = Callable[[argparse.Namespace, Config], int]
FLAG_ALIASES = {"data_dir": ["--data"]}


@dataclasses.dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    sections: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Runner


class CommandFailed(Exception):
    """A subcommand failed in a way the operator can act on; the message is one line."""


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser, section_name: str) -> None:
    section_type = typing.get_type_hints(Config)[section_name]
    hints = typing.get_type_hints(section_type)
    group = parser.add_argument_group(f"[{section_name}] settings (override the config file)")
    for field in dataclasses.fields(section_type):
        annotation = hints[field.name]
        dest = f"setting:{section_name}:{field.name}"
        flags = [_flag_name(field.name), *FLAG_ALIASES.get(field.name, [])]
        help_text = field.metadata.get("help", "")
        if annotation is bool:
            group.add_argument(
                *flags,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif typing.get_origin(annotation) is dict:
            group.add_argument(
                *flags,
                dest=dest,
                metavar="K=V[,K=V...]",
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(
                *flags,
                dest=dest,
                metavar=annotation.__name__.upper(),
                default=None,
                help=help_text,
            )


def _convert_flag(annotation: Any, text: Any, flag: str) -> Any:
    if text is None or isinstance(text, bool):
        return text
    try:
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if typing.get_origin(annotation) is dict:
            pairs = [item.partition("=") for item in text.split(",") if item]
            if any(not sep for _k, sep, _v in pairs):
                raise ValueError
            return {k: v for k, _sep, v in pairs}
    except ValueError:
        raise ConfigError(f"{flag}: bad value {text!r}") from None
    return text


def apply_flags(config: Config, args: argparse.Namespace) -> None:
    """Copy every setting flag that was given into ``config``."""
    for dest, value in vars(args).items():
        if not dest.startswith("setting:") or value is None:
            continue
        _, section_name, field_name = dest.split(":")
        section = getattr(config, section_name)
        annotation = typing.get_type_hints(type(section))[field_name]
        flag = _flag_name(field_name)
        set_setting(section, field_name, _convert_flag(annotation, value, flag), flag)


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    return None


def configure_logging(process: str) -> None:
    """One line per event on stderr, naming the process."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
    )


def _run_metaserver(_args: argparse.Namespace, config: Config) -> int:
    from metaserver.server import StartupRefused, run

    configure_logging(f"metaserver-{config.metaserver.id}")
    try:
        run(config, _cluster_manager_services(config))
    except StartupRefused as error:
        raise CommandFailed(str(error)) from None
    return 0


def _run_dataserver(_args: argparse.Namespace, config: Config) -> int:
    from dataserver.server import run

    return run(config)


def _cluster_manager_services(config: Config) -> Callable[..., None]:
    """The cluster manager's handlers and tasks (leader only) for the metaserver, with
    the admin handlers of ``paxfs admin``."""
    from metaserver.cluster_admin import cluster_services

    return cluster_services(config)


def _mount_arguments(parser: argparse.ArgumentParser) -> None:
    from fuse_client.mount import add_arguments

    add_arguments(parser)


def _run_mount(args: argparse.Namespace, config: Config) -> int:
    from fuse_client.mount import MountFailed, run_command

    try:
        return run_command(args, config)
    except MountFailed as error:
        raise CommandFailed(str(error)) from None


def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    from tools.local_cluster import add_arguments

    add_arguments(parser)


def _run_cluster(args: argparse.Namespace, _config: Config) -> int:
    from tools.local_cluster import ClusterError, run

    try:
        return run(args)
    except ClusterError as error:
        raise CommandFailed(str(error)) from None


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    from tools.admin import add_arguments

    add_arguments(parser)


def _run_admin(args: argparse.Namespace, config: Config) -> int:
    from tools.admin import AdminUsageError, run
    from tools.admin_client import AdminError

    try:
        return run(args, config)
    except AdminUsageError as error:
        print(f"paxfs admin {args.admin_action}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except AdminError as error:
        raise CommandFailed(str(error)) from None


def subcommands() -> list[Subcommand]:
    """Every subcommand; each room's issue replaces its placeholder as it lands."""
    return [
        Subcommand(
            "metaserver",
            "run one replica of the metaserver group",
            ("cluster", "metaserver"),
            _no_arguments,
            _run_metaserver,
        ),
        Subcommand(
            "dataserver",
            "run a dataserver that stores chunk replicas",
            ("cluster", "dataserver"),
            _no_arguments,
            _run_dataserver,
        ),
        Subcommand(
            "mount",
            "mount the file system with FUSE",
            ("cluster", "client", "mount"),
            _mount_arguments,
            _run_mount,
        ),
        Subcommand(
            "cluster",
            "run a whole cluster on this machine (up, down, status)",
            (),
            _cluster_arguments,
            _run_cluster,
        ),
        Subcommand(
            "admin",
            "inspect and repair a cluster (report, fsck, balance, ...)",
            ("cluster", "client"),
            _admin_arguments,
            _run_admin,
        ),
    ]


def build_parser(commands: Sequence[Subcommand]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paxfs",
        description="paxfs: a distributed file system "
        "(Multi-Paxos metadata, replicated chunks, FUSE)",
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        sub.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            default=os.environ.get("PAXFS_CONFIG"),
            help="TOML configuration file (default: $PAXFS_CONFIG)",
        )
        command.add_arguments(sub)
        for section in command.sections:
            add_setting_flags(sub, section)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    commands = subcommands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    command = next(c for c in commands if c.name == args.subcommand)
    try:
        config = load_config(args.config)
        apply_flags(config, args)
        config.validate()
        return command.run(args, config)
    except ConfigError as error:
        print(f"paxfs {args.subcommand}: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as error:
        print(f"paxfs {args.subcommand}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
