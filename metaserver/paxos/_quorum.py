"""Majority quorums. Kept in one place so the rule is stated (and testable) once."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from metaserver.paxos.types import NodeId


def quorum_size(voter_count: int) -> int:
    """Votes needed among ``voter_count`` voters: a strict majority, so any two
    quorums of the same membership share a voter ("Paxos Made Simple", 2.2)."""
    return voter_count // 2 + 1


def is_quorum(voters: Collection[NodeId], nodes: Iterable[NodeId]) -> bool:
    """True when the voters among ``nodes`` form a majority of ``voters``."""
    needed = quorum_size(len(voters))
    count = 0
    for node in nodes:
        if node in voters:
            count += 1
            if count >= needed:
                return True
    return False


def quorum_value(voters: Collection[NodeId], value_of: dict[NodeId, int]) -> int:
    """The highest ``v`` such that a quorum of ``voters`` has ``value_of[node] >= v``
    (missing nodes count as -1)."""
    values = sorted((value_of.get(node, -1) for node in voters), reverse=True)
    return values[quorum_size(len(voters)) - 1]
