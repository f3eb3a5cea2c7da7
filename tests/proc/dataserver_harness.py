"""Real dataserver processes on loopback, and a stand-in for the metaserver leader.

The stand-in (:class:`FakeMetaserver`) is the one place a fake is used: the real
metaserver group is built in parallel.  It serves the methods of ``wire.cluster_ops``,
records registrations, heartbeats, reports and corrupt-replica reports, keeps replica
locations from the reports (soft state, as the cluster manager does), queues commands for
heartbeat replies, and hands out placements and tokens signed with the cluster key.

Dataservers run as ``python -m dataserver.server -c FILE`` with their own data directory
under the test's ``tmp_path``; every process started is stopped (SIGTERM, then SIGKILL) by
PID when the block ends, also on failure.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from fuse_client.chunk_io import ChunkPlacement, DataserverPool, survivors_of
from wire.address import Address
from wire.cluster_ops import (
    FULL_REPORT,
    HEARTBEAT,
    REGISTER,
    REPORT_CORRUPT,
    Ack,
    Command,
    CorruptReplicaRequest,
    FullReportReply,
    FullReportRequest,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterReply,
    RegisterRequest,
    ReplicaReport,
)
from wire.dataserver_ops import CHUNK_INFO, READ, ChunkInfoReply, ChunkInfoRequest, ReadRequest
from wire.errors import RpcError
from wire.ids import ChunkId, ChunkVersion, DataserverId
from wire.rpc import CallContext, Handlers
from wire.tokens import AccessMode, ChunkToken, sign_token
from wire.transport import bound_port, serve

KEY = bytes.fromhex("5f3c9a0e1b2d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f67")
CHUNK_SIZE_BYTES = 256 * 1024
PROCESS_START_TIMEOUT_S = 30.0
PROCESS_STOP_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` every 20 ms until true; fail naming ``what`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class FakeMetaserver:
    """Plays the metaserver leader towards dataservers and the chunk allocator of a file."""

    key: bytes = KEY
    replication: int = 3
    epoch: int = 1
    registrations: dict[DataserverId, RegisterRequest] = field(default_factory=dict)
    heartbeats: dict[DataserverId, HeartbeatRequest] = field(default_factory=dict)
    heartbeat_count: int = 0
    full_reports: dict[DataserverId, int] = field(default_factory=dict)
    replicas: dict[DataserverId, dict[ChunkId, ReplicaReport]] = field(default_factory=dict)
    corrupt_reports: list[CorruptReplicaRequest] = field(default_factory=list)
    commands: dict[DataserverId, list[Command]] = field(default_factory=dict)
    unknown: set[DataserverId] = field(default_factory=set)
    placement_order: list[str] | None = None
    _batches: dict[tuple[DataserverId, int], list[ReplicaReport]] = field(default_factory=dict)
    _chunk_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(0x1000))
    _versions: dict[ChunkId, int] = field(default_factory=dict)
    _rotation: itertools.count[int] = field(default_factory=itertools.count)

    # ---- the cluster protocol ------------------------------------------------------------

    def handlers(self) -> Handlers:
        handlers = Handlers()
        handlers.register(REGISTER, self._register)
        handlers.register(HEARTBEAT, self._heartbeat)
        handlers.register(FULL_REPORT, self._full_report)
        handlers.register(REPORT_CORRUPT, self._report_corrupt)
        return handlers

    async def _register(self, request: RegisterRequest, _context: CallContext) -> RegisterReply:
        self.registrations[request.dataserver_id] = request
        self.unknown.discard(request.dataserver_id)
        return RegisterReply(self.epoch)

    async def _heartbeat(self, request: HeartbeatRequest, _context: CallContext) -> HeartbeatReply:
        if request.dataserver_id in self.unknown:
            import errno

            raise RpcError(errno.ENOENT, "unknown dataserver")
        self.heartbeats[request.dataserver_id] = request
        self.heartbeat_count += 1
        known = self.replicas.setdefault(request.dataserver_id, {})
        for key in request.removed:
            stored = known.get(key.chunk_id)
            if stored is not None and stored.version == key.version:
                del known[key.chunk_id]
        for report in request.added:
            known[report.chunk_id] = report
        commands = tuple(self.commands.pop(request.dataserver_id, []))
        return HeartbeatReply(self.epoch, commands)

    async def _full_report(
        self, request: FullReportRequest, _context: CallContext
    ) -> FullReportReply:
        key = (request.dataserver_id, request.report_id)
        self._batches.setdefault(key, []).extend(request.replicas)
        if request.final:
            batch = self._batches.pop(key)
            self.replicas[request.dataserver_id] = {r.chunk_id: r for r in batch}
            self.full_reports[request.dataserver_id] = (
                self.full_reports.get(request.dataserver_id, 0) + 1
            )
        return FullReportReply(self.epoch)

    async def _report_corrupt(self, request: CorruptReplicaRequest, _context: CallContext) -> Ack:
        self.corrupt_reports.append(request)
        return Ack()

    def send(self, dataserver_id: DataserverId, command: Command) -> None:
        """Queue ``command`` for the next heartbeat reply to that dataserver."""
        self.commands.setdefault(dataserver_id, []).append(command)

    # ---- placements and tokens (what the cluster manager and namespace would do) ----------

    def token(self, chunk_id: ChunkId, version: ChunkVersion, mode: AccessMode) -> ChunkToken:
        return sign_token(self.key, chunk_id, version, mode, time.time())

    def live_addresses(self) -> list[str]:
        if self.placement_order is not None:
            return list(self.placement_order)
        return sorted(request.address for request in self.registrations.values())

    def _new_version(self, chunk_id: ChunkId) -> ChunkVersion:
        version = self._versions.get(chunk_id, 0) + 1
        self._versions[chunk_id] = version
        return ChunkVersion(version)

    async def allocate(self, index: int, exclude: tuple[str, ...] = ()) -> ChunkPlacement:
        chunk_id = ChunkId(next(self._chunk_ids))
        version = self._new_version(chunk_id)
        candidates = [a for a in self.live_addresses() if a not in exclude]
        # Rotate the first replica so that chunks spread over the servers.
        shift = next(self._rotation) % max(1, len(candidates))
        candidates = candidates[shift:] + candidates[:shift]
        replicas = tuple(candidates[: self.replication])
        return ChunkPlacement(
            chunk_id, version, None, replicas, self.token(chunk_id, version, AccessMode.WRITE)
        )

    async def open_for_write(self, index: int, current: ChunkPlacement) -> ChunkPlacement:
        return self._derive(current, current.replicas)

    async def renew(
        self, index: int, current: ChunkPlacement, failed: tuple[str, ...]
    ) -> ChunkPlacement:
        return self._derive(current, survivors_of(current, failed))

    def _derive(self, current: ChunkPlacement, replicas: tuple[str, ...]) -> ChunkPlacement:
        version = self._new_version(current.chunk_id)
        return ChunkPlacement(
            current.chunk_id,
            version,
            current.version,
            replicas,
            self.token(current.chunk_id, version, AccessMode.WRITE),
            current.compressed,
        )


@dataclass
class DataserverProcess:
    name: str
    data_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    dataserver_id: DataserverId | None = None
    address: str = ""
    incarnation: int | None = None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; the exit status."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def write_config(
    path: Path,
    *,
    metaserver_ports: list[int],
    data_dir: Path,
    capacity_bytes: int = 0,
    listen: str = "127.0.0.1:0",
    chunk_size_bytes: int = CHUNK_SIZE_BYTES,
    heartbeat_interval_s: float = 0.1,
    scrub_rate_mib_s: float = 0.0,
    local_reads: bool = True,
) -> None:
    path.write_text(
        "[cluster]\n"
        f'key = "{KEY.hex()}"\n'
        "metaservers = { "
        + ", ".join(f'{i + 1} = "127.0.0.1:{port}"' for i, port in enumerate(metaserver_ports))
        + " }\n"
        f"chunk_size_bytes = {chunk_size_bytes}\n"
        "[dataserver]\n"
        f'data_dir = "{data_dir}"\n'
        f'listen = "{listen}"\n'
        f"capacity_bytes = {capacity_bytes}\n"
        f"heartbeat_interval_s = {heartbeat_interval_s}\n"
        f"scrub_rate_mib_s = {scrub_rate_mib_s}\n"
        f"local_reads = {'true' if local_reads else 'false'}\n"
    )


def read_identity(data_dir: Path) -> DataserverId | None:
    try:
        text = (data_dir / "DATASERVER").read_text()
    except OSError:
        return None
    return DataserverId(int(text.split("id ")[1].strip(), 16))


@dataclass
class Cluster:
    """A fake metaserver, N dataserver processes, and a client pool, for one test."""

    tmp_path: Path
    meta: FakeMetaserver
    metaserver_port: int
    pool: DataserverPool
    dataservers: list[DataserverProcess] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        *,
        capacity_bytes: int = 0,
        scrub_rate_mib_s: float = 0.0,
        chunk_size_bytes: int = CHUNK_SIZE_BYTES,
        metaserver_ports: list[int] | None = None,
        local_reads: bool = True,
    ) -> DataserverProcess:
        data_dir = self.tmp_path / name
        config_path = self.tmp_path / f"{name}.toml"
        log_path = self.tmp_path / f"{name}.log"
        write_config(
            config_path,
            metaserver_ports=metaserver_ports or [self.metaserver_port],
            data_dir=data_dir,
            capacity_bytes=capacity_bytes,
            scrub_rate_mib_s=scrub_rate_mib_s,
            chunk_size_bytes=chunk_size_bytes,
            local_reads=local_reads,
        )
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "dataserver.server", "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
            )
        server = DataserverProcess(name, data_dir, config_path, log_path, process)
        self.dataservers.append(server)
        return server

    async def started(self, server: DataserverProcess) -> DataserverProcess:
        """Wait until ``server`` registered, reported and sent a heartbeat; learn its id
        and address."""

        def registered() -> bool:
            if server.process.poll() is not None:
                raise AssertionError(f"{server.name} exited:\n{server.log_text()}")
            server.dataserver_id = read_identity(server.data_dir)
            request = self.meta.registrations.get(server.dataserver_id)  # type: ignore[arg-type]
            if request is None or server.dataserver_id is None:
                return False
            if request.incarnation == server.incarnation:
                return False  # the registration of an earlier process
            heartbeat = self.meta.heartbeats.get(server.dataserver_id)
            if heartbeat is None or heartbeat.incarnation != request.incarnation:
                return False  # registered; its full report and first heartbeat are on the way
            server.address = request.address
            server.incarnation = request.incarnation
            return True

        await wait_until(registered, f"{server.name} to register", PROCESS_START_TIMEOUT_S)
        return server

    async def restart(
        self, server: DataserverProcess, *, scrub_rate_mib_s: float = 0.0
    ) -> DataserverProcess:
        """Stop ``server`` (SIGTERM; asserts a clean exit) and start it on the same data."""
        assert server.stop() == 0, server.log_text()
        self.dataservers.remove(server)
        again = self.spawn(server.name, scrub_rate_mib_s=scrub_rate_mib_s)
        again.incarnation = server.incarnation
        return await self.started(again)

    def by_address(self, address: str) -> DataserverProcess:
        return next(s for s in self.dataservers if s.address == address)

    async def replica_bytes(self, address: str, placement: ChunkPlacement) -> bytes:
        """Everything one replica holds, read from that dataserver alone."""
        token = self.meta.token(placement.chunk_id, placement.version, AccessMode.READ)
        request = ReadRequest(placement.chunk_id, placement.version, 0, CHUNK_SIZE_BYTES, token)
        _, payload = await self.pool.call(address, READ, request, timeout_s=10)
        return bytes(payload or b"")

    async def replica_info(self, address: str, placement: ChunkPlacement) -> ChunkInfoReply:
        token = self.meta.token(placement.chunk_id, placement.version, AccessMode.READ)
        request = ChunkInfoRequest(placement.chunk_id, placement.version, token)
        reply, _ = await self.pool.call(address, CHUNK_INFO, request, timeout_s=10)
        return reply

    def stop_all(self) -> None:
        for server in self.dataservers:
            server.stop()


@asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    count: int = 3,
    *,
    replication: int = 3,
    capacities: dict[int, int] | None = None,
    scrub_rate_mib_s: float = 0.0,
) -> AsyncIterator[Cluster]:
    """Start a fake metaserver and ``count`` dataservers; stop them all on the way out.

    ``capacities`` maps a dataserver's position to its ``capacity_bytes``.
    """
    meta = FakeMetaserver(replication=replication)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(serve, meta.handlers(), KEY, Address("127.0.0.1", 0))
        )
        async with DataserverPool.open(KEY, name="test-client") as pool:
            cluster = Cluster(tmp_path, meta, bound_port(listeners), pool)
            try:
                for position in range(count):
                    cluster.spawn(
                        f"ds{position}",
                        capacity_bytes=(capacities or {}).get(position, 0),
                        scrub_rate_mib_s=scrub_rate_mib_s,
                    )
                for server in cluster.dataservers:
                    await cluster.started(server)
                yield cluster
            finally:
                cluster.stop_all()
                for server in cluster.dataservers:
                    tail = server.log_text()[-3000:]
                    print(f"---- {server.name} ({server.address}) log tail:\n{tail}")
            crashed = [
                s.name
                for s in cluster.dataservers
                if s.process.returncode not in (0, -signal.SIGKILL)
            ]
            assert not crashed, f"dataservers did not stop cleanly on SIGTERM: {crashed}"
        nursery.cancel_scope.cancel()
