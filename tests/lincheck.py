"""A linearizability checker for client histories (Wing & Gong search, Lowe's memoisation).

A history is a list of :class:`Operation`: when a client invoked it, when it saw the
answer (or ``None`` when it never did -- a timeout, a crash -- so the operation may
have taken effect at any time after its invocation, or not at all), what it asked and
what it got. A :class:`Model` is the sequential specification: a pure ``step(state,
op) -> (state, result)``. The history is linearizable when some total order of the
operations, consistent with real time (an operation that completed before another was
invoked comes first), makes every completed operation return what the model returns.

The model may split the history into independent parts (``partition``: one key of a
key-value store, one inode of a file system); each part is checked on its own, which
keeps the search small (linearizability is compositional, Herlihy & Wing 1990).

Search: the classic Wing-Gong backtracking over a list of call and return events,
with the cache of (set of linearized operations, model state) pairs that Lowe
("Testing for linearizability", 2017) showed makes it practical. States must be
hashable.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

State = TypeVar("State", bound=Hashable)

STEPS_MAX_DEFAULT = 2_000_000
"""Search steps per partition before giving up with an inconclusive result."""


@dataclass(frozen=True)
class Operation:
    """One client operation. Times are comparable numbers on one clock.

    ``complete`` is ``None`` when the outcome is unknown; ``result`` is then ignored.
    """

    client: int
    invoke: float
    complete: float | None
    op: Any
    result: Any = None


@dataclass(frozen=True)
class Model(Generic[State]):
    """A sequential specification."""

    init: Callable[[], State]
    step: Callable[[State, Any], tuple[State, Any]]
    partition: Callable[[Any], Hashable] | None = None
    name: str = "model"
    prune: Callable[[list[Operation]], list[Operation]] | None = None
    """Optional: drop operations of one partition that cannot change the verdict (for
    example a timed-out read). Must be sound: it may only remove operations whose
    absence leaves every linearization of the rest valid and vice versa."""


@dataclass(frozen=True)
class CheckResult:
    """``ok`` is True (linearizable), False (not), or None (search budget exhausted)."""

    ok: bool | None
    partitions: int
    steps: int
    failing_partition: Hashable | None = None
    failing_history: tuple[Operation, ...] = ()
    explanation: str = ""


@dataclass(eq=False)
class _Event:
    op_index: int
    is_call: bool
    time: float
    prev: _Event | None = None
    next: _Event | None = None
    match: _Event | None = field(default=None, repr=False)


def check(
    history: Iterable[Operation], model: Model[Any], steps_max: int = STEPS_MAX_DEFAULT
) -> CheckResult:
    """Check ``history`` against ``model``, one partition at a time."""
    parts: dict[Hashable, list[Operation]] = {}
    for operation in history:
        if operation.complete is not None and operation.complete < operation.invoke:
            raise ValueError(f"operation completes before it is invoked: {operation}")
        key = model.partition(operation.op) if model.partition is not None else None
        parts.setdefault(key, []).append(operation)
    total_steps = 0
    inconclusive: Hashable | None = None
    for key, operations in parts.items():
        if model.prune is not None:
            operations = model.prune(operations)
        ok, steps, longest = _check_partition(operations, model, steps_max)
        total_steps += steps
        if ok is False:
            return CheckResult(
                ok=False,
                partitions=len(parts),
                steps=total_steps,
                failing_partition=key,
                failing_history=tuple(sorted(operations, key=lambda o: o.invoke)),
                explanation=_explain(key, operations, longest, model),
            )
        if ok is None:
            inconclusive = key
    if inconclusive is not None:
        return CheckResult(
            ok=None,
            partitions=len(parts),
            steps=total_steps,
            failing_partition=inconclusive,
            explanation=f"search budget of {steps_max} steps exhausted on {inconclusive!r}",
        )
    return CheckResult(ok=True, partitions=len(parts), steps=total_steps)


def _build_events(operations: Sequence[Operation]) -> _Event:
    """A doubly linked list of call/return events in time order, behind a sentinel.

    At equal times calls come first, so touching operations count as concurrent
    (the lenient reading: the checker never reports a violation that a clock
    granularity could explain). Unknown outcomes return at infinity.
    """
    events: list[_Event] = []
    for index, operation in enumerate(operations):
        call = _Event(index, True, operation.invoke)
        ret_time = operation.complete if operation.complete is not None else float("inf")
        ret = _Event(index, False, ret_time)
        call.match = ret
        events.append(call)
        events.append(ret)
    events.sort(key=lambda e: (e.time, 0 if e.is_call else 1, e.op_index))
    head = _Event(-1, False, float("-inf"))
    previous = head
    for event in events:
        previous.next = event
        event.prev = previous
        previous = event
    return head


def _lift(event: _Event) -> None:
    """Unlink a call and its return from the list."""
    for node in (event, event.match):
        assert node is not None and node.prev is not None
        node.prev.next = node.next
        if node.next is not None:
            node.next.prev = node.prev


def _unlift(event: _Event) -> None:
    """Relink a lifted call and its return (reverse order of :func:`_lift`)."""
    for node in (event.match, event):
        assert node is not None and node.prev is not None
        node.prev.next = node
        if node.next is not None:
            node.next.prev = node


def _check_partition(
    operations: Sequence[Operation], model: Model[Any], steps_max: int
) -> tuple[bool | None, int, list[int]]:
    head = _build_events(operations)
    state = model.init()
    linearized = 0
    cache: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Event, Any]] = []
    longest: list[int] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > steps_max:
            return None, steps, longest
        assert entry is not None
        if entry.is_call:
            operation = operations[entry.op_index]
            new_state, result = model.step(state, operation.op)
            if operation.complete is None or result == operation.result:
                new_linearized = linearized | (1 << entry.op_index)
                key = (new_linearized, new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    if len(stack) > len(longest):
                        longest = [e.op_index for e, _ in stack]
                    state = new_state
                    linearized = new_linearized
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return event whose call was not linearized: backtrack.
            if not stack:
                return False, steps, longest
            call, state = stack.pop()
            linearized &= ~(1 << call.op_index)
            _unlift(call)
            entry = call.next
    return True, steps, longest


def _explain(
    key: Hashable, operations: Sequence[Operation], longest: list[int], model: Model[Any]
) -> str:
    lines = [f"{model.name}: history of partition {key!r} is not linearizable"]
    lines.append("longest linearizable prefix found:")
    state = model.init()
    for index in longest:
        state, result = model.step(state, operations[index].op)
        lines.append(f"  {_describe(operations[index])}  -> model says {result!r}")
    lines.append("operations of the partition, by invocation:")
    for operation in sorted(operations, key=lambda o: o.invoke):
        lines.append(f"  {_describe(operation)}")
    return "\n".join(lines)


def _describe(operation: Operation) -> str:
    complete = "?" if operation.complete is None else f"{operation.complete:g}"
    outcome = "unknown" if operation.complete is None else repr(operation.result)
    return (
        f"client {operation.client} [{operation.invoke:g}, {complete}] "
        f"{operation.op!r} -> {outcome}"
    )


# ---------------------------------------------------------------- ready-made models


def _kv_step(state: Any, op: Any) -> tuple[Any, Any]:
    """One key of a register store. ``op`` is a tuple whose first item is the kind and
    second the key: ("put", k, v) -> None; ("get", k) -> value or None;
    ("cas", k, expected, new) -> bool; ("delete", k) -> bool (whether it existed)."""
    kind = op[0]
    if kind == "put":
        return op[2], None
    if kind == "get":
        return state, state
    if kind == "cas":
        if state == op[2]:
            return op[3], True
        return state, False
    if kind == "delete":
        return None, state is not None
    raise ValueError(f"unknown key-value operation {op!r}")


def _kv_prune(operations: list[Operation]) -> list[Operation]:
    """Timed-out gets constrain nothing. A timed-out put whose value no completed get
    returned may be linearized at the very end, where it is invisible, so dropping it
    changes no verdict -- provided put values are unique, as the simulation makes them."""
    seen = {op.result for op in operations if op.complete is not None and op.op[0] == "get"}
    # A compare-and-set or delete can observe a value without returning it.
    only_puts_and_gets = all(op.op[0] in ("put", "get") for op in operations)
    kept = []
    for operation in operations:
        if operation.complete is None:
            if operation.op[0] == "get":
                continue
            if only_puts_and_gets and operation.op[0] == "put" and operation.op[2] not in seen:
                continue
        kept.append(operation)
    return kept


def kv_model(unique_values: bool = True) -> Model[Any]:
    """Registers keyed by ``op[1]``, checked key by key.

    With ``unique_values`` (every put writes a value never written before) timed-out
    operations that nobody observed are pruned before the search.
    """
    return Model(
        init=lambda: None,
        step=_kv_step,
        partition=lambda op: op[1],
        name="kv",
        prune=_kv_prune if unique_values else None,
    )
