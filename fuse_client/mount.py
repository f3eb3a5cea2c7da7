"""``paxfs mount``: serve the file system at a mount point until unmounted or signalled.

Like other mount helpers, the command returns once the mount is live: unless asked to
stay in the foreground it forks, the child connects to the cluster, mounts, and reports
"mounted" (or the one-line reason it could not) through a pipe; the parent prints that and
exits 0 or 1.  The mount ends cleanly on SIGINT or SIGTERM (buffered writes are
published, then the mount point is unmounted) and on ``fusermount3 -u`` (the session
ends; buffered writes of files still open are published before the process exits).

pyfuse3 keeps its session in module globals: one mount per process.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from fuse_client.file_client import open_file_client
from fuse_client.fs import PaxfsOperations
from wire.config import Config
from wire.errors import RpcError
from wire.transport import raise_single

log = logging.getLogger(__name__)

READY_MESSAGE = b"mounted\n"
READY_TIMEOUT_S = 120.0
"""How long the parent waits for the child to report (connecting may wait for a leader)."""
MAX_TASKS = 64
"""pyfuse3 worker tasks: requests handled at once."""


class MountFailed(Exception):
    """The mount could not start; the message is one line for the operator."""


@dataclass(frozen=True)
class MountRequest:
    mountpoint: str
    options: tuple[str, ...] = ()
    foreground: bool = False
    log_file: str = ""


def fuse_options(config: Config, extra: tuple[str, ...]) -> set[str]:
    """The mount options: ``default_permissions`` (the kernel checks permissions),
    ``allow_other`` when ``[mount] allow_other``, a file system name, and ``-o`` extras."""
    options = set(pyfuse3.default_options)
    options.add("fsname=paxfs")
    options.add("subtype=paxfs")
    if config.mount.allow_other:
        options.add("allow_other")
    for option in extra:
        for item in option.split(","):
            if item.strip():
                options.add(item.strip())
    return options


def set_kernel_readahead(mountpoint: str, device: int, readahead_bytes: int) -> None:
    """Set the kernel's read-ahead of the mount on ``device`` (its ``read_ahead_kb``), as
    mergerfs's ``readahead`` does: FUSE lets a file system lower the 128 KiB default but
    not raise it, and the read-ahead also caps each read request.  Only root may write
    it; without it the mount works with smaller reads, so a failure is a warning."""
    if not readahead_bytes:
        return
    setting = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(setting, "w") as handle:
            handle.write(str(readahead_bytes // 1024))
    except OSError as error:
        log.warning(
            "%s: kernel read-ahead stays at its default (reads come in 128 KiB): %s: %s",
            mountpoint,
            setting,
            error.strerror or error,
        )


def check_mountpoint(mountpoint: str) -> None:
    path = Path(mountpoint)
    if not path.is_dir():
        raise MountFailed(f"mount point {mountpoint} is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise MountFailed("/dev/fuse is missing (is the fuse kernel module loaded?)")


async def serve_mount(
    config: Config, request: MountRequest, on_ready: Callable[[], None] | None = None
) -> None:
    """Connect, mount, serve until unmounted or SIGINT/SIGTERM, then clean up."""
    try:
        async with open_file_client(config, name=f"mount:{request.mountpoint}") as client:
            operations = PaxfsOperations(client, config.mount)
            try:
                pyfuse3.init(operations, request.mountpoint, fuse_options(config, request.options))
            except RuntimeError as error:
                raise MountFailed(f"cannot mount {request.mountpoint}: {error}") from None
            unmounted = False
            try:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async with trio.open_nursery() as nursery:

                        async def announce_when_live() -> None:
                            # The mount answers once the kernel's INIT is done, which
                            # also resets the read-ahead: only then is it raised.
                            status = await trio.to_thread.run_sync(
                                os.stat, request.mountpoint, abandon_on_cancel=True
                            )
                            set_kernel_readahead(
                                request.mountpoint,
                                status.st_dev,
                                config.mount.kernel_readahead_bytes,
                            )
                            if on_ready is not None:
                                on_ready()

                        async def stop_on_signal() -> None:
                            async for signum in signals:
                                log.info("%s: unmounting", signal.Signals(signum).name)
                                pyfuse3.terminate()
                                return

                        nursery.start_soon(stop_on_signal)
                        nursery.start_soon(announce_when_live)
                        nursery.start_soon(operations.list_ahead_forever)
                        await pyfuse3.main(max_tasks=MAX_TASKS)
                        unmounted = True
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await operations.release_all()
                pyfuse3.close(unmount=True)
                log.info(
                    "unmounted %s%s",
                    request.mountpoint,
                    "" if unmounted else " (session ended)",
                )
    except BaseExceptionGroup as group:
        raise_single(group)
    except RpcError as error:
        raise MountFailed(f"cannot reach the cluster: {error}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``paxfs mount`` (besides the settings of [cluster], [client], [mount])."""
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    parser.add_argument(
        "-o",
        dest="mount_options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="FUSE mount options (e.g. ro, allow_other)",
    )
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    parser.add_argument("--log", default="", metavar="FILE", help="log file of the daemon")


def run_command(args: argparse.Namespace, config: Config) -> int:
    """``paxfs mount``: raises :class:`MountFailed` or ConfigError with one line."""
    request = MountRequest(args.mountpoint, tuple(args.mount_options), args.foreground, args.log)
    return run_mount(config, request)


def run_mount(config: Config, request: MountRequest) -> int:
    """Mount as :class:`MountRequest` says; returns the exit status for the command."""
    config.metaserver_addresses()  # configuration errors before forking
    config.cluster_key()
    check_mountpoint(request.mountpoint)
    if request.foreground:
        _configure_logging(request.log_file)
        trio.run(serve_mount, config, request)
        return 0
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        _detach(request.log_file)
        status = 0
        try:
            trio.run(
                serve_mount,
                config,
                request,
                lambda: _report(write_end, READY_MESSAGE),
            )
        except MountFailed as error:
            _report(write_end, f"{error}\n".encode())
            status = 1
        except BaseException as error:  # noqa: BLE001 - the daemon reports, then dies
            log.exception("mount failed")
            _report(write_end, f"mount failed: {error!r}\n".encode())
            status = 1
        os._exit(status)
    os.close(write_end)
    message = _read_report(read_end)
    os.close(read_end)
    if message == READY_MESSAGE:
        return 0
    text = message.decode(errors="replace").strip() or "the mount process exited without a word"
    raise MountFailed(text)


def _report(fd: int, message: bytes) -> None:
    try:
        os.write(fd, message)
        os.close(fd)
    except OSError:
        pass  # the parent is gone or the message went already


def _read_report(fd: int) -> bytes:
    chunks = []
    ready, _, _ = select.select([fd], [], [], READY_TIMEOUT_S)
    if not ready:
        raise MountFailed(f"the mount did not come up within {READY_TIMEOUT_S:.0f} s")
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError as error:
            if error.errno == errno.EINTR:
                continue
            raise
        if not data:
            break
        chunks.append(data)
        if b"\n" in data:
            break
    return b"".join(chunks)


def _detach(log_file: str) -> None:
    """Standard streams to /dev/null (stdout) and the log file (stderr)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if log_file:
        target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, 2)
        os.close(target)
    else:
        os.dup2(null, 2)
    os.close(null)
    _configure_logging("")


def _configure_logging(log_file: str) -> None:
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s mount %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
