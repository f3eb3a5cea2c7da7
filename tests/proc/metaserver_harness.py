"""Real metaserver processes on loopback, for tests of the group and of everything on top.

What it gives a test:

* :func:`free_ports` and :func:`toml_config` -- a cluster configuration for N metaservers on
  free loopback ports, plus any extra tables (``[dataserver]``, ``[client]``...);
* :class:`ManagedProcess` -- one child process with its own log file, started with
  ``python -m tools.cli SUBCOMMAND -c FILE ...`` and stopped, killed (``kill -9``) or waited
  for *by PID* only;
* :class:`MetaserverGroup` -- N metaservers in a tmp directory: start, kill -9, restart,
  wipe, stop each one; wait for a leader; read each replica's group status and state digest
  over the admin RPCs; open a :class:`~fuse_client.meta_client.MetaClient` on the group;
* :func:`metaserver_group` -- an ``async with`` block that starts a group, waits for its
  leader, and stops every process it started (also when the test fails), printing the tail
  of each log;
* :class:`NamespaceWorkload` -- concurrent clients creating, removing and looking up
  names while recording a history for the linearizability checker (:data:`NAME_MODEL`),
  plus names that are only ever created, to check that nothing acknowledged is lost.

Reuse for other process kinds: build a :class:`ManagedProcess` with the subcommand and
config of your choice (the group's :attr:`MetaserverGroup.config_path` names a shared
config), and register it with :meth:`MetaserverGroup.adopt` so that the same finaliser
stops it.  ``PAXFS_TEST_KEEP_LOGS=1`` prints whole logs instead of tails.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fuse_client.meta_client import MetaClient, open_meta_client
from tests.lincheck import CheckResult, Model, Operation, check
from tools.local_cluster import free_ports
from wire.address import Address
from wire.admin_ops import (
    GROUP_STATUS,
    STATE_DIGEST,
    DigestReply,
    DigestRequest,
    GroupStatusReply,
    GroupStatusRequest,
)
from wire.errors import RpcError
from wire.ids import ROOT_INODE
from wire.namespace_ops import EntryReply, Lookup, Mknod, Unlink
from wire.transport import open_connection

KEY = bytes.fromhex("9a0c51e2d4b6f8a1c3e5079b2d4f6a8c0e1f3a5b7c9d0e2f4a6b8c0d1e3f5a7b")
REPO_ROOT = Path(__file__).resolve().parents[2]
PROCESS_STOP_TIMEOUT_S = 5.0
LEADER_TIMEOUT_S = 15.0
ADMIN_CALL_TIMEOUT_S = 2.0
LOG_TAIL_CHARS = 4000

FAST_ELECTIONS: dict[str, Any] = {"election_timeout_ms": 500, "heartbeat_interval_ms": 50}
"""Metaserver settings that make tests quick: elections in well under a second."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_config(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Render ``{table: {key: value}}`` as a paxfs TOML configuration."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` every 20 ms until true; fail naming ``what`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class ManagedProcess:
    """One child process started by a test; every signal goes to its PID only."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again); output is appended to ``log_path``."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            log.write(f"==== start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
                env=self.env,
            )

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` (default: kill -9) and, for SIGKILL, reap the child."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)
            if signum == signal.SIGKILL:
                self.process.wait()

    def stop(self, timeout_s: float = PROCESS_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; return the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to exit by itself; its status (fails after ``timeout_s``)."""
        await wait_until(lambda: not self.running, f"{self.name} to exit", timeout_s)
        assert self.process is not None
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def paxfs_argv(subcommand: str, config_path: Path, *args: str) -> list[str]:
    """``paxfs SUBCOMMAND -c CONFIG ARGS`` run with this interpreter from the repository."""
    return [sys.executable, "-m", "tools.cli", subcommand, "-c", str(config_path), *args]


@dataclass
class MetaserverNode:
    """One metaserver of a test group: its id, address, files, and process."""

    node_id: int
    address: Address
    data_dir: Path
    config_path: Path
    process: ManagedProcess
    extra_args: list[str] = field(default_factory=list)


class MetaserverGroup:
    """A metaserver group of ``count`` founding replicas under ``directory``.

    Founding replicas get ids 1..count and the addresses in ``[cluster] metaservers``;
    :meth:`add_node` prepares a replica under a new id that joins later (``--join``).
    ``settings`` go to ``[metaserver]`` of every config; ``extra_tables`` are added to
    the shared config file for processes of other kinds.
    """

    def __init__(
        self,
        directory: Path,
        count: int = 3,
        *,
        key: bytes = KEY,
        settings: Mapping[str, Any] | None = None,
        extra_tables: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.directory = directory
        self.key = key
        self.settings: dict[str, Any] = dict(settings or {})
        self.extra_tables = {k: dict(v) for k, v in (extra_tables or {}).items()}
        ports = free_ports(count)
        self.founders: dict[int, Address] = {
            i + 1: Address("127.0.0.1", port) for i, port in enumerate(ports)
        }
        self.nodes: dict[int, MetaserverNode] = {}
        self.others: list[ManagedProcess] = []
        self.config_path = directory / "paxfs.toml"
        self.config_path.write_text(self.config_text())
        for node_id, address in self.founders.items():
            self._prepare(node_id, address, self.config_path, [])

    # ---- configuration --------------------------------------------------------------

    def config_text(
        self,
        metaservers: Mapping[int, Address] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> str:
        """The TOML text of a config; ``metaservers`` defaults to the founders."""
        cluster = {
            "key": self.key.hex(),
            "metaservers": {str(i): str(a) for i, a in (metaservers or self.founders).items()},
        }
        tables: dict[str, Mapping[str, Any]] = {"cluster": cluster}
        tables["metaserver"] = {**self.settings, **(settings or {})}
        tables.update(self.extra_tables)
        return toml_config(tables)

    def write_node_config(
        self,
        node_id: int,
        *,
        metaservers: Mapping[int, Address] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Path:
        """Give ``node_id`` a config file of its own (e.g. peers reached through proxies,
        or other settings); it is used from the next (re)start."""
        path = self.directory / f"metaserver-{node_id}.toml"
        path.write_text(self.config_text(metaservers, settings))
        self.nodes[node_id].config_path = path
        return path

    def _prepare(
        self, node_id: int, address: Address, config_path: Path, extra_args: list[str]
    ) -> MetaserverNode:
        data_dir = self.directory / f"ms{node_id}"
        process = ManagedProcess(
            f"metaserver-{node_id}", [], self.directory / f"metaserver-{node_id}.log"
        )
        node = MetaserverNode(node_id, address, data_dir, config_path, process, extra_args)
        self.nodes[node_id] = node
        return node

    def add_node(self, node_id: int, settings: Mapping[str, Any] | None = None) -> MetaserverNode:
        """Prepare a new replica ``node_id`` (not a founder) that starts with ``--join``."""
        if node_id in self.nodes:
            raise ValueError(f"metaserver {node_id} exists already")
        address = Address("127.0.0.1", free_ports(1)[0])
        node = self._prepare(node_id, address, self.config_path, [])
        node.extra_args = ["--join", "--address", str(address)]
        if settings:
            self.write_node_config(node_id, settings=settings)
        return node

    # ---- processes ------------------------------------------------------------------

    def start(self, node_id: int, *extra_args: str) -> ManagedProcess:
        """Start metaserver ``node_id`` on its data directory (created if absent)."""
        node = self.nodes[node_id]
        node.process.argv = paxfs_argv(
            "metaserver",
            node.config_path,
            "--id",
            str(node_id),
            "--data",
            str(node.data_dir),
            *node.extra_args,
            *extra_args,
        )
        node.process.start()
        return node.process

    def kill(self, node_id: int) -> None:
        """``kill -9`` metaserver ``node_id``."""
        self.nodes[node_id].process.kill(signal.SIGKILL)

    def stop(self, node_id: int) -> int | None:
        return self.nodes[node_id].process.stop()

    def restart(self, node_id: int, *extra_args: str) -> ManagedProcess:
        """``kill -9`` (if running) and start again on the same data."""
        self.kill(node_id)
        return self.start(node_id, *extra_args)

    def wipe(self, node_id: int) -> None:
        """Remove the data directory of a stopped metaserver (a lost disk)."""
        node = self.nodes[node_id]
        if node.process.running:
            raise RuntimeError(f"metaserver {node_id} is running; kill it first")
        shutil.rmtree(node.data_dir, ignore_errors=True)

    def adopt(self, process: ManagedProcess) -> ManagedProcess:
        """Let the group's finaliser stop ``process`` too (dataservers, mounts...)."""
        self.others.append(process)
        return process

    def running(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.process.running]

    def stop_all(self) -> dict[str, int | None]:
        """Stop every process this group started (SIGTERM, then SIGKILL); their statuses."""
        statuses: dict[str, int | None] = {}
        for process in [*self.others, *(n.process for n in self.nodes.values())]:
            if process.process is not None:
                statuses[process.name] = process.stop()
        return statuses

    def print_logs(self) -> None:
        whole = os.environ.get("PAXFS_TEST_KEEP_LOGS") == "1"
        for process in [*(n.process for n in self.nodes.values()), *self.others]:
            text = process.log_text()
            if text:
                shown = text if whole else text[-LOG_TAIL_CHARS:]
                print(f"---- {process.name} (pid {process.pid}) log:\n{shown}")

    # ---- admin RPCs -----------------------------------------------------------------

    def addresses(self) -> list[Address]:
        """Every address a client may try (founders first)."""
        return [n.address for n in self.nodes.values()]

    async def admin_call(self, node_id: int, method: Any, request: Any) -> Any:
        """Call an admin ``method`` on metaserver ``node_id`` itself (no redirects)."""
        async with open_connection(
            self.nodes[node_id].address, self.key, name="test-admin"
        ) as connection:
            return await connection.call(method, request, timeout_s=ADMIN_CALL_TIMEOUT_S)

    async def status(self, node_id: int) -> GroupStatusReply | None:
        """``node_id``'s view of the group, or None when it does not answer."""
        try:
            reply: GroupStatusReply = await self.admin_call(
                node_id, GROUP_STATUS, GroupStatusRequest()
            )
        except (RpcError, OSError):
            return None
        return reply

    async def digest(self, node_id: int) -> DigestReply:
        reply: DigestReply = await self.admin_call(node_id, STATE_DIGEST, DigestRequest())
        return reply

    async def wait_for_leader(
        self, timeout_s: float = LEADER_TIMEOUT_S, among: list[int] | None = None
    ) -> int:
        """The id of a leader that a majority of the running replicas (or ``among``) follow
        and that reports itself leading; fails after ``timeout_s``."""
        candidates = among or self.running()
        with trio.move_on_after(timeout_s):
            while True:
                statuses = [await self.status(i) for i in candidates]
                views = [s for s in statuses if s is not None]
                leaders = {s.node_id for s in views if s.role == "leader"}
                for leader in leaders:
                    followers = sum(1 for s in views if s.leader_id == leader)
                    if followers * 2 > len(candidates):
                        return leader
                await trio.sleep(0.05)
        raise AssertionError(f"no leader among {candidates} within {timeout_s} s")

    async def wait_applied(self, node_ids: list[int], index: int, timeout_s: float = 20) -> None:
        """Wait until every replica in ``node_ids`` applied the log up to ``index``."""
        with trio.move_on_after(timeout_s):
            while True:
                statuses = [await self.status(i) for i in node_ids]
                if all(s is not None and s.applied_index >= index for s in statuses):
                    return
                await trio.sleep(0.05)
        raise AssertionError(f"replicas {node_ids} did not apply up to {index} in {timeout_s} s")

    async def wait_equal_digests(
        self, node_ids: list[int], timeout_s: float = 20
    ) -> dict[int, DigestReply]:
        """Wait until every replica in ``node_ids`` reports the same applied index and the
        same state digest (the group must be idle); those digests."""
        digests: dict[int, DigestReply] = {}
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    digests = {i: await self.digest(i) for i in node_ids}
                except (RpcError, OSError):
                    digests = {}
                values = {(d.applied_index, d.digest) for d in digests.values()}
                if len(digests) == len(node_ids) and len(values) == 1:
                    return digests
                await trio.sleep(0.1)
        raise AssertionError(f"digests never matched: {digests}")

    @asynccontextmanager
    async def client(self, **options: Any) -> AsyncIterator[MetaClient]:
        """A :class:`MetaClient` on this group (``options`` go to ``open_meta_client``)."""
        async with open_meta_client(self.addresses(), self.key, **options) as client:
            yield client


@asynccontextmanager
async def metaserver_group(
    tmp_path: Path,
    count: int = 3,
    *,
    settings: Mapping[str, Any] | None = None,
    extra_tables: Mapping[str, Mapping[str, Any]] | None = None,
    wait_for_leader: bool = True,
    prepare: Callable[[MetaserverGroup], Awaitable[None]] | None = None,
) -> AsyncIterator[MetaserverGroup]:
    """Start ``count`` founding metaservers (and wait for a leader); stop them on exit.

    ``prepare`` runs before the first start (per-node configs, proxies...); ``settings``
    default to :data:`FAST_ELECTIONS`.
    """
    group = MetaserverGroup(
        tmp_path,
        count,
        settings=FAST_ELECTIONS if settings is None else settings,
        extra_tables=extra_tables,
    )
    try:
        if prepare is not None:
            await prepare(group)
        for node_id in list(group.nodes):
            group.start(node_id)
        if wait_for_leader:
            await group.wait_for_leader()
        yield group
    finally:
        group.stop_all()
        group.print_logs()


# ---- a namespace workload with a checkable history ------------------------------------


def seed_for(name: str) -> int:
    """A randomised test's seed: ``PAXFS_SEED`` if set, else fresh; printed for replay."""
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"{name}: seed {seed} (replay with PAXFS_SEED={seed})")
    return seed


def _name_step(state: int | None, op: tuple[Any, ...]) -> tuple[int | None, Any]:
    """One name in the root directory: absent (None) or a file with permission bits."""
    kind = op[0]
    if kind == "mknod":
        return (op[2], "ok") if state is None else (state, "exists")
    if kind == "unlink":
        return (None, "enoent") if state is None else (None, "ok")
    if kind == "lookup":
        return state, state
    raise ValueError(f"unknown operation {op!r}")


NAME_MODEL: Model[Any] = Model(
    init=lambda: None, step=_name_step, partition=lambda op: op[1], name="root names"
)
"""Sequential specification of :class:`NamespaceWorkload`'s keyed operations."""

MODES = (0o600, 0o640, 0o644, 0o664, 0o700)


class NamespaceWorkload:
    """Tasks that mutate and read a few names in the root directory through ``clients``.

    Keyed operations (``mknod``, ``unlink``, ``lookup`` of ``k0..k{keys-1}``) go into
    :attr:`history`; every ``tasks_per_client``-th operation instead creates a fresh name
    ``u<seed>-<n>`` that is never removed; acknowledged ones go into :attr:`acked_names`.
    An operation that fails is recorded with an unknown outcome and its error kept in
    :attr:`errors` (a normal failover must leave it empty).
    """

    def __init__(self, clients: list[MetaClient], seed: int, keys: int = 6) -> None:
        self.clients = clients
        self.seed = seed
        self.rng = random.Random(seed)
        self.keys = keys
        self.history: list[Operation] = []
        self.acked_names: set[bytes] = set()
        self.errors: list[str] = []
        self.completed_mutations: list[float] = []
        self._next_unique = 0
        self._task_ids = 0

    async def run(self, stop: trio.Event, tasks_per_client: int = 4) -> None:
        """Run until ``stop`` is set (each task finishes its operation in progress)."""
        async with trio.open_nursery() as nursery:
            for client in self.clients:
                for _ in range(tasks_per_client):
                    self._task_ids += 1
                    task_rng = random.Random(self.rng.randrange(1 << 32))
                    nursery.start_soon(self._task, client, self._task_ids, task_rng, stop)

    async def _task(
        self, client: MetaClient, task_id: int, rng: random.Random, stop: trio.Event
    ) -> None:
        while not stop.is_set():
            if rng.random() < 0.2:
                await self._create_unique(client)
            else:
                key = f"k{rng.randrange(self.keys)}".encode()
                kind = rng.choice(("mknod", "mknod", "unlink", "lookup", "lookup"))
                op: tuple[Any, ...] = (
                    (kind, key, rng.choice(MODES))
                    if kind == "mknod"
                    else (
                        kind,
                        key,
                    )
                )
                await self.perform(client, task_id, op)

    async def perform(self, client: MetaClient, task_id: int, op: tuple[Any, ...]) -> Any:
        """Carry out one keyed operation and record it in the history."""
        invoke = trio.current_time()
        try:
            result = await _call(client, op)
        except RpcError as error:
            self.errors.append(f"{op!r}: {error}")
            self.history.append(Operation(task_id, invoke, None, op))
            return None
        complete = trio.current_time()
        if op[0] != "lookup":
            self.completed_mutations.append(complete)
        self.history.append(Operation(task_id, invoke, complete, op, result))
        return result

    async def _create_unique(self, client: MetaClient) -> None:
        name = f"u{self.seed:x}-{self._next_unique}".encode()
        self._next_unique += 1
        try:
            await client.mutate(Mknod(ROOT_INODE, name, 0o644))
        except RpcError as error:
            self.errors.append(f"create {name!r}: {error}")
            return
        self.completed_mutations.append(trio.current_time())
        self.acked_names.add(name)

    async def verify(self, client: MetaClient) -> CheckResult:
        """Read every key and every acknowledged name back (into the history), then check
        the history; fails if an acknowledged name is missing."""
        for key in range(self.keys):
            await self.perform(client, 0, ("lookup", f"k{key}".encode()))
        missing = []
        for name in sorted(self.acked_names):
            try:
                await client.query(Lookup(ROOT_INODE, name))
            except RpcError as error:
                if error.code != errno.ENOENT:
                    raise
                missing.append(name)
        assert not missing, f"acknowledged creates lost: {missing}"
        result = check(self.history, NAME_MODEL)
        assert result.ok is True, result.explanation
        return result


async def _call(client: MetaClient, op: tuple[Any, ...]) -> Any:
    kind, name = op[0], op[1]
    try:
        if kind == "mknod":
            await client.mutate(Mknod(ROOT_INODE, name, op[2]))
            return "ok"
        if kind == "unlink":
            await client.mutate(Unlink(ROOT_INODE, name))
            return "ok"
        reply: EntryReply = await client.query(Lookup(ROOT_INODE, name))
        return reply.attr.mode & 0o7777
    except RpcError as error:
        if kind == "mknod" and error.code == errno.EEXIST:
            return "exists"
        if error.code == errno.ENOENT:
            return "enoent" if kind == "unlink" else None
        raise
