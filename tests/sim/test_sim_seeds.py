"""The randomised simulation tier: a bounded batch of seeds, each checked for safety,
linearizability and liveness, plus coverage counters that fail the batch if no seed
reached one of ``REQUIRED_COVERAGE``: a leader change, a preempted leader, a snapshot
taken, a restart from a snapshot, a catch-up from a snapshot, a membership change, a
torn tail cut, a corrupt record detected, reads by lease and by read-index, and the
metaserver's Ready ordering (messages sent and slots applied before the fsync).

A seed is a whole run: ``test_a_seed_replays_identically`` runs one again in a fresh
interpreter with other string hashing, as the replay a failure prints would, and
compares every message and every applied slot.

``PAXFS_SIM_SEEDS`` (default 150) and ``PAXFS_SIM_START`` (default 0) choose the seeds;
``PAXFS_SEED=<n>`` runs that one seed alone. ``make sim SEEDS=N START=S`` runs more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sim.cluster import COVERAGE_SEEDS_MIN, REQUIRED_COVERAGE, SimResult, run_seed

if os.environ.get("PAXFS_SEED"):
    SEEDS = [int(os.environ["PAXFS_SEED"])]
else:
    START = int(os.environ.get("PAXFS_SIM_START", "0"))
    SEEDS = list(range(START, START + int(os.environ.get("PAXFS_SIM_SEEDS", "150"))))

REPLAY_SEED = 23
"""Crashes (one mid-fsync, a torn tail), a preempted leader, a membership change and a
catch-up from a snapshot: most of what could go nondeterministic."""
_results: dict[int, SimResult] = {}


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_seed_is_safe_linearizable_and_live(seed: int) -> None:
    print(f"PAXFS_SEED={seed}")
    _results[seed] = run_seed(seed)


def test_the_seeds_reach_every_required_event() -> None:
    if len(SEEDS) < COVERAGE_SEEDS_MIN:
        pytest.skip(f"coverage is judged on a batch of at least {COVERAGE_SEEDS_MIN} seeds")
    totals: dict[str, int] = {}
    for seed in SEEDS:
        result = _results.get(seed)
        if result is None:  # filtered out with -k: run it here
            result = _results[seed] = run_seed(seed)
        for name, value in result.counters.items():
            totals[name] = totals.get(name, 0) + value
    missing = [name for name in REQUIRED_COVERAGE if not totals.get(name)]
    assert not missing, f"no seed in {SEEDS[0]}..{SEEDS[-1]} reached {missing}: {totals}"


def test_a_seed_replays_identically() -> None:
    result = _results.get(REPLAY_SEED) or run_seed(REPLAY_SEED)
    for event in ("crash_during_fsync", "leader_preempted", "catchup_from_snapshot"):
        assert result.counters.get(event), f"seed {REPLAY_SEED} no longer reaches {event}"
    code = (
        "from tests.sim.cluster import run_seed\n"
        f"r = run_seed({REPLAY_SEED})\n"
        "print(r.trace_digest, r.events, r.sim_ms, r.operations, sorted(r.counters.items()))"
    )
    replay = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONHASHSEED": "4242"},
        capture_output=True,
        text=True,
        check=True,
    )
    expected = (
        f"{result.trace_digest} {result.events} {result.sim_ms} {result.operations} "
        f"{sorted(result.counters.items())}"
    )
    assert replay.stdout.strip() == expected
