"""The metaserver client library against scripted servers on loopback.

Each fake metaserver answers from a script (redirect, busy, drop the connection, serve),
so the client's failover behaviour is checked without a real group: it follows
redirects, retries the *same* request (same client id and sequence number), keeps a
busy leader, does not spin on a redirect loop, and gives up with ETIMEDOUT only after
``no_quorum_timeout_s``.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio

from fuse_client.meta_client import MetaClient, open_meta_client
from wire.address import Address
from wire.errors import NOT_LEADER, RpcError
from wire.ids import ROOT_INODE, ClientId, InodeId
from wire.namespace_ops import (
    CLOSE_SESSION,
    KEEP_ALIVE,
    LOOKUP,
    MKNOD,
    OPEN_SESSION,
    Attr,
    EntryReply,
    Lookup,
    MadeReply,
    Mknod,
    MutationCall,
    OkReply,
    SessionReply,
)
from wire.rpc import CallContext, Handlers
from wire.transport import bound_port, serve

KEY = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
ATTR = Attr(InodeId(7), 1, 0o100644, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3, False)

Script = Callable[["FakeMetaserver", Any, CallContext], Any]


@dataclass
class FakeMetaserver:
    """Answers namespace calls with ``script``; records every request it sees."""

    script: Script
    address: Address = Address("127.0.0.1", 0)
    requests: list[Any] = field(default_factory=list)
    connections: set[int] = field(default_factory=set)

    def handlers(self) -> Handlers:
        handlers = Handlers()

        async def open_session(_request: Any, _context: CallContext) -> SessionReply:
            return SessionReply(ClientId(42), 60 * 10**9)

        async def ok(_request: Any, _context: CallContext) -> OkReply:
            return OkReply()

        async def namespace_call(request: Any, context: CallContext) -> Any:
            self.requests.append(request)
            self.connections.add(id(context.connection))
            return await self.script(self, request, context)

        handlers.register(OPEN_SESSION, open_session)
        handlers.register(KEEP_ALIVE, ok)
        handlers.register(CLOSE_SESSION, ok)
        handlers.register(MKNOD, namespace_call)
        handlers.register(LOOKUP, namespace_call)
        return handlers


@asynccontextmanager
async def fake_group(*scripts: Script) -> AsyncIterator[list[FakeMetaserver]]:
    servers = [FakeMetaserver(script) for script in scripts]
    async with trio.open_nursery() as nursery:
        for server in servers:
            listeners = await nursery.start(
                partial(serve, server.handlers(), KEY, Address("127.0.0.1", 0))
            )
            server.address = Address("127.0.0.1", bound_port(listeners))
        yield servers
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(servers: list[FakeMetaserver], **options: Any) -> AsyncIterator[MetaClient]:
    async with open_meta_client([s.address for s in servers], KEY, **options) as client:
        yield client


async def serve_entry(_server: FakeMetaserver, request: Any, _context: CallContext) -> Any:
    """What the leader answers a Mknod (with the directory's attributes) or a Lookup."""
    return MadeReply(ATTR, None) if isinstance(request, MutationCall) else EntryReply(ATTR)


def redirect_to(target: Callable[[], FakeMetaserver]) -> Script:
    async def redirect(_server: FakeMetaserver, _request: Any, _context: CallContext) -> Any:
        raise RpcError(NOT_LEADER, str(target().address))

    return redirect


async def test_a_follower_redirects_and_the_client_remembers_the_leader() -> None:
    holder: list[FakeMetaserver] = []
    async with fake_group(redirect_to(lambda: holder[1]), serve_entry) as servers:
        holder.extend(servers)
        async with client_of(servers[:1]) as client:
            reply = await client.mutate(Mknod(ROOT_INODE, b"f", 0o644))
            assert reply == MadeReply(ATTR, None)
            assert client.leader == servers[1].address
            await client.query(Lookup(ROOT_INODE, b"f"))
        assert len(servers[0].requests) == 1, "the second call went straight to the leader"


async def test_a_retried_mutation_keeps_its_client_id_and_sequence_number() -> None:
    attempts: list[MutationCall] = []

    async def drop_the_first(server: FakeMetaserver, request: Any, context: CallContext) -> Any:
        attempts.append(request)
        if len(attempts) == 1:
            await context.connection.aclose()  # the leader died with the request in flight
            await trio.sleep_forever()
        return MadeReply(ATTR, None)

    async with fake_group(drop_the_first) as servers, client_of(servers) as client:
        await client.mutate(Mknod(ROOT_INODE, b"f", 0o644))
        await client.mutate(Mknod(ROOT_INODE, b"g", 0o644))
    first, retry, second = attempts
    assert retry == first
    assert (retry.context.client, retry.context.seq) == (ClientId(42), first.context.seq)
    assert second.context.seq == first.context.seq + 1


async def test_a_busy_leader_is_asked_again_on_the_same_connection() -> None:
    async def busy_twice(server: FakeMetaserver, _request: Any, _context: CallContext) -> Any:
        if len(server.requests) <= 2:
            raise RpcError(errno.EAGAIN, "proposal queue full")
        return MadeReply(ATTR, None)

    async with fake_group(busy_twice) as servers, client_of(servers) as client:
        await client.mutate(Mknod(ROOT_INODE, b"f", 0o644))
    assert len(servers[0].requests) == 3
    assert len(servers[0].connections) == 1
    assert len({request.context.seq for request in servers[0].requests}) == 1


async def test_a_redirect_loop_backs_off_and_ends_in_etimedout() -> None:
    holder: list[FakeMetaserver] = []
    scripts = (redirect_to(lambda: holder[1]), redirect_to(lambda: holder[0]))
    async with fake_group(*scripts) as servers:
        holder.extend(servers)
        async with client_of(servers, session=False, no_quorum_timeout_s=1.0) as client:
            started = trio.current_time()
            with pytest.raises(RpcError) as error:
                await client.query(Lookup(ROOT_INODE, b"f"))
            elapsed = trio.current_time() - started
    assert error.value.code == errno.ETIMEDOUT
    assert "NOT_LEADER" in error.value.message
    assert 0.9 <= elapsed < 3.0
    calls = sum(len(s.requests) for s in servers)
    assert calls < 100, f"{calls} calls in one second: the client spins on redirects"


async def test_no_reachable_metaserver_fails_with_etimedout_after_the_timeout() -> None:
    async with fake_group(serve_entry) as servers:
        pass  # the servers are gone: their ports refuse connections
    async with open_meta_client(
        [servers[0].address], KEY, session=False, no_quorum_timeout_s=0.8
    ) as client:
        started = trio.current_time()
        with pytest.raises(RpcError) as error:
            await client.query(Lookup(ROOT_INODE, b"f"))
    assert error.value.code == errno.ETIMEDOUT
    assert trio.current_time() - started >= 0.8


async def test_a_namespace_error_is_the_callers_at_once() -> None:
    async def no_such_entry(_server: FakeMetaserver, _request: Any, _context: CallContext) -> Any:
        raise RpcError(errno.ENOENT, "No such file or directory")

    async with fake_group(no_such_entry) as servers, client_of(servers) as client:
        with pytest.raises(RpcError) as error:
            await client.query(Lookup(ROOT_INODE, b"missing"))
    assert error.value.code == errno.ENOENT
    assert len(servers[0].requests) == 1


async def test_a_wrong_cluster_key_is_not_retried_as_a_failover() -> None:
    async with fake_group(serve_entry) as servers:
        wrong = bytes(b ^ 1 for b in KEY)
        started = trio.current_time()
        with pytest.raises(RpcError) as error:
            async with open_meta_client([servers[0].address], wrong, session=False) as client:
                await client.query(Lookup(ROOT_INODE, b"f"))
    assert error.value.code == errno.EACCES
    assert trio.current_time() - started < 5.0
