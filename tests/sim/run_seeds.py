"""Run simulation seeds: ``python -m tests.sim.run_seeds --seeds N --start S``.

Runs seeds S .. S+N-1 (in parallel with ``--jobs``), prints each failure with its seed
and the command that replays it, then a summary of the coverage counters. Exits 1 if
any seed failed or, in a batch of at least ``COVERAGE_SEEDS_MIN`` seeds (or with
``--require-coverage``), if no seed reached one of the required events. A smaller batch
-- such as the one-seed replay a failure prints -- only reports what it missed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time

from tests.sim.cluster import COVERAGE_SEEDS_MIN, REQUIRED_COVERAGE, SimFailure, run_seed


def _run(seed: int) -> tuple[int, dict[str, int] | None, str]:
    try:
        return seed, run_seed(seed).counters, ""
    except SimFailure as failure:
        return seed, None, str(failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every seed")
    parser.add_argument(
        "--require-coverage",
        action="store_true",
        help=f"fail on missed coverage even with fewer than {COVERAGE_SEEDS_MIN} seeds",
    )
    args = parser.parse_args(argv)
    seeds = range(args.start, args.start + args.seeds)
    started = time.monotonic()
    totals: dict[str, int] = {}
    failures: list[int] = []
    if args.jobs > 1:
        with multiprocessing.Pool(args.jobs) as pool:
            results = pool.imap(_run, seeds)
            outcomes = list(_report(results, totals, failures, args.verbose))
    else:
        outcomes = list(_report(map(_run, seeds), totals, failures, args.verbose))
    elapsed = time.monotonic() - started
    print(f"\n{len(outcomes)} seeds in {elapsed:.1f} s, {len(failures)} failed")
    for name in sorted(totals):
        print(f"  {name:32s} {totals[name]}")
    missing = [name for name in REQUIRED_COVERAGE if not totals.get(name)]
    judged = args.require_coverage or len(outcomes) >= COVERAGE_SEEDS_MIN
    if missing:
        print(f"coverage: no seed reached {', '.join(missing)}")
        if not judged:
            print(
                f"coverage not judged: {len(outcomes)} seed(s) < {COVERAGE_SEEDS_MIN} "
                "(--require-coverage to judge it anyway)"
            )
    if failures:
        print("failed seeds: " + " ".join(str(seed) for seed in failures))
    return 1 if failures or (missing and judged) else 0


def _report(results, totals, failures, verbose):  # type: ignore[no-untyped-def]
    for seed, counters, error in results:
        if counters is None:
            failures.append(seed)
            print(f"FAIL {error}", flush=True)
        else:
            for name, value in counters.items():
                totals[name] = totals.get(name, 0) + value
            if verbose:
                print(f"seed {seed} ok", flush=True)
        yield seed


if __name__ == "__main__":
    sys.exit(main())
