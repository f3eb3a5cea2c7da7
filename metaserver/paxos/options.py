"""Tunables of the consensus core, each with its unit in its name and a named limit.

All durations are in milliseconds of the owner's monotonic clock (``now_ms``).
``window_slots`` is a group-wide constant: every replica of a group must use the
same value, because it decides which membership governs which slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from metaserver.paxos._invariant import invariant


class ReadMode(IntEnum):
    """How the leader makes a read linearizable."""

    READ_INDEX = 0
    """Confirm leadership with a quorum of heartbeat acks after the read arrives."""
    LEASE = 1
    """Serve at once while a quorum-granted lease (shortened by the drift bound) holds."""


@dataclass(frozen=True, slots=True)
class PaxosOptions:
    """Timeouts, windows and bounds of one replica."""

    heartbeat_interval_ms: int = 50
    """Leader heartbeats and retransmissions happen this often."""
    commit_delay_ms: int = 5
    """Commit news waits this long for an Accept or Heartbeat to carry it before it goes
    alone in a ``Commit``. When commands come one at a time, the next Accept follows
    within about a round trip: a lone Commit per slot would cost every follower a second
    wake-up per command. The price is that a follower applies a slot up to this much
    later once traffic stops (0: send commit news at once). Heartbeats carry it too, so
    a delay beyond ``heartbeat_interval_ms`` changes nothing."""
    thrifty: bool = True
    """Send new slots at once only to as many voters as a quorum needs -- those whose
    votes counted last -- and to the other voters with the next heartbeat, many slots
    per message ("thrifty" Paxos), or once nothing was proposed for
    ``thrifty_quiet_ms``. In a group of three that spares one follower a wake-up, a vote
    and an fsync per command, and the leader a message each way. The price: when the
    quorum is slow to answer, the oldest open slot waits ``commit_delay_ms`` (or until
    the owner's next tick) before the other voters get it; and under steady load those
    voters apply up to a heartbeat interval later."""
    thrifty_quiet_ms: int = 20
    """A thrifty leader that proposed nothing for this long sends the other voters what
    it held back, so that a quiet group converges well before the next heartbeat. Long
    enough that commands coming one at a time on a loaded machine do not set it off."""
    election_timeout_ms: int = 500
    """A follower that hears no leader for a random time in [T, 2T) probes for election."""
    backoff_level_max: int = 3
    """After a preemption the extra random wait grows up to ``T * 2**level``."""
    read_mode: ReadMode = ReadMode.READ_INDEX
    lease_ms: int = 300
    """A follower that acked a heartbeat promises no one else for this long (its clock)."""
    clock_drift_ppm_max: int = 2_000
    """Largest rate difference between any clock and real time, in parts per million."""
    window_slots: int = 64
    """Slots in flight beyond the commit index; also the delay before a membership acts."""
    batch_commands_max: int = 256
    batch_bytes_max: int = 512 << 10
    command_bytes_max: int = 512 << 10
    queue_commands_max: int = 16_384
    queue_bytes_max: int = 64 << 20
    reads_pending_max: int = 16_384
    promise_entries_max: int = 256
    """Accepted entries per Promise page (fewer if ``message_bytes_max`` is reached
    first); the candidate asks for more pages."""
    catchup_entries_max: int = 512
    catchup_bytes_max: int = 512 << 10
    message_bytes_max: int = 512 << 10
    """No message carries more than this many bytes of entries (``Entry.size_bytes``):
    Accepts are split, Promise and catch-up pages end early. It must fit the owner's
    transport: a metaserver's peer frames hold at most 1 MiB of header, and a message
    beyond that would break the link on every resend."""
    snapshot_chunk_bytes: int = 256 << 10
    snapshot_bytes_max: int = 16 << 30
    snapshot_reads_pending_max: int = 8
    log_retain_slots: int = 1_024
    """Chosen entries kept below a snapshot, so slightly lagging peers avoid a transfer."""
    apply_slots_max: int = 1_024
    """Committed slots handed out in one Ready."""
    learner_lag_slots_max: int = 64
    """A learner this close to the leader's commit index may be promoted."""
    heartbeat_history_max: int = 64

    def __post_init__(self) -> None:
        invariant(self.heartbeat_interval_ms > 0, "heartbeat interval must be positive")
        invariant(self.commit_delay_ms >= 0, "commit delay must not be negative")
        invariant(self.thrifty_quiet_ms >= 0, "thrifty quiet time must not be negative")
        invariant(
            self.election_timeout_ms >= 2 * self.heartbeat_interval_ms,
            "election timeout must span at least two heartbeats",
        )
        invariant(
            0 < self.lease_ms < self.election_timeout_ms,
            "the lease must be shorter than the election timeout",
        )
        invariant(0 <= self.clock_drift_ppm_max < 100_000, "drift bound out of range")
        invariant(self.window_slots >= 1, "window must hold at least one slot")
        invariant(self.batch_commands_max >= 1, "batch must hold at least one command")
        invariant(self.command_bytes_max <= self.batch_bytes_max, "a command must fit a batch")
        invariant(self.batch_bytes_max <= self.message_bytes_max, "a batch must fit a message")
        invariant(
            self.catchup_bytes_max <= self.message_bytes_max
            and self.snapshot_chunk_bytes <= self.message_bytes_max,
            "catch-up pages and snapshot chunks must fit a message",
        )
        invariant(self.promise_entries_max >= 1, "promise pages must hold an entry")
        invariant(self.catchup_entries_max >= 1, "catch-up pages must hold an entry")
        invariant(self.snapshot_chunk_bytes >= 1, "snapshot chunks must hold a byte")
        invariant(self.apply_slots_max >= 1, "must apply at least one slot per Ready")
        invariant(self.heartbeat_history_max >= 2, "need some heartbeat history")

    @property
    def lease_leader_ms(self) -> int:
        """How long after *sending* a heartbeat the leader may rely on the lease.

        A follower's ``lease_ms`` on its clock lasts at least ``lease_ms / (1 + rho)`` of
        real time; the leader's clock may run ``1 - rho`` slow, so the leader's own view
        must stop at ``lease_ms * (1 - rho) / (1 + rho)``.
        """
        million = 1_000_000
        rho = self.clock_drift_ppm_max
        return self.lease_ms * (million - rho) // (million + rho)
