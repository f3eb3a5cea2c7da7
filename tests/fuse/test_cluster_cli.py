"""``paxfs cluster up|down|status`` and ``paxfs mount`` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.fuse.conftest import (
    REPO_ROOT,
    LocalCluster,
    cluster_directory,
    paxfs,
    poll,
    running_cluster,
)
from tools.local_cluster import _pid_alive, is_mounted, paxfs_command


def _processes_with(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (to check that a daemon exited)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in command and "pytest" not in command:
            pids.append(int(entry.name))
    return pids


def test_up_status_down_up_again() -> None:
    with running_cluster() as cluster:
        directory = str(cluster.directory)
        (cluster.mountpoint / "kept").write_bytes(b"survives a restart")
        again = paxfs("cluster", "up", "--dir", directory, "--mount", str(cluster.mountpoint))
        assert "already running" in again.stdout
        status = json.loads(paxfs("cluster", "status", "--dir", directory, "--json").stdout)
        assert status["healthy"] is True
        assert status["mounted"] is True
        assert status["leader_id"] is not None
        assert status["live_dataservers"] == 3
        pids = [p["pid"] for p in status["processes"]]
        assert len(pids) == 7
        down = paxfs("cluster", "down", "--dir", directory)
        assert "stopped" in down.stdout
        assert not is_mounted(str(cluster.mountpoint))
        assert not any(_pid_alive(pid, "") for pid in pids)
        stopped = paxfs("cluster", "status", "--dir", directory, check=False)
        assert stopped.returncode == 1 and "not running" in stopped.stdout
        paxfs("cluster", "up", "--dir", directory, "--mount", str(cluster.mountpoint))
        assert (cluster.mountpoint / "kept").read_bytes() == b"survives a restart"
        plain = paxfs("cluster", "status", "--dir", directory)
        assert "healthy" in plain.stdout


def test_up_restarts_a_dead_process(cluster: LocalCluster) -> None:
    victim = next(r for r in cluster.layout().processes if r.role == "dataserver")
    os.kill(victim.pid, signal.SIGKILL)
    poll(lambda: not victim.alive(), "the dataserver to die")
    result = paxfs("cluster", "up", "--dir", str(cluster.directory))
    assert victim.name in result.stdout
    restarted = next(r for r in cluster.layout().processes if r.name == victim.name)
    assert restarted.pid != victim.pid and restarted.alive()


def test_status_of_a_directory_without_a_cluster(tmp_path: Path) -> None:
    result = paxfs("cluster", "status", "--dir", str(tmp_path), check=False)
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    down = paxfs("cluster", "down", "--dir", str(tmp_path))
    assert "nothing to stop" in down.stdout


def test_mount_errors_are_one_line(cluster: LocalCluster, tmp_path: Path) -> None:
    missing = paxfs("mount", "-c", str(cluster.config_path), str(tmp_path / "nope"), check=False)
    assert missing.returncode == 1
    assert "not a directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    no_config = paxfs("mount", str(tmp_path), check=False)
    assert no_config.returncode == 2
    assert "metaservers" in no_config.stderr


def test_mount_daemon_returns_when_live_and_exits_on_fusermount_u(cluster: LocalCluster) -> None:
    with cluster_directory() as directory:
        mountpoint = directory / "daemon-mnt"
        mountpoint.mkdir()
        log = directory / "daemon.log"
        paxfs("mount", "-c", str(cluster.config_path), "--log", str(log), str(mountpoint))
        assert is_mounted(str(mountpoint))
        (mountpoint / "from-daemon").write_bytes(b"hello")
        assert (cluster.mountpoint / "from-daemon").read_bytes() == b"hello"
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        poll(lambda: not _processes_with(str(mountpoint)), "the mount daemon to exit")
        assert "unmounted" in log.read_text()


def test_mount_sigterm_publishes_open_files_and_unmounts(cluster: LocalCluster) -> None:
    with cluster_directory() as directory:
        mountpoint = directory / "fg-mnt"
        mountpoint.mkdir()
        process = subprocess.Popen(
            paxfs_command("mount", "-c", str(cluster.config_path), "--foreground", str(mountpoint)),
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            poll(lambda: is_mounted(str(mountpoint)), "the foreground mount")
            handle = open(mountpoint / "open-at-exit", "wb")  # noqa: SIM115
            handle.write(b"buffered")
            handle.flush()  # to the mount's write-back buffer, not closed
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
            assert not is_mounted(str(mountpoint))
            try:
                handle.close()
            except OSError:
                pass  # the mount is gone under the descriptor
            assert (cluster.mountpoint / "open-at-exit").read_bytes() == b"buffered"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
