"""The linearizability checker agrees with a brute-force search and explains failures."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lincheck import Model, Operation, check, kv_model


def put(client: int, start: float, end: float | None, key: str, value: int) -> Operation:
    return Operation(client, start, end, ("put", key, value))


def get(client: int, start: float, end: float | None, key: str, result: Any) -> Operation:
    return Operation(client, start, end, ("get", key), result)


def test_a_read_after_a_completed_write_must_see_it() -> None:
    history = [put(1, 0, 10, "a", 1), get(2, 11, 15, "a", None)]
    result = check(history, kv_model())
    assert result.ok is False
    assert result.failing_partition == "a"
    assert "not linearizable" in result.explanation


def test_a_read_overlapping_a_write_may_see_either_value() -> None:
    for seen in (None, 1):
        assert check([put(1, 0, 10, "a", 1), get(2, 5, 15, "a", seen)], kv_model()).ok


def test_two_reads_cannot_see_a_value_go_back() -> None:
    history = [
        put(1, 0, 100, "a", 1),
        get(2, 10, 20, "a", 1),
        get(3, 30, 40, "a", None),
    ]
    assert check(history, kv_model()).ok is False


def test_an_unknown_outcome_may_take_effect_late_or_never() -> None:
    late = [put(1, 0, None, "a", 1), get(2, 50, 60, "a", None), get(2, 70, 80, "a", 1)]
    assert check(late, kv_model()).ok
    never = [put(1, 0, None, "a", 1), get(2, 50, 60, "a", None)]
    assert check(never, kv_model()).ok
    flicker = [put(1, 0, None, "a", 1), get(2, 50, 60, "a", 1), get(2, 70, 80, "a", None)]
    assert check(flicker, kv_model()).ok is False


def test_keys_are_checked_independently() -> None:
    history = [put(1, 0, 10, "a", 1), put(1, 20, 30, "b", 2), get(2, 40, 50, "b", 2)]
    result = check(history, kv_model())
    assert result.ok and result.partitions == 2


def test_compare_and_set_and_delete() -> None:
    cas_ok = Operation(1, 20, 30, ("cas", "a", 1, 2), True)
    cas_fail = Operation(2, 40, 50, ("cas", "a", 1, 3), False)
    delete = Operation(3, 60, 70, ("delete", "a"), True)
    history = [put(1, 0, 10, "a", 1), cas_ok, cas_fail, delete, get(1, 80, 90, "a", None)]
    assert check(history, kv_model()).ok
    wrong = [put(1, 0, 10, "a", 1), Operation(2, 20, 30, ("cas", "a", 1, 2), False)]
    assert check(wrong, kv_model()).ok is False


def test_the_search_budget_gives_an_inconclusive_answer_not_a_wrong_one() -> None:
    history = [put(c, 0, 100, "a", c) for c in range(12)] + [get(99, 200, 210, "a", 11)]
    assert check(history, kv_model(), steps_max=5).ok is None
    assert check(history, kv_model()).ok is True


def test_a_model_of_a_file_system_like_counter_without_partitions() -> None:
    def step(state: int, op: tuple[str, int]) -> tuple[int, int]:
        if op[0] == "add":
            return state + op[1], state + op[1]
        return state, state

    counter = Model(init=lambda: 0, step=step, name="counter")
    history = [
        Operation(1, 0, 10, ("add", 2), 2),
        Operation(2, 5, 15, ("add", 3), 5),
        Operation(3, 20, 30, ("read", 0), 5),
    ]
    assert check(history, counter).ok
    assert check(history[:2] + [Operation(3, 20, 30, ("read", 0), 3)], counter).ok is False


# ---------------------------------------------------------------- against brute force


def _brute_force(history: list[Operation]) -> bool:
    """Try every order of every subset of unknown operations (small histories only)."""
    known = [op for op in history if op.complete is not None]
    unknown = [op for op in history if op.complete is None]
    for size in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, size):
            ops = known + list(chosen)
            for order in itertools.permutations(ops):
                if _respects_real_time(order) and _legal(order):
                    return True
    return False


def _respects_real_time(order: tuple[Operation, ...]) -> bool:
    for i, earlier in enumerate(order):
        for later in order[i + 1 :]:
            if later.complete is not None and later.complete < earlier.invoke:
                return False
    return True


def _legal(order: tuple[Operation, ...]) -> bool:
    value = None
    for op in order:
        if op.op[0] == "put":
            value = op.op[2]
        elif op.complete is not None and op.result != value:
            return False
    return True


@st.composite
def histories(draw: st.DrawFn) -> list[Operation]:
    count = draw(st.integers(1, 5))
    history = []
    for index in range(count):
        start = draw(st.integers(0, 20))
        length = draw(st.integers(0, 10))
        end: int | None = None if draw(st.integers(0, 4)) == 0 else start + length
        if draw(st.booleans()):
            history.append(put(index, start, end, "k", index))
        else:
            seen = draw(st.sampled_from([None, *range(count)]))
            history.append(get(index, start, end, "k", seen))
    return history


@settings(max_examples=300, deadline=None)
@given(histories())
def test_the_checker_agrees_with_brute_force(history: list[Operation]) -> None:
    expected = _brute_force(history)
    assert check(history, kv_model()).ok is expected
    assert check(history, kv_model(unique_values=False)).ok is expected
