"""Property test of the cluster manager's decisions on random clusters (hypothesis).

Whatever the replicas, versions, corruption, goals and dead dataservers, rounds of
planning and carried-out heartbeats must:

* never copy from a corrupt replica or from a replica of another version (the scripted
  dataservers assert it);
* never take a referenced chunk below ``min(goal, good live replicas it had)`` good live
  replicas of the version it is read at, and never touch a chunk with no good live replica;
* never delete a replica newer than the namespace's version;
* remove every replica of unreferenced chunks from live dataservers;
* heal every chunk that has a good live replica to its goal, as far as live servers allow.

Failing examples are printed by hypothesis and replayed from its database.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_cluster_manager_state import DEAD_AFTER_S, MIB, Script
from wire.ids import ChunkId, ChunkVersion, DataserverId

SERVERS = tuple(DataserverId(i) for i in range(1, 6))
CHUNKS = tuple(ChunkId(0x100 + i) for i in range(4))


@st.composite
def clusters(draw: st.DrawFn) -> dict[str, object]:
    dead = draw(st.sets(st.sampled_from(SERVERS), max_size=3))
    refs: dict[ChunkId, tuple[ChunkVersion, int, int]] = {}
    stored: dict[DataserverId, dict[ChunkId, tuple[ChunkVersion, bool]]] = {
        ds: {} for ds in SERVERS
    }
    for chunk in CHUNKS:
        referenced = draw(st.booleans())
        version = draw(st.integers(1, 3))
        if referenced:
            refs[chunk] = (ChunkVersion(version), MIB, draw(st.integers(1, 4)))
        for ds in SERVERS:
            if draw(st.booleans()):
                held = draw(st.integers(1, version + 1))
                stored[ds][chunk] = (ChunkVersion(held), draw(st.booleans()))
    return {"dead": dead, "refs": refs, "stored": stored}


def good_live(script: Script, chunk: ChunkId, version: ChunkVersion, live: set[int]) -> set[int]:
    return {
        ds
        for ds in live
        if (held := script.stored[DataserverId(ds)].get(chunk)) is not None
        and held.version == version
        and not held.corrupt
    }


def read_version(
    stored: dict[DataserverId, dict[ChunkId, tuple[ChunkVersion, bool]]],
    chunk: ChunkId,
    version: ChunkVersion,
    live: set[int],
) -> ChunkVersion:
    """The version a chunk is read at: its own if anyone reported it, else the newest
    older one with a good live replica (an abandoned open)."""
    if any(chunk in held and held[chunk][0] == version for held in stored.values()):
        return version
    older = [
        held[chunk][0]
        for ds, held in stored.items()
        if ds in live and chunk in held and held[chunk][0] < version and not held[chunk][1]
    ]
    return max(older, default=version)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=clusters())
def test_decisions_never_lose_committed_data_and_heal_what_they_can(
    cluster: dict[str, object],
) -> None:
    dead: set[DataserverId] = cluster["dead"]  # type: ignore[assignment]
    refs: dict[ChunkId, tuple[ChunkVersion, int, int]] = cluster["refs"]  # type: ignore[assignment]
    stored: dict[DataserverId, dict[ChunkId, tuple[ChunkVersion, bool]]] = cluster["stored"]  # type: ignore[assignment]
    live = {int(ds) for ds in SERVERS if ds not in dead}
    script = Script(SERVERS, chunk_size_bytes=MIB)
    for ds, held in stored.items():
        for chunk, (version, corrupt) in held.items():
            script.store(ds, chunk, version, corrupt=corrupt)
        script.full_report(ds)
    script.advance(DEAD_AFTER_S + 1)
    for ds in SERVERS:
        if ds not in dead:
            script.heartbeat(ds)
    assert sorted(script.state.check_liveness(script.now)) == sorted(dead)
    script.scan(refs)
    script.advance(1.0)

    floors: dict[ChunkId, tuple[ChunkVersion, int]] = {}
    for chunk, (version, _length, goal) in refs.items():
        effective = read_version(stored, chunk, version, live)
        floors[chunk] = (effective, min(goal, len(good_live(script, chunk, effective, live))))
    newer = {
        (ds, chunk)
        for ds, held in stored.items()
        for chunk, (version, _) in held.items()
        if chunk in refs and version > refs[chunk][0]
    }
    untouchable = {chunk for chunk, (effective, floor) in floors.items() if floor == 0}
    before = {ds: dict(script.stored[ds]) for ds in SERVERS}

    for _round in range(6):
        script.scan(refs)
        script.round([ds for ds in SERVERS if ds not in dead])
        for chunk, (effective, floor) in floors.items():
            assert len(good_live(script, chunk, effective, live)) >= floor, chunk
        counters = script.state.counters(script.now)
        assert counters.corrupt_replicas == sum(
            r.corrupt for holders in script.state.replicas.values() for r in holders.values()
        )
        for ds, chunk in newer:
            assert script.stored[ds].get(chunk) == before[ds][chunk]
        for chunk in untouchable:
            for ds in SERVERS:
                assert script.stored[ds].get(chunk) == before[ds].get(chunk)

    for chunk in CHUNKS:
        if chunk not in refs:
            assert not any(chunk in script.stored[DataserverId(ds)] for ds in live)
    for chunk, (_version, _length, goal) in refs.items():
        effective, floor = floors[chunk]
        if floor:
            # Every live server can take a copy, except those holding a newer version.
            blocked = {ds for ds, c in newer if c == chunk and int(ds) in live}
            reachable = min(goal, len(live) - len(blocked))
            assert len(good_live(script, chunk, effective, live)) >= reachable, chunk
