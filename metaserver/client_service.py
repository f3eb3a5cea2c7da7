"""The namespace RPCs a metaserver serves to clients, and the leader's own duties.

Mutations are stamped with the leader's wall-clock time and go through the
Paxos log; the reply is the namespace's answer once the command is applied
here.  Reads are answered from the applied state without a log entry, at once
under the leader's lease, otherwise after a read-index confirmation (leadership
confirmed by a quorum, and the state applied that far).  A follower answers every call with
``RpcError(NOT_LEADER, leader address)``.  A namespace error becomes an RPC
error with the same errno.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from metaserver.namespace import Namespace
from metaserver.replica import Replica
from wire.admin_ops import (
    GROUP_STATUS,
    MEMBERSHIP_CHANGE,
    STATE_DIGEST,
    DigestReply,
    DigestRequest,
    GroupStatusReply,
    GroupStatusRequest,
    MembershipChangeRequest,
    MembershipReply,
    ReplicaStatus,
)
from wire.errors import RpcError
from wire.ids import InodeId
from wire.namespace_ops import (
    METHOD_OF_OP,
    MUTATING_OPS,
    QUERY_OPS,
    SESSION_OPS,
    Attr,
    AttrReply,
    ClientCommand,
    Create,
    Credentials,
    DirsChangedReply,
    EntryReply,
    ExpireSessions,
    GetAttr,
    Link,
    MadeReply,
    Mkdir,
    Mknod,
    MutatingOp,
    MutationCall,
    NsError,
    QueryCall,
    Rename,
    Rmdir,
    SessionCommand,
    Symlink,
    SystemCommand,
    Unlink,
)
from wire.rpc import CallContext, Deferred, Handlers
from wire.schema import Method

log = logging.getLogger(__name__)

SESSION_EXPIRY_CHECK_S = 1.0


def reply_or_raise(reply: Any) -> Any:
    """The namespace's reply, or an RpcError carrying its errno."""
    if isinstance(reply, NsError):
        raise RpcError(reply.errno, os.strerror(reply.errno))
    return reply


def _check_method(method: Method[Any, Any], op: object) -> None:
    if METHOD_OF_OP.get(type(op)) is not method:
        raise RpcError(errno.EPROTO, f"{type(op).__name__} cannot travel as {method.name}")


def changed_dirs(op: MutatingOp) -> tuple[InodeId, ...]:
    """The directories whose entries ``op`` changes (empty for ops that change none)."""
    if isinstance(op, (Mknod, Create, Mkdir, Symlink, Unlink, Rmdir)):
        return (op.parent,)
    if isinstance(op, Link):
        return (op.new_parent,)
    if isinstance(op, Rename):
        if op.old_parent == op.new_parent:
            return (op.old_parent,)
        return (op.old_parent, op.new_parent)
    return ()


def mutation_answer(namespace: Namespace, call: MutationCall, reply: Any) -> Any:
    """The wire reply to ``call``, from the reply the namespace applied it with: for ops
    that change directory entries, plus the changed directories' attributes from
    ``namespace`` (the state the call was applied to, or a later one: any state before
    the answer leaves is as fresh as a GETATTR would be).  Raises an RpcError for an
    :class:`NsError`."""
    reply = reply_or_raise(reply)
    dirs = changed_dirs(call.op)
    if not dirs:
        return reply
    attrs = [_attr_of(namespace, inode, call.context.credentials) for inode in dirs]
    if isinstance(reply, EntryReply):
        return MadeReply(reply.attr, attrs[0])
    return DirsChangedReply(tuple(attr for attr in attrs if attr is not None))


def _attr_of(namespace: Namespace, inode: InodeId, credentials: Credentials) -> Attr | None:
    reply = namespace.query(GetAttr(inode), credentials)
    return reply.attr if isinstance(reply, AttrReply) else None


def _mutation_handler(
    replica: Replica, method: Method[Any, Any]
) -> Callable[[MutationCall, CallContext], Deferred]:
    def handle(call: MutationCall, _context: CallContext) -> Deferred:
        _check_method(method, call.op)
        if not replica.is_leader:
            raise replica.not_leader()
        return replica.submit_deferred(
            ClientCommand(time.time_ns(), call),
            lambda reply: mutation_answer(replica.namespace, call, reply),
        )

    return handle


def _query_handler(
    replica: Replica, method: Method[Any, Any]
) -> Callable[[QueryCall, CallContext], Deferred]:
    def handle(call: QueryCall, _context: CallContext) -> Deferred:
        _check_method(method, call.op)
        # The query runs when the read is confirmed (at once under a lease).
        return replica.read_deferred(
            lambda _: reply_or_raise(replica.namespace.query(call.op, call.credentials))
        )

    return handle


def _session_handler(replica: Replica) -> Callable[[Any, CallContext], Deferred]:
    def handle(op: Any, _context: CallContext) -> Deferred:
        if not replica.is_leader:
            raise replica.not_leader()
        return replica.submit_deferred(SessionCommand(time.time_ns(), op), reply_or_raise)

    return handle


def register_namespace_handlers(handlers: Handlers, replica: Replica) -> None:
    """Serve every namespace method of :mod:`wire.namespace_ops` from ``replica``.

    They are the hottest calls of the cluster, so they are immediate handlers: each
    call proposes or starts its read and replies when the driver settles it, with no
    task of its own."""
    for op_type, method in METHOD_OF_OP.items():
        if op_type in MUTATING_OPS:
            handlers.register_immediate(method, _mutation_handler(replica, method))
        elif op_type in QUERY_OPS:
            handlers.register_immediate(method, _query_handler(replica, method))
        elif op_type in SESSION_OPS:
            handlers.register_immediate(method, _session_handler(replica))


def register_admin_handlers(handlers: Handlers, replica: Replica) -> None:
    """Group status, state digests and membership changes for the admin tools and tests."""

    async def group_status(_request: GroupStatusRequest, _context: CallContext) -> GroupStatusReply:
        status = replica.node.status()
        now_ms = replica.now_ms()
        addresses = replica.addresses()
        leader = status.leader_id
        replicas = tuple(
            ReplicaStatus(
                node_id=peer.node,
                address=addresses.get(peer.node, "?"),
                voter=peer.voter,
                match_index=peer.match_index,
                lag_slots=max(0, status.commit_index - peer.match_index),
                last_contact_ms_ago=(
                    None if peer.last_contact_ms is None else now_ms - peer.last_contact_ms
                ),
            )
            for peer in status.peers
        )
        ballot = status.leader_ballot or status.promised
        membership = status.membership
        return GroupStatusReply(
            node_id=status.node_id,
            role=status.role.name.lower(),
            leader_id=leader,
            leader_address="" if leader is None else addresses.get(leader, "?"),
            ballot=str(ballot),
            commit_index=status.commit_index,
            applied_index=replica.applied_index,
            snapshot_index=status.snapshot_index,
            log_first_slot=status.log_first_slot,
            log_last_slot=status.log_last_slot,
            applied_commands=replica.applied_commands,
            replicas=replicas,
            voters=() if membership is None else tuple(membership.voters),
            learners=() if membership is None else tuple(membership.learners),
            retired=() if membership is None else tuple(membership.retired),
            addresses=replica.member_addresses(),
        )

    async def state_digest(_request: DigestRequest, _context: CallContext) -> DigestReply:
        namespace, applied = replica.namespace, replica.applied_index
        return DigestReply(applied, namespace.digest())

    async def membership_change(
        request: MembershipChangeRequest, _context: CallContext
    ) -> MembershipReply:
        if not replica.is_leader:
            raise replica.not_leader()
        return await replica.change_membership(request)

    handlers.register(GROUP_STATUS, group_status)
    handlers.register(STATE_DIGEST, state_digest)
    handlers.register(MEMBERSHIP_CHANGE, membership_change)


async def expire_sessions_while_leader(replica: Replica) -> None:
    """As leader, propose session expiry whenever a session's deadline has passed."""
    while True:
        await trio.sleep(SESSION_EXPIRY_CHECK_S)
        if not replica.is_leader:
            continue
        due_ns = replica.namespace.next_session_expiry_ns()
        now_ns = time.time_ns()
        if due_ns is None or due_ns > now_ns:
            continue
        try:
            await replica.submit(SystemCommand(now_ns, ExpireSessions()))
        except RpcError as error:
            log.debug("session expiry not proposed: %s", error)
