"""The metaserver leader killed (``kill -9``) while a workload runs in the mount: the
workload finishes without one error, and ``cluster up`` brings the dead replica back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from tests.fuse.conftest import LocalCluster, paxfs, poll

WORKLOAD_ROUNDS = 60


def workload(root: Path, errors: list[BaseException], progress: list[int]) -> None:
    """Metadata and data operations in a loop, each checked."""
    try:
        root.mkdir()
        for round_number in range(WORKLOAD_ROUNDS):
            directory = root / f"d{round_number}"
            directory.mkdir()
            payload = os.urandom(50_000 + round_number)
            (directory / "file").write_bytes(payload)
            os.rename(directory / "file", directory / "renamed")
            assert (directory / "renamed").read_bytes() == payload
            os.symlink("renamed", directory / "link")
            assert sorted(os.listdir(directory)) == ["link", "renamed"]
            if round_number % 3 == 0:
                os.unlink(directory / "link")
            progress.append(round_number)
    except BaseException as error:  # noqa: BLE001 - handed to the test thread
        errors.append(error)


def leader_record(cluster: LocalCluster) -> tuple[int, int]:
    status = json.loads(
        paxfs("cluster", "status", "--dir", str(cluster.directory), "--json", check=False).stdout
    )
    leader = status["leader_id"]
    assert leader is not None, status
    record = next(p for p in status["processes"] if p["name"] == f"metaserver-{leader}")
    return leader, record["pid"]


def test_leader_killed_during_a_workload(cluster: LocalCluster) -> None:
    errors: list[BaseException] = []
    progress: list[int] = []
    worker = threading.Thread(
        target=workload, args=(cluster.mountpoint / "failover", errors, progress)
    )
    worker.start()
    poll(lambda: len(progress) >= 5 or errors or not worker.is_alive(), "the workload to start")
    leader, pid = leader_record(cluster)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    worker.join(timeout=300)
    if worker.is_alive() or errors:
        print(cluster.logs())
    assert not worker.is_alive(), "the workload hung after the leader was killed"
    assert not errors, f"the workload failed after the leader was killed: {errors[0]!r}"
    assert progress[-1] == WORKLOAD_ROUNDS - 1
    print(f"leader {leader} killed; workload finished {time.monotonic() - killed_at:.1f} s later")
    new_leader, _ = leader_record(cluster)
    assert new_leader != leader
    paxfs("cluster", "up", "--dir", str(cluster.directory))
    status = json.loads(
        paxfs("cluster", "status", "--dir", str(cluster.directory), "--json", check=False).stdout
    )
    assert status["healthy"] is True
    assert all(process["alive"] for process in status["processes"])
