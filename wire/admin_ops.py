"""Status of the metaserver group, for admin tools and tests."""

from __future__ import annotations

from dataclasses import dataclass

from wire.schema import Method, message


@message("admin.group_status_request")
@dataclass(frozen=True)
class GroupStatusRequest:
    pass


@message("admin.replica_status")
@dataclass(frozen=True)
class ReplicaStatus:
    """The leader's view of one replica (``match_index``: highest slot it is known to hold)."""

    node_id: int
    address: str
    voter: bool
    match_index: int
    lag_slots: int
    last_contact_ms_ago: int | None


@message("admin.group_status")
@dataclass(frozen=True)
class GroupStatusReply:
    """One metaserver's view of the group; ask the leader for the replicas' lag."""

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


GROUP_STATUS = Method("admin.group_status", GroupStatusRequest, GroupStatusReply)
STATE_DIGEST = Method("admin.state_digest", DigestRequest, DigestReply)
