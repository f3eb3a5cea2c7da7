"""``paxfs admin report``, ``fileinfo`` and ``fsck`` against real processes.

Three metaservers and four dataservers (goal 3, 256 KiB chunks; see
:mod:`tests.proc.test_cluster_harness`); the tool runs as its own process.  Randomised
data prints its seed; replay with ``PAXFS_SEED=N``.
"""

from __future__ import annotations

from pathlib import Path

from tests.proc.test_admin_harness import (
    admin,
    admin_json,
    restart_dataserver,
    wait_out_of_safe_mode,
)
from tests.proc.test_cluster_harness import (
    BLOCK_DATA_OFFSET,
    CHUNK_BYTES,
    expected_chunks,
    flip_bit,
    running_cluster,
    seeded_rng,
    wait_for,
)


async def test_report_and_fileinfo_show_what_the_dataservers_store(tmp_path: Path) -> None:
    rng = seeded_rng()
    sizes = {b"a": 3 * CHUNK_BYTES + 17, b"b": CHUNK_BYTES, b"c": 1000}
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inodes = {}
        for name, size in sizes.items():
            inodes[name] = await client.write_file(name, rng.randbytes(size))
        await wait_out_of_safe_mode(cluster)
        report = await admin_json(cluster, "report")

        leader = await cluster.leader()
        assert report["leader_id"] == leader
        roles = {m["node_id"]: m["role"] for m in report["metaservers"]}
        assert roles == {i: "leader" if i == leader else "follower" for i in (1, 2, 3)}
        assert all(m["applied_index"] > 0 and m["lag_slots"] == 0 for m in report["metaservers"])

        chunks = sum(len(expected_chunks(b"x" * size)) for size in sizes.values())
        servers = report["dataservers"]
        assert {s["address"] for s in servers} == {n.address for n in cluster.dataservers}
        assert all(s["state"] == "live" for s in servers)
        stored = {n.address: len(n.stored()) for n in cluster.dataservers}
        assert {s["address"]: s["replicas"] for s in servers} == stored
        assert sum(stored.values()) == 3 * chunks
        assert all(s["used_bytes"] > 0 for s in servers if s["replicas"])

        health = report["health"]
        assert health["chunks_referenced"] == chunks
        assert health["matrix"] == [{"goal": 3, "replicas": 3, "chunks": chunks}]
        assert health["matrix_readable"] == health["matrix"]
        for counter in ("under_replicated", "over_replicated", "missing", "corrupt_replicas"):
            assert health[counter] == 0, counter
        assert health["repair"]["bytes_wanted"] == 0 and health["repair"]["eta_s"] is None

        info = await admin_json(cluster, "fileinfo", "/a")
        assert info["size"] == sizes[b"a"] and info["goal"] == 3 and info["ok"]
        located = await client.locate(inodes[b"a"])
        assert [c["index"] for c in info["chunks"]] == [c.index for c in located.chunks]
        for shown, chunk in zip(info["chunks"], located.chunks, strict=True):
            assert shown["chunk"] == f"{chunk.chunk:#x}" and shown["health"] == "healthy"
            addresses = {r["address"] for r in shown["replicas"]}
            assert addresses == cluster.holders(chunk.chunk, chunk.version)
            assert all(r["counted"] and not r["corrupt"] for r in shown["replicas"])

        text = await admin(cluster, "report")
        assert text.returncode == 0 and "Metaserver group" in text.stdout


async def test_fsck_finds_a_flipped_bit_and_passes_again_once_it_is_repaired(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    data = rng.randbytes(2 * CHUNK_BYTES + 5)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"victim", data)
        await client.write_file(b"bystander", rng.randbytes(CHUNK_BYTES))
        await wait_out_of_safe_mode(cluster)
        healthy = await admin_json(cluster, "fsck", "/", "--verify-checksums")
        assert healthy["healthy"] and healthy["summary"]["files"] == 2
        assert healthy["summary"]["replicas_verified"] == 3 * 4
        assert healthy["summary"]["replicas_bad"] == 0

        chunk = (await client.locate(inode)).chunks[1]
        bad = cluster.by_address(chunk.replicas[0])
        flip_bit(bad.replica_path(chunk.chunk, chunk.version), BLOCK_DATA_OFFSET + 777)
        # Without reading, nobody can know yet: the replica map says healthy.
        assert (await admin(cluster, "fsck", "/")).returncode == 0

        found = await admin_json(cluster, "fsck", "/", "--verify-checksums", expect=1)
        assert not found["healthy"] and found["summary"]["replicas_bad"] == 1
        (file,) = found["files"]
        assert file["path"] == "/victim" and not file["ok"]
        (judged,) = file["chunks"]
        assert judged["index"] == 1 and judged["chunk"] == f"{chunk.chunk:#x}"
        (problem,) = judged["problems"]
        assert bad.address in problem and "EBADMSG" in problem

        async def repaired() -> bool:
            return (await admin(cluster, "fsck", "/", "--verify-checksums")).returncode == 0

        # The dataserver reported its bad replica when fsck read it: it is replaced.
        await wait_for(repaired, "the corrupt replica to be replaced", 20)
        assert bad.address not in (await client.locate(inode)).chunks[1].replicas

        first = (await client.locate(inode)).chunks[0]
        rotten = cluster.by_address(first.replicas[-1])
        flip_bit(rotten.replica_path(first.chunk, first.version), BLOCK_DATA_OFFSET + 99)
        listed = await admin(cluster, "fsck", "/", "--verify-checksums", "--list-corrupt")
        assert listed.returncode == 1
        assert f"/victim chunk 0 ({first.chunk:#x}): replica on {rotten.address}" in listed.stdout
        await wait_for(repaired, "the second corrupt replica to be replaced", 20)
        assert await client.read(inode) == data


async def test_the_scrubber_finds_flipped_bits_nobody_reads_and_the_replica_is_replaced(
    tmp_path: Path,
) -> None:
    rng = seeded_rng()
    data = rng.randbytes(CHUNK_BYTES)
    async with running_cluster(tmp_path) as cluster, cluster.client() as client:
        inode = await client.write_file(b"f", data)
        (chunk,) = (await client.locate(inode)).chunks
        bad = cluster.by_address(chunk.replicas[0])
        assert bad.process.stop() == 0
        flip_bit(bad.replica_path(chunk.chunk, chunk.version), BLOCK_DATA_OFFSET + 4321)
        bad.process.start()
        await wait_out_of_safe_mode(cluster)
        # The replica map does not know yet: every replica counts.
        info = await admin_json(cluster, "fileinfo", "/f")
        assert info["chunks"][0]["counted"] == 3
        restart_dataserver(bad, "--scrub-rate-mib-s", "64")

        async def replaced() -> bool:
            located = (await client.locate(inode)).chunks[0]
            return (
                bad.address not in located.replicas
                and len(set(located.replicas)) == 3
                and chunk.chunk not in bad.stored()
            )

        await wait_for(replaced, "the scrubber's finding to be replaced", 30)
        assert "scrubber" in bad.process.log_text()
        assert (await admin(cluster, "fsck", "/", "--verify-checksums")).returncode == 0
        assert await client.read(inode) == data


MISTAKES = [
    (["fileinfo", "/nope"], "/nope: no such file or directory"),
    (["fileinfo", "/"], "/ is a directory"),
    (["fsck", "/nope"], "/nope: no such file or directory"),
    (["decommission", "ffffffff"], "no dataserver ffffffff"),
    (["decommission", "zz"], "neither a dataserver id"),
    (["setgoal", "0", "/"], "goal 0 is outside 1..16"),
    (["balance"], "1 live dataservers to balance; at least 2 are needed"),
]
"""Run-time mistakes (exit status 1); usage mistakes are tested without a cluster in
tests/unit/test_admin_cli.py."""


async def test_mistakes_get_one_clear_line_and_the_right_exit_status(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, dataservers=1, replication=1) as cluster:
        await wait_out_of_safe_mode(cluster)
        for args, complaint in MISTAKES:
            result = await admin(cluster, *args)
            assert result.returncode == 1, (args, result)
            assert complaint in result.stderr, (args, result.stderr)
            assert result.stderr.count("\n") == 1, (args, result.stderr)
