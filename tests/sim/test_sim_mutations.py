"""Break one rule of the protocol at a time and show the checks catch it.

Each mutation is applied by monkeypatching the single method or function that states
the rule, then the simulation (or a scripted scenario) must fail within a bounded
number of seeds, and by the expected check. If the checks weakened, or the rule moved,
these tests fail: they keep the safety net honest.

* minority quorum -- ``_quorum.quorum_size`` returns ``n // 2``;
* applying an accepted but unchosen value -- a follower treats any vote of its own as
  the chosen value when commit news arrives;
* not persisting the promise -- ``PromiseRecord`` is never handed to the owner;
* a lease without the clock-drift margin -- the leader trusts its lease for the full
  ``lease_ms`` of its own clock.

Each is shown twice: caught by the check aimed at it, and caught end to end (diverging
replicas, two lease holders, two values chosen) with the aimed checks switched off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from metaserver.paxos import _quorum
from metaserver.paxos import node as node_module
from metaserver.paxos.options import PaxosOptions
from tests.sim.checker import SimViolation
from tests.sim.cluster import SimFailure, run_seed
from tests.sim.interaction import run_script

SEEDS_MAX = 80
DIRECT = frozenset(
    {
        "apply-only-chosen",
        "durable-before-send",
        "promise-survives-restart",
        "promise-on-disk-monotone",
        "one-value-chosen",
    }
)


def _minority_quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_quorum, "quorum_size", lambda voters: max(1, voters // 2))


def _apply_unchosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        node_module.PaxosNode,
        "_vote_is_chosen",
        lambda self, vote, slot, ballot, base: True,
    )


def _forget_promise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module.PaxosNode, "_persist_promise", lambda self, ballot: None)


def _first_failure(
    disabled: frozenset[str] = frozenset(), wanted: set[str] | None = None
) -> SimFailure | None:
    """The first seed's failure (only by one of ``wanted`` checks, if given: a broken
    rule may first show as a stuck replica before the replicas visibly diverge)."""
    for seed in range(SEEDS_MAX):
        try:
            run_seed(seed, disabled)
        except SimFailure as failure:
            print(f"caught at seed {failure.seed} by [{failure.check}]: {failure.detail}")
            if wanted is None or failure.check in wanted:
                return failure
    return None


@pytest.mark.parametrize(
    "mutate,checks",
    [
        (_minority_quorum, {"apply-only-chosen", "one-value-chosen"}),
        (_apply_unchosen, {"apply-only-chosen"}),
        (_forget_promise, {"durable-before-send"}),
    ],
    ids=["minority-quorum", "apply-unchosen", "forget-promise"],
)
def test_the_aimed_check_catches_the_mutation(
    monkeypatch: pytest.MonkeyPatch,
    mutate: Callable[[pytest.MonkeyPatch], None],
    checks: set[str],
) -> None:
    mutate(monkeypatch)
    failure = _first_failure()
    assert failure is not None, f"no seed below {SEEDS_MAX} caught the mutation"
    assert failure.check in checks


@pytest.mark.parametrize(
    "mutate,checks",
    [
        (_minority_quorum, {"single-lease-holder", "applied-prefix-identical", "linearizable"}),
        (_apply_unchosen, {"applied-prefix-identical", "linearizable"}),
    ],
    ids=["minority-quorum", "apply-unchosen"],
)
def test_the_mutation_also_breaks_the_group_end_to_end(
    monkeypatch: pytest.MonkeyPatch,
    mutate: Callable[[pytest.MonkeyPatch], None],
    checks: set[str],
) -> None:
    mutate(monkeypatch)
    failure = _first_failure(DIRECT, checks)
    assert failure is not None, f"no seed below {SEEDS_MAX} caught the mutation end to end"


def test_a_stale_vote_applied_as_chosen_diverges_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministically: a restarted replica holds a vote nobody chose (z at 1.1) and
    hears commit news for that slot at 2.3."""
    script = (Path(__file__).parent / "scripts" / "minority_accepted_slot.txt").read_text()
    _apply_unchosen(monkeypatch)
    for disabled, expected in (
        (frozenset(), "apply-only-chosen"),
        (DIRECT, "applied-prefix-identical"),
    ):
        with pytest.raises(SimViolation) as caught:
            run_script(script, disabled)
        assert caught.value.check == expected
        print(f"caught by [{caught.value.check}]: {caught.value.detail}")


def test_a_forgotten_promise_lets_two_values_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random seeds rarely crash a replica between a promise and the next vote; the
    scripted scenario does exactly that."""
    script = (Path(__file__).parent / "scripts" / "promise_survives_restart.txt").read_text()
    run_script(script, frozenset(DIRECT - {"one-value-chosen"}))  # the rule holds: fine
    _forget_promise(monkeypatch)
    with pytest.raises(SimViolation) as caught:
        run_script(script, frozenset(DIRECT - {"one-value-chosen"}))
    assert caught.value.check == "one-value-chosen"
    print(f"caught by [{caught.value.check}]: {caught.value.detail}")


def test_a_lease_without_the_drift_margin_overlaps_the_next_leaders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random seeds seldom put clocks at opposite extremes of the bound exactly when a
    cut-off leader's lease runs out; the scripted scenario does."""
    script = (Path(__file__).parent / "scripts" / "lease_clock_drift.txt").read_text()
    run_script(script)
    monkeypatch.setattr(PaxosOptions, "lease_leader_ms", property(lambda self: self.lease_ms))
    with pytest.raises(SimViolation) as caught:
        run_script(script)
    assert caught.value.check == "single-lease-holder"
    print(f"caught by [{caught.value.check}]: {caught.value.detail}")
