"""``paxfs metaserver``: one replica of the metaserver group as a process.

Start-up: open (or create) the data directory, recover the newest snapshot and the
log records after it, rebuild the Paxos core and the namespace from them, then serve
on this replica's address: Paxos messages from peers, namespace calls from clients,
status and membership changes for admin tools, and whatever extra handlers the caller
registers (the cluster manager).  SIGINT or SIGTERM stops it cleanly; ``kill -9``
loses nothing acknowledged, because nothing is acknowledged before its log record is
fsynced.

Founding and joining.  The founding voters are the ids of ``[cluster] metaservers``.
A founding replica whose data directory holds nothing founds the group: it writes the
founding membership as its first snapshot (so it is never recomputed from a config
file that may change later).  A replica added later has a new id, serves on
``--address``, starts with ``--join`` and an empty directory, and waits as a learner
with no state until the leader (told by an admin ``MEMBERSHIP_CHANGE``) sends it a
snapshot.  Ids are never reused.

Before it founds or joins on an empty directory, a replica asks every metaserver it
can find (``IDENTITY_CHECK``) whether it has heard from its id before; if one has,
the replica took part and lost its disk, and it refuses to start: its forgotten
promises and votes could let two values be chosen in one slot.  Replicas that do not
answer within ``IDENTITY_CHECK_TIMEOUT_S`` are skipped, so that a new group can be
founded while one founder is still down (as etcd's ``--initial-cluster-state new``).
"""

from __future__ import annotations

import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from metaserver.client_service import (
    expire_sessions_while_leader,
    register_admin_handlers,
    register_namespace_handlers,
)
from metaserver.codec import (
    PAXOS_DELIVER,
    GroupState,
    HeardFromRecord,
    PaxosBatch,
    cluster_id_from_key,
    decode_record,
    decode_snapshot,
    encode_snapshot,
)
from metaserver.namespace import Namespace, NamespaceConfig, SnapshotError
from metaserver.paxos import (
    NodeId,
    PaxosNode,
    PaxosOptions,
    ReadMode,
    Record,
    SnapshotMeta,
    initial_snapshot_meta,
)
from metaserver.peers import PeerLinks, deliver_handler, peer_name
from metaserver.replica import Replica, ReplicaOptions
from metaserver.storage import MetaStorage, StorageError, StorageOptions, open_storage
from wire import schema
from wire.address import Address, parse_address
from wire.admin_ops import (
    IDENTITY_CHECK,
    IdentityCheckReply,
    IdentityCheckRequest,
)
from wire.config import Config, ConfigError
from wire.errors import RpcError
from wire.rpc import CallContext, Handlers
from wire.transport import open_connection, serve

log = logging.getLogger(__name__)

ExtraServices = Callable[[Replica, Handlers, trio.Nursery], None]

IDENTITY_CHECK_TIMEOUT_S = 3.0
"""How long a replica starting on an empty directory waits for its peers' answers."""
IDENTITY_CHECK_CALL_TIMEOUT_S = 1.0
IDENTITY_CHECK_RETRY_S = 0.2
GIL_SWITCH_INTERVAL_S = 0.0002
"""Longest the log writer thread waits for the GIL held by the event loop."""


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
    """Leader leases serve reads without a round of messages; the lease is at most half
    an election timeout, so that a deposed leader's lease ends before a successor can be
    elected (the core also shortens it by the clock-drift bound)."""
    election_ms = config.metaserver.election_timeout_ms
    return PaxosOptions(
        heartbeat_interval_ms=config.metaserver.heartbeat_interval_ms,
        election_timeout_ms=election_ms,
        read_mode=ReadMode.LEASE,
        lease_ms=max(1, min(300, election_ms // 2)),
    )


def _own_address(config: Config, founders: dict[int, Address]) -> Address:
    settings = config.metaserver
    if settings.id <= 0:
        raise ConfigError(f"{config.source}: [metaserver] id must be a positive integer")
    if settings.join and settings.id in founders:
        raise ConfigError(
            f"{config.source}: metaserver {settings.id} is a founding member "
            "([cluster] metaservers); --join is for a new replica under a new id "
            "(ids are never reused)"
        )
    if settings.address:
        return parse_address(settings.address)
    address = founders.get(settings.id)
    if address is None:
        raise ConfigError(
            f"{config.source}: [metaserver] id {settings.id} is not in [cluster] metaservers "
            f"({', '.join(map(str, sorted(founders)))}); a replica added later needs "
            "--join and --address HOST:PORT"
        )
    return address


async def serve_metaserver(
    config: Config,
    extra_services: ExtraServices | None = None,
    task_status: trio.TaskStatus[Replica] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one replica until cancelled."""
    settings = config.metaserver
    founders = config.metaserver_addresses()
    own_address = _own_address(config, founders)
    if not settings.data_dir:
        raise ConfigError(f"{config.source}: [metaserver] data_dir is required")
    key = config.cluster_key()
    founder = settings.id in founders
    data_dir = Path(settings.data_dir)
    if not founder and not settings.join and not data_dir.exists():
        raise StartupRefused(
            f"{data_dir} does not exist; a new replica starts with --join (metaserver "
            f"{settings.id} is not a founding member)"
        )
    handlers = Handlers()
    holder: list[Replica] = []
    handlers.register(IDENTITY_CHECK, _identity_check_handler(holder))
    handlers.register(PAXOS_DELIVER, _deliver_once_running(holder))
    try:
        # Only a founder or a replica told to join may start on an empty directory, and
        # then only after the identity check below.
        storage_context = open_storage(
            data_dir,
            cluster_id_from_key(key),
            StorageOptions(create_if_empty=founder or settings.join),
        )
        storage = await storage_context.__aenter__()
    except StorageError as error:
        raise StartupRefused(str(error)) from None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(serve, handlers, key, own_address)
            except OSError as error:
                raise StartupRefused(
                    f"cannot serve on {own_address}: {error.strerror or error}"
                ) from None
            recovered = storage.recovered
            founding_blob = None
            if recovered.snapshot is None and not recovered.records:
                await _check_identity(settings.id, founders, key, str(data_dir))
                if founder:
                    founding_blob = await _found(storage, config, founders)
            replica, peers = _build_replica(storage, config, founders, key, founding_blob)
            holder.append(replica)
            register_namespace_handlers(handlers, replica)
            register_admin_handlers(handlers, replica)
            if extra_services is not None:
                extra_services(replica, handlers, nursery)
            nursery.start_soon(peers.run)
            nursery.start_soon(replica.run)
            nursery.start_soon(expire_sessions_while_leader, replica)
            log.info(
                "metaserver %d serving on %s (data in %s, snapshot at slot %d, "
                "%d records recovered)",
                settings.id,
                own_address,
                data_dir,
                replica.node.snapshot_index,
                len(recovered.records),
            )
            task_status.started(replica)
    finally:
        with trio.CancelScope(shield=True):
            await storage_context.__aexit__(None, None, None)


def _deliver_once_running(
    holder: list[Replica],
) -> Callable[[PaxosBatch, CallContext], Awaitable[None]]:
    """The PAXOS_DELIVER handler, served from the start: until the replica exists (during
    recovery and the identity check) batches are dropped -- the senders retransmit --
    rather than refused, which would close their links and log a warning each time."""
    handlers: list[Callable[[PaxosBatch, CallContext], Awaitable[None]]] = []

    async def deliver(batch: PaxosBatch, context: CallContext) -> None:
        if not handlers:
            if not holder:
                return
            replica = holder[0]
            handlers.append(deliver_handler(replica.may_send, replica.deliver))
        await handlers[0](batch, context)

    return deliver


def _identity_check_handler(
    holder: list[Replica],
) -> Callable[[IdentityCheckRequest, CallContext], object]:
    async def identity_check(
        request: IdentityCheckRequest, _context: CallContext
    ) -> IdentityCheckReply:
        if not holder:
            return IdentityCheckReply(request.node_id, False, False, False, ())
        replica = holder[0]
        return IdentityCheckReply(
            node_id=request.node_id,
            has_state=True,
            heard_from=replica.heard_from(request.node_id),
            retired=replica.is_retired(request.node_id),
            addresses=replica.member_addresses(),
        )

    return identity_check


async def _check_identity(
    node_id: int, founders: dict[int, Address], key: bytes, data_dir: str
) -> None:
    """Refuse to start under ``node_id`` if any reachable metaserver heard from it."""
    known = {i: a for i, a in founders.items() if i != node_id}
    answered: set[int] = set()
    deadline = trio.current_time() + IDENTITY_CHECK_TIMEOUT_S
    while True:
        for peer, address in list(known.items()):
            if peer in answered:
                continue
            try:
                reply = await _ask_identity(address, key, node_id)
            except (RpcError, OSError):
                continue
            answered.add(peer)
            if reply.heard_from or reply.retired:
                reason = "has left the group" if reply.retired else "took part in this group"
                raise StartupRefused(
                    f"metaserver {node_id} {reason} before (metaserver {peer} says so) but its "
                    f"data directory {data_dir} is empty: its lost promises and votes could "
                    "corrupt the log. Start a replica under a new id with --join and add it "
                    f"with a membership change (and remove {node_id})"
                )
            for entry in reply.addresses:
                if entry.node_id != node_id and entry.node_id not in known:
                    try:
                        known[entry.node_id] = parse_address(entry.address)
                    except ValueError:
                        continue
        missing = sorted(set(known) - answered)
        if not missing:
            return
        if trio.current_time() >= deadline:
            log.warning(
                "metaservers %s did not answer the identity check; starting without them",
                ", ".join(map(str, missing)),
            )
            return
        await trio.sleep(IDENTITY_CHECK_RETRY_S)


async def _ask_identity(address: Address, key: bytes, node_id: int) -> IdentityCheckReply:
    with trio.fail_after(IDENTITY_CHECK_CALL_TIMEOUT_S * 2):
        async with open_connection(address, key, name=peer_name(node_id)) as connection:
            reply: IdentityCheckReply = await connection.call(
                IDENTITY_CHECK,
                IdentityCheckRequest(node_id),
                timeout_s=IDENTITY_CHECK_CALL_TIMEOUT_S,
            )
            return reply


async def _found(storage: MetaStorage, config: Config, founders: dict[int, Address]) -> bytes:
    """Write the founding membership and the empty namespace as snapshot 0; its blob."""
    meta = initial_snapshot_meta(tuple(NodeId(n) for n in sorted(founders)))
    namespace = Namespace(namespace_config(config))
    blob = encode_snapshot(meta, namespace.snapshot(), GroupState())
    await storage.save_snapshot(0, blob)
    log.info("founded the group with voters %s", ", ".join(map(str, sorted(founders))))
    return blob


def _build_replica(
    storage: MetaStorage,
    config: Config,
    founders: dict[int, Address],
    key: bytes,
    founding_blob: bytes | None,
) -> tuple[Replica, PeerLinks]:
    """The replica as the data directory (or the founding snapshot just written) holds it."""
    settings = config.metaserver
    recovered = storage.recovered
    meta: SnapshotMeta | None = None
    blob = founding_blob if recovered.snapshot is None else recovered.snapshot.data
    group = GroupState()
    namespace = Namespace(namespace_config(config))
    try:
        if blob is not None:
            meta, namespace_bytes, group = decode_snapshot(blob)
            namespace = Namespace.restore(namespace_bytes)
        elif settings.id in founders and recovered.records:
            raise StartupRefused(
                f"data directory {storage.directory} holds log records but no snapshot: "
                "it was not written by a founding replica of this paxfs"
            )
        core_records: list[Record] = []
        heard: set[int] = set()
        for raw in recovered.records:
            record = decode_record(raw.payload)
            if isinstance(record, HeardFromRecord):
                heard.update(record.nodes)
            else:
                core_records.append(record)
    except (schema.SchemaError, SnapshotError) as error:
        raise StartupRefused(
            f"data directory {storage.directory} holds unreadable state: {error}"
        ) from None
    node = PaxosNode(
        node_id=NodeId(settings.id),
        options=paxos_options(config),
        rng=random.Random(),
        now_ms=Replica.now_ms(),
        snapshot=meta,
        snapshot_size_bytes=len(blob) if blob is not None else 0,
        records=core_records,
    )
    peers = PeerLinks(settings.id, founders, key)
    replica = Replica(
        node,
        namespace,
        storage,
        founders=founders,
        group=group,
        heard=heard,
        send_messages=peers.send,
        set_peer_address=peers.set_address,
        options=ReplicaOptions(snapshot_interval_entries=settings.snapshot_interval_entries),
        snapshot_blob=blob,
    )
    return replica, peers


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
    # The log writer thread needs the GIL right after each fsync to report it; with the
    # default 5 ms switch interval a busy event loop could hold every commit that long.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
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
