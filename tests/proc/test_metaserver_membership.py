"""Membership changes through the log: a replica whose disk was wiped comes back.

Node ids are never reused, so the replacement starts empty under a new id with
``--join``; an admin ``MEMBERSHIP_CHANGE`` adds it as a learner (it catches up from a
snapshot), then replaces the lost voter with it.  The group keeps serving throughout,
and afterwards survives the loss of another original voter.  Randomised: prints its seed.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from tests.proc.metaserver_harness import (
    FAST_ELECTIONS,
    NamespaceWorkload,
    metaserver_group,
    seed_for,
)
from wire.admin_ops import MEMBERSHIP_CHANGE, MembershipAction, MembershipChangeRequest
from wire.errors import RpcError

SNAPSHOT_EVERY = 150
"""Small, so that the log is compacted and a new replica must start from a snapshot."""


async def test_a_wiped_replica_returns_under_a_new_id_via_a_learner(tmp_path: Path) -> None:
    seed = seed_for("replace")
    settings = {**FAST_ELECTIONS, "snapshot_interval_entries": SNAPSHOT_EVERY}
    async with metaserver_group(tmp_path, settings=settings) as group, group.client() as client:
        workload = NamespaceWorkload([client], seed)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workload.run, stop)
            await trio.sleep(1.5)

            first_leader = await group.wait_for_leader()
            lost = next(i for i in group.nodes if i != first_leader)
            group.kill(lost)
            group.wipe(lost)
            newcomer = group.add_node(4)
            group.start(4)

            reply = await client.call(
                MEMBERSHIP_CHANGE,
                MembershipChangeRequest(MembershipAction.ADD_LEARNER, 4, str(newcomer.address)),
            )
            assert 4 in reply.learners and lost in reply.voters
            # Repeating a change that is in force is not an error (a retried admin call).
            again = await client.call(
                MEMBERSHIP_CHANGE,
                MembershipChangeRequest(MembershipAction.ADD_LEARNER, 4, str(newcomer.address)),
            )
            assert again == reply

            reply = await client.call(
                MEMBERSHIP_CHANGE,
                MembershipChangeRequest(MembershipAction.REPLACE, 4, old_node_id=lost),
            )
            assert sorted(reply.voters) == sorted([*(i for i in (1, 2, 3) if i != lost), 4])
            assert reply.retired == (lost,)
            await trio.sleep(0.5)

            # Three voters again: losing one more original replica is survivable.
            leader = await group.wait_for_leader(among=[i for i in group.running()])
            other = next(i for i in (1, 2, 3) if i not in (lost, leader))
            group.kill(other)
            await trio.sleep(1.0)
            stop.set()
        assert not workload.errors, workload.errors[:5]
        await workload.verify(client)

        log_text = group.nodes[4].process.log_text()
        assert "installed snapshot at slot" in log_text
        survivors = [i for i in group.running()]
        await group.wait_equal_digests(survivors)
        status = await group.status(4)
        assert status is not None and 4 in status.voters and lost in status.retired

        # Ids are never reused: the retired id is refused by the group and at start-up.
        with pytest.raises(RpcError) as refused:
            await client.call(
                MEMBERSHIP_CHANGE,
                MembershipChangeRequest(MembershipAction.ADD_LEARNER, lost, "127.0.0.1:1"),
            )
        assert refused.value.code in (errno.EINVAL, errno.EEXIST)
        process = group.start(lost)
        assert await process.wait_exit(15.0) == 1
        assert "new id" in process.log_text().strip().splitlines()[-1]
