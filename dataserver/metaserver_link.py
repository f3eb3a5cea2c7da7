"""The dataserver's session with the metaserver leader (the client side of wire.cluster_ops).

One task: find the leader (configured metaservers in turn, following ``NOT_LEADER``
redirects, backing off exponentially between rounds), register, send a full chunk report,
then heartbeat every ``heartbeat_interval_s`` with space, load and the incremental report,
carry out the commands the replies bring, and send corrupt-replica findings as soon as
they are made.  A new epoch in a reply (a new leader) or a :class:`SendFullReport` command
triggers a full report; ``ENOENT`` (the leader does not know us) a new registration.
Any other failure ends the session; the next one starts with the leader search.
"""

from __future__ import annotations

import errno
import logging
import secrets
from typing import TYPE_CHECKING

import trio

from dataserver.chunk_store import ChunkStoreError
from wire.address import Address, parse_address
from wire.cluster_ops import (
    FULL_REPORT,
    HEARTBEAT,
    REASON_CHARS_MAX,
    REGISTER,
    REPORT_BATCH_REPLICAS_MAX,
    REPORT_CORRUPT,
    CorruptReplicaRequest,
    DeleteReplica,
    FullReportRequest,
    HeartbeatRequest,
    RegisterRequest,
    ReplicateChunk,
    SendFullReport,
)
from wire.errors import NOT_LEADER, RpcError
from wire.invariant import InvariantViolation, invariant
from wire.rpc import RpcConnection
from wire.transport import open_connection

if TYPE_CHECKING:
    from dataserver.server import Dataserver

log = logging.getLogger("dataserver.link")

CALL_TIMEOUT_S = 10.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
REDIRECTS_MAX = 8
"""Redirects followed in a row before backing off (a leader election may be under way)."""
REPLICATIONS_QUEUED_MAX = 64
"""Replication commands waiting to run; more are dropped (the leader will ask again)."""


class MetaserverLink:
    """Keeps the dataserver known to the current metaserver leader."""

    def __init__(self, server: Dataserver, metaservers: dict[int, Address]) -> None:
        self._server = server
        self._metaservers = [metaservers[i] for i in sorted(metaservers)]
        self._wake = trio.Event()
        self._replications_queued = 0
        self.leader: Address | None = None
        self.epoch: int | None = None
        self.sessions = 0

    def wake(self) -> None:
        """Send the next heartbeat (and pending corrupt reports) now."""
        self._wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await self._run(nursery)

    async def _run(self, nursery: trio.Nursery) -> None:
        backoff_s = BACKOFF_MIN_S
        position = 0
        hint: Address | None = None
        redirects = 0
        last_failure = ""
        while True:
            if hint is not None:
                target, hint = hint, None
            else:
                target = self._metaservers[position % len(self._metaservers)]
                position += 1
            sessions_before = self.sessions
            error = await self._session_error(target, nursery)
            self.leader = None
            if error.code == NOT_LEADER and redirects < REDIRECTS_MAX:
                hint = _leader_hint(error.message, target)
                if hint is not None:
                    redirects += 1
                    continue
            failure = f"metaserver {target}: {error}"
            if failure != last_failure:
                log.warning("%s", failure)
                last_failure = failure
            redirects = 0
            if self.sessions != sessions_before:
                backoff_s = BACKOFF_MIN_S
            await trio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def _session_error(self, address: Address, nursery: trio.Nursery) -> RpcError:
        """Run a session until it fails; return why.

        A connection that dies while we are being cancelled can surface as a group of
        the connection error and ``Cancelled``; then only the cancellation goes on, so
        that a shutdown is never mistaken for (or turned into) a crash."""
        try:
            await self._session(address, nursery)
        except RpcError as error:
            return error
        except BaseExceptionGroup as group:
            errors, others = group.split(RpcError)
            if others is not None:
                raise others from None
            invariant(errors is not None, "an empty exception group")
            assert errors is not None
            leaf: BaseException = errors
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, RpcError)
            return leaf
        raise InvariantViolation("a metaserver session ended without an error")

    async def _session(self, address: Address, nursery: trio.Nursery) -> None:
        server = self._server
        name = f"dataserver-{server.dataserver_id:016x}"
        async with open_connection(address, server.key, name=name) as connection:
            await self._register(connection, address)
            while True:
                await self._report_corrupt(connection)
                removed, added = server.ops.changes.take()
                request = HeartbeatRequest(
                    server.dataserver_id,
                    server.address,
                    server.incarnation,
                    await server.space(),
                    server.active_writes,
                    server.active_reads,
                    removed,
                    added,
                )
                try:
                    reply = await connection.call(HEARTBEAT, request, timeout_s=CALL_TIMEOUT_S)
                except RpcError as error:
                    server.ops.changes.put_back(removed, added)
                    if error.code != errno.ENOENT:
                        raise
                    log.info("leader %s does not know us; registering again", address)
                    await self._register(connection, address)
                    continue
                if reply.epoch != self.epoch:
                    log.info("leader epoch changed to %d; sending a full report", reply.epoch)
                    self.epoch = reply.epoch
                    await self._full_report(connection)
                for command in reply.commands:
                    await self._execute(command, connection, nursery)
                self._wake = trio.Event()
                with trio.move_on_after(server.config.dataserver.heartbeat_interval_s):
                    await self._wake.wait()

    async def _register(self, connection: RpcConnection, address: Address) -> None:
        server = self._server
        reply = await connection.call(
            REGISTER,
            RegisterRequest(
                server.dataserver_id, server.address, server.incarnation, await server.space()
            ),
            timeout_s=CALL_TIMEOUT_S,
        )
        self.leader = address
        self.epoch = reply.epoch
        self.sessions += 1
        log.info("registered with metaserver leader %s (epoch %d)", address, reply.epoch)
        await self._full_report(connection)

    async def _full_report(self, connection: RpcConnection) -> None:
        server = self._server
        replicas = await trio.to_thread.run_sync(server.ops.full_report)
        report_id = secrets.randbits(63)
        batches = [
            replicas[start : start + REPORT_BATCH_REPLICAS_MAX]
            for start in range(0, len(replicas), REPORT_BATCH_REPLICAS_MAX)
        ] or [[]]
        for index, batch in enumerate(batches):
            reply = await connection.call(
                FULL_REPORT,
                FullReportRequest(
                    server.dataserver_id,
                    report_id,
                    index,
                    index == len(batches) - 1,
                    tuple(batch),
                ),
                timeout_s=CALL_TIMEOUT_S,
            )
            self.epoch = reply.epoch
        log.info("full report sent: %d replicas", len(replicas))

    async def _report_corrupt(self, connection: RpcConnection) -> None:
        server = self._server
        findings = server.ops.take_corrupt_findings()
        for position, finding in enumerate(findings):
            request = CorruptReplicaRequest(
                finding.chunk_id,
                finding.version,
                server.dataserver_id,
                server.address,
                finding.reporter,
                finding.reason[:REASON_CHARS_MAX],
            )
            try:
                await connection.call(REPORT_CORRUPT, request, timeout_s=CALL_TIMEOUT_S)
            except RpcError:
                server.ops.put_back_findings(findings[position:])
                raise

    async def _execute(
        self,
        command: DeleteReplica | ReplicateChunk | SendFullReport,
        connection: RpcConnection,
        nursery: trio.Nursery,
    ) -> None:
        server = self._server
        if isinstance(command, DeleteReplica):
            try:
                await trio.to_thread.run_sync(server.ops.delete, command.chunk_id, command.version)
            except (ChunkStoreError, OSError) as error:
                log.error(
                    "cannot delete chunk %#x v%d: %s", command.chunk_id, command.version, error
                )
        elif isinstance(command, SendFullReport):
            await self._full_report(connection)
        elif self._replications_queued >= REPLICATIONS_QUEUED_MAX:
            log.warning(
                "dropping replication of chunk %#x: %d already queued",
                command.chunk_id,
                self._replications_queued,
            )
        else:
            self._replications_queued += 1
            nursery.start_soon(self._replicate, command)

    async def _replicate(self, command: ReplicateChunk) -> None:
        try:
            await self._server.replicate(
                command.chunk_id, command.version, command.source, command.token
            )
        except RpcError as error:
            log.warning(
                "replication of chunk %#x v%d from %s failed: %s",
                command.chunk_id,
                command.version,
                command.source,
                error,
            )
        finally:
            self._replications_queued -= 1


def _leader_hint(message: str, current: Address) -> Address | None:
    if not message:
        return None
    try:
        hint = parse_address(message)
    except ValueError:
        return None
    return None if hint == current else hint
