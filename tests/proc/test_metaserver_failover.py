"""The metaserver group as real processes: failover under load, crash and restart of all.

Every test runs a concurrent client workload whose history is checked with the
linearizability checker (:mod:`tests.lincheck`), and checks that every acknowledged
create survives.  Randomised: each test prints its seed (replay with ``PAXFS_SEED=N``).
"""

from __future__ import annotations

from pathlib import Path

import trio

from tests.proc.metaserver_harness import (
    MetaserverGroup,
    NamespaceWorkload,
    metaserver_group,
    seed_for,
)

FAILOVER_DEADLINE_S = 5.0
"""The issue's promise: a new leader serves within 5 s of the leader's kill -9."""


async def _run_workload_while(
    group: MetaserverGroup, seed: int, action: object, clients: int = 2
) -> NamespaceWorkload:
    """Run a workload, call ``action()`` (async) in the middle, finish, verify."""
    async with group.client(name="load-1") as first, group.client(name="load-2") as second:
        workload = NamespaceWorkload([first, second][:clients], seed)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workload.run, stop)
            await trio.sleep(0.8)
            await action()  # type: ignore[operator]
            await trio.sleep(0.8)
            stop.set()
        assert not workload.errors, f"errors surfaced to the client: {workload.errors[:5]}"
        result = await workload.verify(first)
        print(
            f"{len(workload.history)} keyed operations linearizable "
            f"({result.steps} search steps); {len(workload.acked_names)} unique creates kept"
        )
    return workload


async def test_kill_9_of_the_leader_fails_over_within_5_s_losing_nothing(
    tmp_path: Path,
) -> None:
    seed = seed_for("kill-leader")
    async with metaserver_group(tmp_path, settings={}) as group:
        old_leader = await group.wait_for_leader()
        killed_at: list[float] = []

        async def kill_leader() -> None:
            killed_at.append(trio.current_time())
            group.kill(old_leader)

        workload = await _run_workload_while(group, seed, kill_leader)
        survivors = [i for i in group.nodes if i != old_leader]
        new_leader = await group.wait_for_leader(among=survivors)
        assert new_leader != old_leader
        # A reply already in flight when the process died may land just after the kill.
        served = [t for t in workload.completed_mutations if t > killed_at[0] + 0.05]
        assert served, "no mutation completed after the kill"
        failover_s = served[0] - killed_at[0]
        print(
            f"leader {old_leader} killed; {new_leader} served a mutation {failover_s:.2f} s later"
        )
        assert failover_s < FAILOVER_DEADLINE_S
        await group.wait_equal_digests(survivors)

        group.start(old_leader)
        await group.wait_equal_digests(list(group.nodes))


async def test_kill_9_of_every_replica_and_restart_loses_nothing(tmp_path: Path) -> None:
    seed = seed_for("kill-all")
    async with metaserver_group(tmp_path) as group:

        async def kill_all_and_restart() -> None:
            for node_id in group.nodes:
                group.kill(node_id)
            await trio.sleep(0.3)
            for node_id in group.nodes:
                group.start(node_id)

        await _run_workload_while(group, seed, kill_all_and_restart)
        digests = await group.wait_equal_digests(list(group.nodes))
        assert len({(d.applied_index, d.digest) for d in digests.values()}) == 1


async def test_state_digests_agree_at_the_same_applied_index(tmp_path: Path) -> None:
    seed = seed_for("digests")
    async with metaserver_group(tmp_path) as group:
        leader = await group.wait_for_leader()

        async def restart_a_follower() -> None:
            follower = next(i for i in group.nodes if i != leader)
            group.restart(follower)

        await _run_workload_while(group, seed, restart_a_follower)
        digests = await group.wait_equal_digests(list(group.nodes))
        status = await group.status(leader)
        assert status is not None
        assert status.applied_index >= digests[leader].applied_index > 0
        assert status.applied_commands > 0
