"""What a metaserver does with its data directory after a crash, damage or loss.

A torn last record is cut and the replica catches up; a corrupt record in the middle of
the log, a directory of another cluster, an unknown format version, and an emptied
directory of a replica that took part before are all refused with one clear line and a
non-zero exit.  Real processes, real disks.
"""

from __future__ import annotations

from pathlib import Path

import trio

from tests.proc.metaserver_harness import (
    KEY,
    MetaserverGroup,
    NamespaceWorkload,
    metaserver_group,
    paxfs_argv,
    seed_for,
    toml_config,
)

REFUSAL_TIMEOUT_S = 15.0


def _segments(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("log-*.seg"))


async def _run_for(workload: NamespaceWorkload, seconds: float) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workload.run, stop)
        await trio.sleep(seconds)
        stop.set()
    assert not workload.errors, workload.errors[:5]


async def _assert_refused(group: MetaserverGroup, node_id: int, *needles: str) -> str:
    """Start ``node_id``; it must exit non-zero with one line naming ``needles``."""
    process = group.start(node_id)
    status = await process.wait_exit(REFUSAL_TIMEOUT_S)
    last_line = process.log_text().strip().splitlines()[-1]
    assert status == 1, f"exit status {status}: {last_line}"
    assert last_line.startswith("paxfs metaserver: "), last_line
    for needle in needles:
        assert needle in last_line, f"{needle!r} not in {last_line!r}"
    return last_line


async def test_a_torn_last_record_is_cut_and_the_replica_catches_up(tmp_path: Path) -> None:
    seed = seed_for("torn-tail")
    async with metaserver_group(tmp_path) as group, group.client() as client:
        workload = NamespaceWorkload([client], seed)
        await _run_for(workload, 1.0)
        group.kill(1)
        segment = _segments(group.nodes[1].data_dir)[-1]
        size = segment.stat().st_size
        with open(segment, "r+b") as handle:
            handle.truncate(size - 3)
        await _run_for(workload, 0.5)
        group.start(1)
        await group.wait_equal_digests(list(group.nodes))
        assert "cutting a torn tail" in group.nodes[1].process.log_text()
        await workload.verify(client)


async def test_damage_foreign_data_and_a_lost_disk_are_refused(tmp_path: Path) -> None:
    seed = seed_for("refusals")
    async with metaserver_group(tmp_path) as group:
        async with group.client() as client:
            await _run_for(NamespaceWorkload([client], seed), 1.0)
        # The leader survives: followers talk only to the leader, so it is the replica
        # sure to have heard from the one whose disk is lost below.
        leader = await group.wait_for_leader()
        damaged, lost = sorted(set(group.nodes) - {leader})
        for node_id in (damaged, lost):
            group.kill(node_id)

        # Another cluster's key names another cluster: its directories are not ours.
        node = group.nodes[damaged]
        other = tmp_path / "other-cluster.toml"
        other_key = bytes(b ^ 0xFF for b in KEY)
        other.write_text(
            toml_config(
                {
                    "cluster": {
                        "key": other_key.hex(),
                        "metaservers": {str(i): str(n.address) for i, n in group.nodes.items()},
                    }
                }
            )
        )
        node.process.argv = paxfs_argv(
            "metaserver", other, "--id", str(damaged), "--data", str(node.data_dir)
        )
        node.process.start()
        status = await node.process.wait_exit(REFUSAL_TIMEOUT_S)
        last_line = node.process.log_text().strip().splitlines()[-1]
        assert status == 1 and "belongs to cluster" in last_line, last_line

        # A damaged record with valid records after it is corruption, never a torn tail.
        segment = _segments(node.data_dir)[-1]
        data = bytearray(segment.read_bytes())
        middle = len(data) // 3
        data[middle] ^= 0x5A
        segment.write_bytes(bytes(data))
        await _assert_refused(group, damaged, "corrupt at byte offset", segment.name)

        # A format this paxfs does not know.
        format_file = group.nodes[lost].data_dir / "FORMAT"
        format_file.write_text(format_file.read_text().replace("storage 1\n", "storage 99\n"))
        await _assert_refused(group, lost, "format 99")

        # A replica that took part and lost its disk must not come back under its id.
        group.wipe(lost)
        await _assert_refused(group, lost, "took part", "new id")
