"""Admin RPCs of the metaserver group: status, state digests, membership changes.

``GROUP_STATUS`` and ``STATE_DIGEST`` are answered by whichever replica is asked (a
replica's own view).  ``MEMBERSHIP_CHANGE`` is answered by the leader only; other
replicas redirect with ``RpcError(NOT_LEADER, leader address)``, so call it through
:meth:`fuse_client.meta_client.MetaClient.call`.  ``IDENTITY_CHECK`` is what a replica
starting on an empty data directory asks its peers before it founds or joins.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from wire.schema import Method, message


@message("admin.member_address")
@dataclass(frozen=True)
class MemberAddress:
    """Where metaserver ``node_id`` serves (``HOST:PORT``)."""

    node_id: int
    address: str


@message("admin.group_status_request")
@dataclass(frozen=True)
class GroupStatusRequest:
    pass


@message("admin.replica_status")
@dataclass(frozen=True)
class ReplicaStatus:
    """The leader's view of one other replica.

    ``match_index``: highest slot it is known to hold; ``lag_slots``: how far that is
    behind the leader's commit index; ``last_contact_ms_ago``: since the leader last
    heard from it (None: never, under this leader).
    """

    node_id: int
    address: str
    voter: bool
    match_index: int
    lag_slots: int
    last_contact_ms_ago: int | None


@message("admin.group_status")
@dataclass(frozen=True)
class GroupStatusReply:
    """One metaserver's view of the group; ask the leader for the replicas' lag.

    ``role`` is ``follower``, ``probing``, ``preparing`` or ``leader``; ``ballot`` is
    the leader's ballot as ``round.node`` (or the highest promised one when no leader
    is known).  ``voters``/``learners``/``retired`` are the membership governing the
    next slot, as this replica knows it.
    """

    node_id: int
    role: str
    leader_id: int | None
    leader_address: str
    ballot: str
    commit_index: int
    applied_index: int
    snapshot_index: int
    log_first_slot: int
    log_last_slot: int
    applied_commands: int
    replicas: tuple[ReplicaStatus, ...]
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    retired: tuple[int, ...] = ()
    addresses: tuple[MemberAddress, ...] = ()


@message("admin.digest_request")
@dataclass(frozen=True)
class DigestRequest:
    pass


@message("admin.digest")
@dataclass(frozen=True)
class DigestReply:
    """A digest of the namespace as applied up to ``applied_index`` on this replica."""

    applied_index: int
    digest: bytes


class MembershipAction(IntEnum):
    ADD_LEARNER = 0
    """Add a new replica (new id, with its address) that receives the log but does not vote."""
    PROMOTE = 1
    """Make a caught-up learner a voter (EAGAIN while it is still catching up)."""
    REMOVE = 2
    """Retire a voter or learner; its id is never used again."""
    REPLACE = 3
    """Promote the caught-up learner ``node_id`` and retire the voter ``old_node_id`` at once."""


@message("admin.membership_change_request")
@dataclass(frozen=True)
class MembershipChangeRequest:
    """One membership change; ``address`` is required by ADD_LEARNER only."""

    action: MembershipAction
    node_id: int
    address: str = ""
    old_node_id: int = 0


@message("admin.membership")
@dataclass(frozen=True)
class MembershipReply:
    """The membership in force once the change took effect (repeating a change that is
    already in force is not an error: it returns the same)."""

    voters: tuple[int, ...]
    learners: tuple[int, ...]
    retired: tuple[int, ...]
    addresses: tuple[MemberAddress, ...]


@message("admin.identity_check_request")
@dataclass(frozen=True)
class IdentityCheckRequest:
    """Asked by metaserver ``node_id`` starting on an empty data directory."""

    node_id: int


@message("admin.identity_check")
@dataclass(frozen=True)
class IdentityCheckReply:
    """What the asked replica knows of ``node_id``.

    ``has_state``: the asked replica runs on a data directory (False while it is itself
    still checking); ``heard_from``: it once took Paxos messages from ``node_id``;
    ``retired``: ``node_id`` has left the group.  Either of the last two means the asker
    took part before and lost its disk: it must not start under that id again.
    ``addresses`` lets the asker find replicas added after the group was founded.
    """

    node_id: int
    has_state: bool
    heard_from: bool
    retired: bool
    addresses: tuple[MemberAddress, ...]


GROUP_STATUS = Method("admin.group_status", GroupStatusRequest, GroupStatusReply)
STATE_DIGEST = Method("admin.state_digest", DigestRequest, DigestReply)
MEMBERSHIP_CHANGE = Method("admin.membership_change", MembershipChangeRequest, MembershipReply)
IDENTITY_CHECK = Method("admin.identity_check", IdentityCheckRequest, IdentityCheckReply)
