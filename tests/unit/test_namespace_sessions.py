"""Exactly-once execution and client sessions."""

from __future__ import annotations

import errno

import pytest

from wire.ids import ROOT_INODE, ClientId, InodeId, SequenceNumber
from wire.namespace_ops import (
    PROTOCOL_ERRNO,
    REPLY_WINDOW,
    SESSION_EXPIRED_ERRNO,
    ClientCommand,
    CloseSession,
    Create,
    Credentials,
    ExpireReply,
    ExpireSessions,
    GetAttr,
    KeepAlive,
    Mkdir,
    Mknod,
    MutationCall,
    NsError,
    OkReply,
    OpenSession,
    Rename,
    RequestContext,
    SessionCommand,
    SessionReply,
    SetAttr,
    StatFs,
    SystemCommand,
    Unlink,
)

from .test_namespace_support import ROOT, Client

ROOT_DIR = InodeId(ROOT_INODE)


@pytest.fixture
def c() -> Client:
    return Client()


def command(c: Client, seq: int, ack: int, op: object, time_ns: int | None = None) -> ClientCommand:
    context = RequestContext(c.client, SequenceNumber(seq), SequenceNumber(ack), ROOT)
    return ClientCommand(c.tick() if time_ns is None else time_ns, MutationCall(context, op))


def test_a_retried_create_returns_the_original_reply_not_eexist(c: Client) -> None:
    cmd = c.command(Create(ROOT_DIR, b"f", 0o644, True))
    first = c.ns.apply(cmd)
    again = c.ns.apply(cmd)
    assert again == first and not isinstance(again, NsError)
    assert c.qok(StatFs()).files == 1


def test_a_retried_rename_returns_success_not_enoent(c: Client) -> None:
    c.mknod(b"a")
    cmd = c.command(Rename(ROOT_DIR, b"a", ROOT_DIR, b"b"))
    assert c.ns.apply(cmd) == OkReply()
    assert c.ns.apply(cmd) == OkReply()
    assert c.names() == {b"b"}


def test_a_retried_failure_returns_the_same_errno(c: Client) -> None:
    cmd = command(c, 1, 1, Unlink(ROOT_DIR, b"missing"))
    assert c.ns.apply(cmd) == NsError(errno.ENOENT)
    c.ns.apply(command(c, 2, 1, Mknod(ROOT_DIR, b"missing", 0o644)))
    assert c.ns.apply(cmd) == NsError(errno.ENOENT)
    assert c.names() == {b"missing"}


def test_a_retry_has_no_second_effect_on_times(c: Client) -> None:
    f = c.mknod(b"f")
    cmd = c.command(SetAttr(f, mtime_now=True, atime_now=True))
    c.ns.apply(cmd)
    before = c.attr(f)
    c.tick()
    c.ns.apply(cmd)
    assert c.attr(f) == before


def test_concurrent_requests_may_arrive_out_of_order(c: Client) -> None:
    first = command(c, 1, 1, Mkdir(ROOT_DIR, b"one", 0o755))
    second = command(c, 2, 1, Mkdir(ROOT_DIR, b"two", 0o755))
    third = command(c, 3, 1, Mkdir(ROOT_DIR, b"three", 0o755))
    replies = [c.ns.apply(x) for x in (third, first, second)]
    assert not any(isinstance(r, NsError) for r in replies)
    assert [c.ns.apply(x) for x in (third, first, second)] == replies
    assert c.names() == {b"one", b"two", b"three"}


def test_replies_below_the_acknowledged_seq_are_forgotten_and_retries_refused(
    c: Client,
) -> None:
    cmd = command(c, 1, 1, Mkdir(ROOT_DIR, b"d", 0o755))
    c.ns.apply(cmd)
    c.ns.apply(command(c, 2, 2, Mkdir(ROOT_DIR, b"e", 0o755)))
    assert c.ns.apply(cmd) == NsError(PROTOCOL_ERRNO)
    assert c.names() == {b"d", b"e"}


def test_an_ack_beyond_the_request_itself_is_a_protocol_error(c: Client) -> None:
    assert c.ns.apply(command(c, 5, 6, Mkdir(ROOT_DIR, b"d", 0o755))) == NsError(PROTOCOL_ERRNO)
    assert c.names() == set()


def test_the_reply_window_bounds_requests_in_flight(c: Client) -> None:
    for seq in range(REPLY_WINDOW):
        reply = c.ns.apply(command(c, seq, 0, Mkdir(ROOT_DIR, b"%d" % seq, 0o755)))
        assert not isinstance(reply, NsError)
    beyond = command(c, REPLY_WINDOW, 0, Mkdir(ROOT_DIR, b"x", 0o755))
    assert c.ns.apply(beyond) == NsError(PROTOCOL_ERRNO)
    assert b"x" not in c.names()
    moved_on = command(c, REPLY_WINDOW, 1, Mkdir(ROOT_DIR, b"x", 0o755))
    assert not isinstance(c.ns.apply(moved_on), NsError)
    c.ns.verify()


def test_a_command_without_a_session_is_refused(c: Client) -> None:
    stranger = RequestContext(ClientId(999), SequenceNumber(1), SequenceNumber(1), ROOT)
    cmd = ClientCommand(c.tick(), MutationCall(stranger, Mkdir(ROOT_DIR, b"d", 0o755)))
    assert c.ns.apply(cmd) == NsError(SESSION_EXPIRED_ERRNO)
    assert c.names() == set()


def test_sessions_get_distinct_ids(c: Client) -> None:
    replies = [c.ns.apply(SessionCommand(c.tick(), OpenSession())) for _ in range(3)]
    assert all(isinstance(r, SessionReply) for r in replies)
    assert len({r.client for r in replies} | {c.client}) == 4  # type: ignore[union-attr]


def test_a_session_not_kept_alive_expires_and_its_opens_are_released(c: Client) -> None:
    f = c.create(b"f")
    c.write(f, 0, 4)
    c.ok(Unlink(ROOT_DIR, b"f"))
    timeout = c.ns.config.session_timeout_ns
    assert c.ns.next_session_expiry_ns() == c.now_ns + timeout
    early = c.ns.apply(SystemCommand(c.now_ns + timeout - 1, ExpireSessions()))
    assert early == ExpireReply(())
    late = c.ns.apply(SystemCommand(c.now_ns + timeout, ExpireSessions()))
    assert late == ExpireReply((c.client,))
    assert c.qerr(GetAttr(f)) == errno.ENOENT
    assert c.qok(StatFs()).deletion_queue == 1
    assert c.run(Mkdir(ROOT_DIR, b"d", 0o755)) == NsError(SESSION_EXPIRED_ERRNO)


def test_keep_alive_and_client_commands_postpone_expiry(c: Client) -> None:
    timeout = c.ns.config.session_timeout_ns
    start = c.now_ns
    c.ns.apply(SessionCommand(start + timeout // 2, KeepAlive(c.client)))
    assert c.ns.apply(SystemCommand(start + timeout, ExpireSessions())) == ExpireReply(())
    c.ns.apply(command(c, 1, 1, Mkdir(ROOT_DIR, b"d", 0o755), start + timeout))
    assert c.ns.apply(SystemCommand(start + timeout * 3 // 2, ExpireSessions())) == ExpireReply(())
    assert c.ns.apply(SystemCommand(start + 2 * timeout, ExpireSessions())) == ExpireReply(
        (c.client,)
    )


def test_keep_alive_of_an_unknown_session_says_expired(c: Client) -> None:
    reply = c.ns.apply(SessionCommand(c.tick(), KeepAlive(ClientId(424242))))
    assert reply == NsError(SESSION_EXPIRED_ERRNO)


def test_close_releases_opens_and_is_idempotent(c: Client) -> None:
    f = c.create(b"f")
    c.ok(Unlink(ROOT_DIR, b"f"))
    assert c.ns.apply(SessionCommand(c.tick(), CloseSession(c.client))) == OkReply()
    assert c.ns.apply(SessionCommand(c.tick(), CloseSession(c.client))) == OkReply()
    assert c.qerr(GetAttr(f)) == errno.ENOENT
    assert c.qok(StatFs()).sessions == 0
    assert c.ns.next_session_expiry_ns() is None


def test_expiry_of_many_sessions_is_in_client_order(c: Client) -> None:
    others = [Client(c.ns) for _ in range(3)]
    late = c.now_ns + 10 * c.ns.config.session_timeout_ns
    for other in others:
        late = max(late, other.now_ns + 10 * c.ns.config.session_timeout_ns)
    reply = c.ns.apply(SystemCommand(late, ExpireSessions()))
    assert isinstance(reply, ExpireReply)
    assert list(reply.expired) == sorted(reply.expired) and len(reply.expired) == 4


def test_a_command_time_outside_int64_is_einval(c: Client) -> None:
    reply = c.ns.apply(command(c, 1, 1, Mkdir(ROOT_DIR, b"d", 0o755), 2**63))
    assert reply == NsError(errno.EINVAL)


def test_bad_credentials_are_einval(c: Client) -> None:
    bad = Credentials(-1, 0, ())
    assert c.err(Mkdir(ROOT_DIR, b"d", 0o755), bad) == errno.EINVAL
    assert c.qerr(StatFs(), bad) == errno.EINVAL
