"""``paxfs metaserver``: one replica of the metaserver group as a process.

Start-up: open (or create) the data directory, recover the newest snapshot and
the log records after it, rebuild the Paxos core and the namespace from them,
then serve on this replica's address from ``[cluster] metaservers``: Paxos
messages from peers, namespace calls from clients, status for admin tools, and
whatever extra handlers the caller registers (the cluster manager).  SIGINT or
SIGTERM stops it cleanly; ``kill -9`` loses nothing acknowledged, because
nothing is acknowledged before its log record is fsynced.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Callable
from pathlib import Path

import trio

from metaserver.client_service import (
    expire_sessions_while_leader,
    register_admin_handlers,
    register_namespace_handlers,
)
from metaserver.codec import PAXOS_DELIVER, cluster_id_from_key, decode_record, decode_snapshot
from metaserver.namespace import Namespace, NamespaceConfig
from metaserver.paxos import NodeId, PaxosNode, PaxosOptions, initial_snapshot_meta
from metaserver.peers import PeerLinks, deliver_handler
from metaserver.replica import Replica, ReplicaOptions
from metaserver.storage import StorageError, open_storage
from wire import schema
from wire.config import Config, ConfigError
from wire.rpc import Handlers
from wire.transport import serve

log = logging.getLogger(__name__)

ExtraServices = Callable[[Replica, Handlers, trio.Nursery], None]


class StartupRefused(Exception):
    """The replica cannot start (bad data directory, corrupt log); one line for the operator."""


def namespace_config(config: Config) -> NamespaceConfig:
    """The namespace settings every replica must share (they come from ``[cluster]``)."""
    return NamespaceConfig(
        chunk_size_bytes=config.cluster.chunk_size_bytes,
        default_goal=config.cluster.replication,
        session_timeout_ns=int(config.metaserver.session_timeout_s * 1e9),
    )


def paxos_options(config: Config) -> PaxosOptions:
    election_ms = config.metaserver.election_timeout_ms
    return PaxosOptions(
        heartbeat_interval_ms=config.metaserver.heartbeat_interval_ms,
        election_timeout_ms=election_ms,
        lease_ms=max(1, min(300, election_ms // 2)),
    )


async def serve_metaserver(
    config: Config,
    extra_services: ExtraServices | None = None,
    task_status: trio.TaskStatus[Replica] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one replica until cancelled."""
    settings = config.metaserver
    addresses = config.metaserver_addresses()
    if settings.id not in addresses:
        raise ConfigError(
            f"{config.source}: [metaserver] id {settings.id} is not in [cluster] metaservers "
            f"({', '.join(map(str, sorted(addresses)))})"
        )
    if not settings.data_dir:
        raise ConfigError(f"{config.source}: [metaserver] data_dir is required")
    key = config.cluster_key()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    address_text = {node: str(address) for node, address in addresses.items()}
    try:
        async with open_storage(settings.data_dir, cluster_id_from_key(key)) as storage:
            recovered = storage.recovered
            voters = tuple(NodeId(n) for n in sorted(addresses))
            try:
                if recovered.snapshot is not None:
                    blob = recovered.snapshot.data
                    meta, namespace_bytes = decode_snapshot(blob)
                    namespace = Namespace.restore(namespace_bytes)
                else:
                    blob = None
                    meta = initial_snapshot_meta(voters)
                    namespace = Namespace(namespace_config(config))
                records = [decode_record(r.payload) for r in recovered.records]
            except schema.SchemaError as error:
                raise StartupRefused(
                    f"data directory {settings.data_dir} holds unreadable state: {error}"
                ) from None
            node = PaxosNode(
                node_id=NodeId(settings.id),
                options=paxos_options(config),
                rng=random.Random(),
                now_ms=Replica.now_ms(),
                snapshot=meta,
                snapshot_size_bytes=len(blob) if blob is not None else 0,
                records=records,
            )
            peers = PeerLinks(settings.id, addresses, key)
            replica = Replica(
                node,
                namespace,
                storage,
                peers.send,
                lambda node_id: address_text.get(node_id, ""),
                ReplicaOptions(snapshot_interval_entries=settings.snapshot_interval_entries),
                blob,
            )
            handlers = Handlers()
            handlers.register(
                PAXOS_DELIVER, deliver_handler(set(addresses) - {settings.id}, replica.deliver)
            )
            register_namespace_handlers(handlers, replica)
            register_admin_handlers(handlers, replica, address_text)
            async with trio.open_nursery() as nursery:
                if extra_services is not None:
                    extra_services(replica, handlers, nursery)
                nursery.start_soon(peers.run)
                nursery.start_soon(replica.run)
                nursery.start_soon(expire_sessions_while_leader, replica)
                await nursery.start(serve, handlers, key, addresses[settings.id])
                log.info(
                    "metaserver %d serving on %s (data in %s, %d records recovered)",
                    settings.id,
                    addresses[settings.id],
                    settings.data_dir,
                    len(records),
                )
                task_status.started(replica)
    except StorageError as error:
        raise StartupRefused(str(error)) from None
    except OSError as error:
        raise StartupRefused(
            f"cannot serve on {addresses[settings.id]}: {error.strerror or error}"
        ) from None


async def _run_until_signalled(config: Config, extra_services: ExtraServices | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_metaserver, config, extra_services)
            async for signum in signals:
                log.info("received %s; stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def run(config: Config, extra_services: ExtraServices | None = None) -> None:
    """Run a metaserver in this process until SIGINT/SIGTERM.

    Raises :class:`StartupRefused` or :class:`~wire.config.ConfigError` with one
    clear line when it cannot start.
    """
    try:
        trio.run(_run_until_signalled, config, extra_services)
    except BaseExceptionGroup as group:
        refusal = group.subgroup((StartupRefused, ConfigError))
        if refusal is not None:
            first = refusal.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise
