"""Bad input never raises: Hypothesis throws arbitrary ops, queries, session and system
commands and log bytes at the namespace, alone and mixed into valid command sequences;
every answer is a reply, failures change nothing, invariants hold."""

from __future__ import annotations

import ast
import dataclasses
import enum
import pathlib
import random
import types
import typing
from typing import Any

import hypothesis
import hypothesis.strategies as st
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import metaserver.namespace
from metaserver.namespace import Namespace, NamespaceConfig, decode_command
from wire import schema
from wire.ids import ROOT_INODE, ClientId, InodeId, SequenceNumber
from wire.namespace_ops import (
    MUTATING_OPS,
    QUERY_OPS,
    REPLY_TYPES,
    SESSION_OPS,
    SYSTEM_OPS,
    ClientCommand,
    Command,
    Credentials,
    GetAttr,
    GetChunks,
    GetDeletions,
    ListXattr,
    MutationCall,
    NsError,
    ReadDir,
    ReadLink,
    RequestContext,
    SessionCommand,
    SetXattr,
    StatFs,
    SystemCommand,
)

from .test_namespace_determinism import CONFIG, CommandGenerator
from .test_namespace_support import ALICE, ROOT, SMALL_CHUNK, Client, seed_from_environment, seeded

INTERESTING_INTS = st.one_of(
    st.integers(0, 12),
    st.sampled_from([-1, -(2**63), 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
    st.sampled_from([0o100644, 0o040755, 0o120777, 0o010600, 0o020600, 0o7777, 0o177777]),
    st.integers(-(2**63), 2**64 - 1),
)
INTERESTING_BYTES = st.one_of(
    st.sampled_from([b"", b".", b"..", b"f", b"d", b"a/b", b"\0", b"x" * 256, b"user.a"]),
    st.sampled_from([b"trusted.t", b"system.posix_acl_access", b"user.", b"y" * 70000]),
    st.binary(max_size=300),
)
INTERESTING_TEXT = st.one_of(
    st.sampled_from(["", "127.0.0.1:9", "[::1]:9", "h" * 301, "é" * 151]),
    st.text(max_size=320),
)
CREDENTIALS = st.sampled_from(
    [ROOT, ALICE, Credentials(5, 5, tuple(range(40))), Credentials(-1, 0)]
)


def strategy_for(annotation: Any) -> st.SearchStrategy[Any]:
    """Values for a schema annotation, biased towards edge cases."""
    supertype = getattr(annotation, "__supertype__", None)
    if supertype is not None:
        return strategy_for(supertype)
    if annotation is int:
        return INTERESTING_INTS
    if annotation is bytes:
        return INTERESTING_BYTES
    if annotation is bool:
        return st.booleans()
    if annotation is str:
        return INTERESTING_TEXT
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return st.sampled_from(list(annotation))
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(annotation)}
        return st.builds(annotation, **fields)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args if a is not type(None)] + [st.none()])
    if origin is tuple:
        return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
    raise AssertionError(f"no strategy for {annotation!r}")


def populated() -> Client:
    """A small namespace with one of each kind of inode, data, xattrs and an open file."""
    c = Client(Namespace(NamespaceConfig(chunk_size_bytes=SMALL_CHUNK)))
    d = c.mkdir(b"d", mode=0o1777)
    f = c.create(b"f", d)
    c.write(f, 0, 3 * SMALL_CHUNK)
    c.symlink(b"s", b"target", d)
    c.mknod(b"p", d, mode=0o010600)
    c.ok(SetXattr(f, b"user.a", b"1"))
    return c


def observable(c: Client) -> list[Any]:
    """Everything a client could observe about the tree and the data."""
    seen: list[Any] = [c.qok(StatFs()), c.qok(GetDeletions())]
    for ino in range(ROOT_INODE, 12):
        for op in (GetAttr, ListXattr, ReadLink, GetChunks, ReadDir):
            seen.append(c.query(op(InodeId(ino))))  # type: ignore[call-arg]
    return seen


@seeded
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.one_of([strategy_for(cls) for cls in MUTATING_OPS]), credentials=CREDENTIALS)
def test_any_mutating_op_returns_a_reply_and_a_failure_changes_nothing(
    op: Any, credentials: Credentials
) -> None:
    c = populated()
    before = observable(c)
    reply = c.run(op, credentials)
    assert isinstance(reply, REPLY_TYPES)
    c.ns.verify()
    if isinstance(reply, NsError):
        assert observable(c) == before
    restored = Namespace.restore(c.ns.snapshot())
    assert restored.digest() == c.ns.digest()


@seeded
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.one_of([strategy_for(cls) for cls in QUERY_OPS]), credentials=CREDENTIALS)
def test_any_query_returns_a_reply_and_changes_nothing(op: Any, credentials: Credentials) -> None:
    c = populated()
    digest = c.ns.digest()
    assert isinstance(c.ns.query(op, credentials), REPLY_TYPES)
    assert c.ns.digest() == digest


def session_or_system(time_ns: int, op: Any) -> Command:
    if type(op) in SESSION_OPS:
        return SessionCommand(time_ns, op)
    return SystemCommand(time_ns, op)


SESSION_AND_SYSTEM_OPS = st.one_of([strategy_for(cls) for cls in SESSION_OPS + SYSTEM_OPS])


@seeded
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=SESSION_AND_SYSTEM_OPS, time_ns=INTERESTING_INTS)
def test_any_session_or_system_command_returns_a_reply_and_a_failure_changes_nothing(
    op: Any, time_ns: int
) -> None:
    c = populated()
    digest = c.ns.digest()
    reply = c.ns.apply(session_or_system(time_ns, op))
    assert isinstance(reply, REPLY_TYPES)
    c.ns.verify()
    if isinstance(reply, NsError):
        assert c.ns.digest() == digest
    restored = Namespace.restore(c.ns.snapshot())
    assert restored.digest() == c.ns.digest()


class BadArgumentsInValidSequences(RuleBasedStateMachine):
    """Plausible command sequences (those of the determinism tests) with arbitrary
    commands mixed in: client mutations inside a live session, session and system
    commands, and queries.  Every step answers a reply and leaves a consistent state; a
    failed session/system command or any query changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.namespace = Namespace(CONFIG)
        self.generator = CommandGenerator(random.Random(0))

    @initialize(randomness=st.randoms(use_true_random=False))
    def seed_the_generator(self, randomness: random.Random) -> None:
        self.generator = CommandGenerator(randomness)

    def apply(self, command: Command) -> Any:
        reply = self.namespace.apply(command)
        assert isinstance(reply, REPLY_TYPES), reply
        self.generator.learn(command, reply)
        return reply

    @rule(count=st.integers(1, 20))
    def valid_commands(self, count: int) -> None:
        for _ in range(count):
            self.apply(self.generator.next())

    @rule(
        op=st.one_of([strategy_for(cls) for cls in MUTATING_OPS]),
        credentials=CREDENTIALS,
        pick=st.integers(0, 7),
    )
    def bad_mutation(self, op: Any, credentials: Credentials, pick: int) -> None:
        """An arbitrary op as the next request of a live session (so that it runs)."""
        generator = self.generator
        if not generator.clients:
            return
        client = sorted(generator.clients)[pick % len(generator.clients)]
        seq = generator.clients[client] + 1
        generator.clients[client] = seq
        context = RequestContext(
            ClientId(client), SequenceNumber(seq), SequenceNumber(seq), credentials
        )
        generator.now_ns += 1
        self.apply(ClientCommand(generator.now_ns, MutationCall(context, op)))

    @rule(op=SESSION_AND_SYSTEM_OPS, time_ns=INTERESTING_INTS, now=st.booleans())
    def bad_session_or_system_command(self, op: Any, time_ns: int, now: bool) -> None:
        if now:
            self.generator.now_ns += 1
            time_ns = self.generator.now_ns
        digest = self.namespace.digest()
        if isinstance(self.apply(session_or_system(time_ns, op)), NsError):
            assert self.namespace.digest() == digest

    @rule(op=st.one_of([strategy_for(cls) for cls in QUERY_OPS]), credentials=CREDENTIALS)
    def bad_query(self, op: Any, credentials: Credentials) -> None:
        digest = self.namespace.digest()
        assert isinstance(self.namespace.query(op, credentials), REPLY_TYPES)
        assert self.namespace.digest() == digest

    @invariant()
    def consistent(self) -> None:
        self.namespace.verify()

    def teardown(self) -> None:
        restored = Namespace.restore(self.namespace.snapshot())
        assert restored.digest() == self.namespace.digest()


# Hypothesis renders the repr of these rules' large one_of strategies and warns about its
# size; the repr is never printed unless a step fails.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_bad_arguments_mixed_into_valid_sequences_never_raise() -> None:
    seed = seed_from_environment("bad arguments in valid sequences")
    run_state_machine_as_test(
        hypothesis.seed(seed)(BadArgumentsInValidSequences),
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


@seeded
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seq=INTERESTING_INTS,
    ack=INTERESTING_INTS,
    client=INTERESTING_INTS,
    time_ns=INTERESTING_INTS,
)
def test_any_session_numbers_return_a_reply(seq: int, ack: int, client: int, time_ns: int) -> None:
    c = populated()
    context = RequestContext(ClientId(client), SequenceNumber(seq), SequenceNumber(ack), ROOT)
    op = GetAttr(InodeId(ROOT_INODE))  # not a mutation: must be refused, not crash
    reply = c.ns.apply(ClientCommand(time_ns, MutationCall(context, op)))  # type: ignore[arg-type]
    assert isinstance(reply, REPLY_TYPES)
    if not isinstance(reply, NsError):
        assert (client, seq) == (c.client, c.seq)  # a retry of the last request: kept reply
    c.ns.verify()


@seeded
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.one_of(st.integers(-5, 5), st.binary(max_size=8), st.text(max_size=20), st.none()),
            lambda inner: st.lists(inner, max_size=6),
            max_leaves=30,
        ).map(lambda value: msgpack.packb(value, use_bin_type=True)),
        st.sampled_from(["ns.client_command", "ns.system_command", "ns.mkdir"]).flatmap(
            lambda name: st.lists(st.integers(-3, 3), max_size=6).map(
                lambda fields: msgpack.packb([name, fields])
            )
        ),
    )
)
def test_decoding_garbage_log_bytes_raises_only_schema_errors(raw: bytes) -> None:
    try:
        command = decode_command(raw)
    except schema.SchemaError:
        return
    assert isinstance(Namespace().apply(command), REPLY_TYPES)


# ---------------------------------------------------------------- purity


FORBIDDEN_MODULES = {
    "os",
    "time",
    "random",
    "secrets",
    "socket",
    "select",
    "trio",
    "asyncio",
    "threading",
    "subprocess",
    "datetime",
    "pathlib",
    "io",
    "uuid",
    "signal",
    "shutil",
    "tempfile",
    "logging",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval"}


def test_the_state_machine_imports_no_clock_randomness_or_io() -> None:
    package = pathlib.Path(metaserver.namespace.__file__).parent
    wire_ops = pathlib.Path(schema.__file__).parent / "namespace_ops.py"
    for path in [*sorted(package.glob("*.py")), wire_ops]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in FORBIDDEN_CALLS, f"{path.name} calls {node.func.id}"
                continue
            else:
                continue
            assert not roots & FORBIDDEN_MODULES, f"{path.name} imports {roots}"
            assert "fuse_client" not in roots and "dataserver" not in roots, path.name
