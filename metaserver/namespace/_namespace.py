"""The namespace state machine: :class:`Namespace`, driven by ``apply`` and ``query``.

How the metaserver drives it:

* Every mutation is a log command (``wire.namespace_ops.Command``) that reached the
  state machine through the Paxos log: ``apply(decode_command(entry))`` on every
  replica, in log order.  ``apply`` is pure and deterministic: equal command sequences
  give equal :meth:`Namespace.digest` and :meth:`Namespace.snapshot` bytes.
* Reads are ``query(op, credentials)`` on the leader, without a log entry; they never
  change anything observable.
* Neither raises for bad input: a failed op returns ``NsError(errno)`` and changes
  nothing.  Commands must be well-typed (as :func:`decode_command` guarantees).

Exactly-once: a :class:`ClientCommand` runs only inside an open session, and its reply
is kept per (client, seq) for the window described by ``RequestContext``; a retry gets
the kept reply and no second effect.  Sessions are renewed by every client command and
by keep-alives, and ended by CloseSession or by a leader-proposed ExpireSessions once
the command time passes ``last seen + session_timeout_ns``; ending a session releases
its opens, which may free unlinked inodes.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from typing import Any

from wire.ids import ROOT_INODE, ClientId
from wire.namespace_ops import (
    CHUNK_PAGE_MAX,
    GROUPS_MAX,
    PROTOCOL_ERRNO,
    REPLY_WINDOW,
    SESSION_EXPIRED_ERRNO,
    SESSIONS_MAX,
    AckDeletions,
    ClientCommand,
    CloseSession,
    Command,
    CommitRecovery,
    CommitWrite,
    Create,
    Credentials,
    ExpireReply,
    ExpireSessions,
    GetAttr,
    GetChunks,
    GetDataserverModes,
    GetDeletions,
    GetXattr,
    KeepAlive,
    Link,
    ListXattr,
    Lookup,
    Mkdir,
    Mknod,
    NsError,
    OkReply,
    Open,
    OpenChunk,
    OpenSession,
    QueryOp,
    ReadDir,
    ReadLink,
    RecoverChunk,
    Release,
    ReleaseMany,
    RemoveXattr,
    Rename,
    Reply,
    Rmdir,
    ScanChunks,
    SessionCommand,
    SessionReply,
    SetAttr,
    SetDataserverMode,
    SetGoal,
    SetXattr,
    StatFs,
    Symlink,
    SystemCommand,
    Unlink,
)

from . import _ops_attrs, _ops_cluster, _ops_data, _ops_tree, _snapshot
from ._check import check_state
from ._nodes import DirNode
from ._state import ID_MAX, INT64_MAX, INT64_MIN, Context, NamespaceConfig, OpError, Session, State

Handler = Callable[[State, Context, Any], Reply]

MUTATIONS: dict[type, Handler] = {
    Mknod: _ops_tree.mknod,
    Create: _ops_tree.create,
    Mkdir: _ops_tree.mkdir,
    Symlink: _ops_tree.symlink,
    Link: _ops_tree.link,
    Unlink: _ops_tree.unlink,
    Rmdir: _ops_tree.rmdir,
    Rename: _ops_tree.rename,
    SetAttr: _ops_attrs.setattr,
    SetXattr: _ops_attrs.setxattr,
    RemoveXattr: _ops_attrs.removexattr,
    SetGoal: _ops_attrs.setgoal,
    Open: _ops_data.open_op,
    Release: _ops_data.release,
    ReleaseMany: _ops_data.release_many,
    OpenChunk: _ops_data.open_chunk,
    CommitWrite: _ops_data.commit_write,
}
QUERIES: dict[type, Handler] = {
    Lookup: _ops_tree.lookup,
    GetAttr: _ops_attrs.getattr_op,
    ReadDir: _ops_tree.readdir,
    ReadLink: _ops_tree.readlink,
    GetXattr: _ops_attrs.getxattr,
    ListXattr: _ops_attrs.listxattr,
    StatFs: _ops_attrs.statfs,
    GetChunks: _ops_data.get_chunks,
    GetDeletions: _ops_data.get_deletions,
    ScanChunks: _ops_data.scan_chunks,
    GetDataserverModes: _ops_cluster.get_dataserver_modes,
}

OK = OkReply()
SESSION_EXPIRED = NsError(SESSION_EXPIRED_ERRNO)
PROTOCOL_VIOLATION = NsError(PROTOCOL_ERRNO)
INVALID = NsError(errno.EINVAL)


def _valid_credentials(cred: Credentials) -> bool:
    return 0 <= cred.uid <= ID_MAX and 0 <= cred.gid <= ID_MAX and len(cred.groups) <= GROUPS_MAX


class Namespace:
    """The POSIX namespace of one paxfs cluster (one replica's copy)."""

    __slots__ = ("_state",)

    def __init__(self, config: NamespaceConfig | None = None) -> None:
        """A namespace holding only the root directory (inode 1) made as ``config`` says."""
        config = config or NamespaceConfig()
        state = State(config)
        ino = state.reserve_ino()
        root = DirNode(
            ino,
            stat.S_IFDIR | config.root_mode,
            config.root_uid,
            config.root_gid,
            config.created_ns,
            config.default_goal,
            config.default_compress,
            None,
        )
        state.register(root)
        assert root.ino == ROOT_INODE
        self._state = state

    @property
    def config(self) -> NamespaceConfig:
        return self._state.config

    # ------------------------------------------------------------ the two entry points

    def apply(self, command: Command) -> Reply:
        """Apply one log command; return its reply (an ``NsError`` on failure)."""
        kind = type(command)
        if not INT64_MIN <= command.time_ns <= INT64_MAX:
            return INVALID
        if kind is ClientCommand:
            return self._apply_client(command)  # type: ignore[arg-type]
        if kind is SessionCommand:
            return self._apply_session(command)  # type: ignore[arg-type]
        if kind is SystemCommand:
            return self._apply_system(command)  # type: ignore[arg-type]
        return INVALID

    def query(self, op: QueryOp, credentials: Credentials) -> Reply:
        """Answer a read-only op from the applied state; changes nothing observable."""
        handler = QUERIES.get(type(op))
        if handler is None or not _valid_credentials(credentials):
            return INVALID
        try:
            return handler(self._state, Context(0, credentials, None), op)
        except OpError as error:
            return NsError(error.code)

    # ------------------------------------------------------------ client commands

    def _apply_client(self, command: ClientCommand) -> Reply:
        call = command.call
        context = call.context
        session = self._state.sessions.get(context.client)
        if session is None:
            return SESSION_EXPIRED
        now = command.time_ns
        if now > session.last_seen_ns:
            session.last_seen_ns = now
        seq = context.seq
        replies = session.replies
        kept = replies.get(seq)
        if kept is not None:
            return kept
        floor = session.floor
        ack = context.ack_seq
        new_floor = ack if ack > floor else floor
        if seq < floor or ack > seq or seq - new_floor >= REPLY_WINDOW:
            return PROTOCOL_VIOLATION
        if new_floor == floor + 1:
            # The common case: one request completed since the last command.
            replies.pop(floor, None)
            session.floor = new_floor
        elif new_floor > floor:
            _forget_replies(session, new_floor)
        handler = MUTATIONS.get(type(call.op))
        credentials = context.credentials
        reply: Reply
        if handler is None or not _valid_credentials(credentials):
            reply = INVALID
        else:
            try:
                reply = handler(self._state, Context(now, credentials, session), call.op)
            except OpError as error:
                reply = NsError(error.code)
        replies[seq] = reply
        return reply

    # ------------------------------------------------------------ session and system commands

    def _apply_session(self, command: SessionCommand) -> Reply:
        state = self._state
        op = command.op
        now = command.time_ns
        if type(op) is OpenSession:
            if len(state.sessions) >= SESSIONS_MAX:
                return NsError(errno.EUSERS)
            client = state.next_client
            state.next_client = client + 1
            state.sessions[client] = Session(client, now)
            return SessionReply(ClientId(client), state.config.session_timeout_ns)
        if type(op) is KeepAlive:
            session = state.sessions.get(op.client)
            if session is None:
                return SESSION_EXPIRED
            if now > session.last_seen_ns:
                session.last_seen_ns = now
            return OK
        if type(op) is CloseSession:
            session = state.sessions.get(op.client)
            if session is not None:
                state.end_session(session)
            return OK
        return INVALID

    def _apply_system(self, command: SystemCommand) -> Reply:
        state = self._state
        op = command.op
        if type(op) is ExpireSessions:
            timeout = state.config.session_timeout_ns
            now = command.time_ns
            expired = sorted(
                client
                for client, session in state.sessions.items()
                if now - session.last_seen_ns >= timeout
            )
            for client in expired:
                state.end_session(state.sessions[client])
            return ExpireReply(tuple(ClientId(client) for client in expired))
        if type(op) is AckDeletions:
            if len(op.entries) > CHUNK_PAGE_MAX:
                return INVALID
            deletions = state.deletions
            for entry in op.entries:
                queued = deletions.get(entry.chunk)
                if queued is not None and queued <= entry.version:
                    del deletions[entry.chunk]
            return OK
        if type(op) is SetDataserverMode:
            return _ops_cluster.set_dataserver_mode(state, command.time_ns, op)
        try:
            if type(op) is RecoverChunk:
                return _ops_data.recover_chunk(state, command.time_ns, op)
            if type(op) is CommitRecovery:
                return _ops_data.commit_recovery(state, op)
        except OpError as error:
            return NsError(error.code)
        return INVALID

    # ------------------------------------------------------------ leader helpers

    def next_session_expiry_ns(self) -> int | None:
        """The earliest time at which an ExpireSessions would end some session (or None):
        the leader proposes one at or after it."""
        sessions = self._state.sessions
        if not sessions:
            return None
        oldest = min(session.last_seen_ns for session in sessions.values())
        return oldest + self._state.config.session_timeout_ns

    # ------------------------------------------------------------ snapshot, digest, checks

    def snapshot(self) -> bytes:
        """The whole state: canonical msgpack compressed with zstd."""
        return _snapshot.snapshot(self._state)

    @classmethod
    def restore(cls, data: bytes) -> Namespace:
        """Load :meth:`snapshot` bytes; raises ``SnapshotError`` (a ValueError) if corrupt."""
        namespace = cls.__new__(cls)
        namespace._state = _snapshot.restore(data)
        return namespace

    def digest(self) -> bytes:
        """BLAKE2b-256 of the canonical state bytes: equal on replicas in equal states."""
        return _snapshot.digest(self._state)

    def verify(self) -> None:
        """Recompute every invariant from scratch (O(n)); raises InvariantViolation."""
        check_state(self._state)


def _forget_replies(session: Session, new_floor: int) -> None:
    """Drop the kept replies below ``new_floor`` (the client has them)."""
    replies = session.replies
    if new_floor - session.floor <= len(replies):
        for seq in range(session.floor, new_floor):
            replies.pop(seq, None)
    else:
        for seq in [seq for seq in replies if seq < new_floor]:
            del replies[seq]
    session.floor = new_floor
