"""Metaserver group benchmark: metadata operations per second and latency, beside fsync.

Run ``python -m benchmarks.bench_metaserver [--seconds S] [--callers 1,16,64]``.  Starts
a group of 3 ``paxfs metaserver`` processes on loopback (default settings, real fsync, data
in a temporary directory on the disk under test) and, for each number of concurrent
callers, runs create, stat, rename and unlink phases one after the other.  Callers are
trio tasks in client processes of up to ``CALLERS_PER_PROCESS`` each (64 callers = 4
processes x 16), each process with one :class:`~fuse_client.meta_client.MetaClient`,
like a mount.  Every caller works on its own files in one shared directory:

* create: ``Mknod`` of a new name;
* stat: ``GetAttr`` of the caller's files (a linearizable read at the leader);
* rename: ``Rename`` of each file to a new name in the same directory;
* unlink: ``Unlink`` of the renamed files.

Printed per phase: operations per second (all callers, first start to last end), p50 and
p99 latency, and the CPU time each process spent per operation (leader, followers, all
client processes: what bounds throughput on a machine with few cores).  Beside them, the
fdatasync latency of a small append to a file in the same directory, measured in the
same run before and after the phases.  The issue's targets:
>= 5,000 creates/s and >= 20,000 stats/s with 64 callers; single-caller create p50 <=
2 x fsync p50 + 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from wire.address import parse_address

CALLERS_PER_PROCESS = 16
FSYNC_SAMPLES = 300
PHASES = ("create", "stat", "rename", "unlink")
WORKER_READY_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- the disk baseline


def fsync_latency_ms(directory: Path, samples: int = FSYNC_SAMPLES) -> tuple[float, float]:
    """(p50, p99) of a 160-byte append + fdatasync in ``directory``."""
    path = directory / "fsync-baseline.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    latencies = []
    try:
        for _ in range(samples):
            os.write(fd, b"x" * 160)
            started = time.perf_counter()
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return _percentile(latencies, 50) * 1e3, _percentile(latencies, 99) * 1e3


def _percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]


# ---------------------------------------------------------------- worker processes


async def _worker_main(addresses: str, key_hex: str, callers: int, tag: str) -> None:
    """One client process: ``callers`` tasks, phases on command from stdin."""
    from fuse_client.meta_client import open_meta_client
    from wire.errors import RpcError
    from wire.ids import ROOT_INODE
    from wire.namespace_ops import Lookup, Mkdir

    stdin = trio.wrap_file(sys.stdin)
    targets = [parse_address(a) for a in addresses.split(",")]
    async with open_meta_client(targets, bytes.fromhex(key_hex), name=f"bench-{tag}") as client:
        try:
            directory = (await client.mutate(Mkdir(ROOT_INODE, b"bench", 0o755))).attr.ino
        except RpcError:  # another client process made it first
            directory = (await client.query(Lookup(ROOT_INODE, b"bench"))).attr.ino
        worker = _Worker(client, directory, callers, tag)
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = (await stdin.readline()).strip()
            if not line or line == "exit":
                return
            phase, count_text, deadline_text = line.split()
            result = await worker.run(phase, int(count_text), float(deadline_text))
            print(json.dumps(result), flush=True)


class _Worker:
    """The callers of one client process; each keeps the inodes of the files it made."""

    def __init__(self, client: Any, directory: int, callers: int, tag: str) -> None:
        self.client = client
        self.directory = directory
        self.callers = callers
        self.tag = tag
        self.inodes: list[list[int]] = [[] for _ in range(callers)]
        self.renamed = [0] * callers

    async def run(self, phase: str, count: int, deadline: float) -> dict[str, Any]:
        latencies: list[float] = []
        start = time.time()
        async with trio.open_nursery() as nursery:
            for index in range(self.callers):
                nursery.start_soon(self._caller, index, phase, count, deadline, latencies)
        return {"ops": len(latencies), "start": start, "end": time.time(), "latencies": latencies}

    async def _caller(
        self, index: int, phase: str, count: int, deadline: float, latencies: list[float]
    ) -> None:
        from wire.namespace_ops import GetAttr, Mknod, Rename, Unlink

        client, directory, mine = self.client, self.directory, self.inodes[index]
        for i in range(count):
            if time.time() > deadline or (phase != "create" and not mine):
                return
            if (phase == "rename" and i >= len(mine)) or (
                phase == "unlink" and i >= self.renamed[index]
            ):
                return
            name = f"{self.tag}-{index}-{i}".encode()
            started = time.perf_counter()
            if phase == "create":
                mine.append((await client.mutate(Mknod(directory, name, 0o644))).attr.ino)
            elif phase == "stat":
                await client.query(GetAttr(mine[i % len(mine)]))
            elif phase == "rename":
                await client.mutate(Rename(directory, name, directory, name + b"-r"))
                self.renamed[index] += 1
            else:
                await client.mutate(Unlink(directory, name + b"-r"))
            latencies.append(time.perf_counter() - started)


# ---------------------------------------------------------------- the driver


@dataclass
class PhaseResult:
    phase: str
    callers: int
    ops: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_op: dict[str, float]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WorkerPool:
    """Client processes sharing ``callers`` tasks between them."""

    def __init__(self, addresses: str, key: bytes, callers: int, run_tag: str) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        per_process = [CALLERS_PER_PROCESS] * (callers // CALLERS_PER_PROCESS)
        if callers % CALLERS_PER_PROCESS:
            per_process.append(callers % CALLERS_PER_PROCESS)
        for index, count in enumerate(per_process):
            argv = [sys.executable, "-m", "benchmarks.bench_metaserver", "--worker"]
            argv += [addresses, key.hex(), str(count), f"{run_tag}w{index}"]
            self.processes.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for process in self.processes:
            assert process.stdout is not None
            ready = process.stdout.readline()
            if not ready:
                raise RuntimeError("a benchmark client process failed to start")

    def run(
        self, phase: str, count: int, seconds: float, callers: int, servers: dict[str, int]
    ) -> PhaseResult:
        """One phase; ``servers`` names server pids whose CPU time per op is reported."""
        pids = {**servers, **{f"client{i}": p.pid for i, p in enumerate(self.processes)}}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        deadline = time.time() + seconds
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"{phase} {count} {deadline}\n")
            process.stdin.flush()
        results: list[dict[str, Any]] = []
        for process in self.processes:
            assert process.stdout is not None
            results.append(json.loads(process.stdout.readline()))
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        latencies = [lat for r in results for lat in r["latencies"]]
        ops = sum(r["ops"] for r in results)
        clients_cpu = sum(v for k, v in cpu.items() if k.startswith("client"))
        per_op = {k: v * 1e6 / max(1, ops) for k, v in cpu.items() if not k.startswith("client")}
        per_op["clients"] = clients_cpu * 1e6 / max(1, ops)
        elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
        return PhaseResult(
            phase,
            callers,
            ops,
            ops / elapsed if elapsed > 0 else 0.0,
            _percentile(latencies, 50) * 1e3 if latencies else 0.0,
            _percentile(latencies, 99) * 1e3 if latencies else 0.0,
            per_op,
        )

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                assert process.stdin is not None
                process.stdin.write("exit\n")
                process.stdin.flush()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_benchmark(directory: Path, callers_list: list[int], seconds: float) -> None:
    from tests.proc.metaserver_harness import MetaserverGroup

    fsync_before = fsync_latency_ms(directory)
    print(
        f"fsync (160-byte append + fdatasync) in {directory}: "
        f"p50 {fsync_before[0]:.3f} ms, p99 {fsync_before[1]:.3f} ms"
    )
    group = MetaserverGroup(directory, 3, settings={})
    results: list[PhaseResult] = []
    try:
        for node_id in group.nodes:
            group.start(node_id)
        leader = trio.run(group.wait_for_leader)
        print(f"3 metaservers on loopback, leader {leader}; {seconds:g} s per phase at most")
        servers = {
            ("leader" if i == leader else f"follower{i}"): node.process.pid
            for i, node in group.nodes.items()
            if node.process.pid is not None
        }
        addresses = ",".join(str(a) for a in group.addresses())
        for callers in callers_list:
            pool = WorkerPool(addresses, group.key, callers, f"c{callers}")
            try:
                count = max(50, int(40_000 / callers))
                for phase in PHASES:
                    result = pool.run(phase, count, seconds, callers, servers)
                    results.append(result)
                    cpu = "  ".join(f"{k} {v:,.0f}" for k, v in result.cpu_us_per_op.items())
                    print(
                        f"{callers:3d} callers  {phase:<6}  {result.ops_per_s:9,.0f} ops/s"
                        f"  p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms"
                        f"  ({result.ops:,} ops; CPU us/op: {cpu})",
                        flush=True,
                    )
            finally:
                pool.close()
    finally:
        group.stop_all()
    fsync_after = fsync_latency_ms(directory)
    fsync_p50 = (fsync_before[0] + fsync_after[0]) / 2
    print(
        f"fsync after the phases: p50 {fsync_after[0]:.3f} ms, p99 {fsync_after[1]:.3f} ms"
        f"  (mean p50 {fsync_p50:.3f} ms)"
    )
    _print_targets(results, fsync_p50)


def _print_targets(results: list[PhaseResult], fsync_p50_ms: float) -> None:
    by_key = {(r.phase, r.callers): r for r in results}
    checks = []
    if ("create", 64) in by_key:
        checks.append(
            ("creates/s with 64 callers >= 5,000", by_key[("create", 64)].ops_per_s, 5000)
        )
    if ("stat", 64) in by_key:
        checks.append(("stats/s with 64 callers >= 20,000", by_key[("stat", 64)].ops_per_s, 20000))
    for label, value, target in checks:
        verdict = "met" if value >= target else "NOT met"
        print(f"target {label}: {value:,.0f} ({verdict})")
    single = by_key.get(("create", 1))
    if single is not None:
        bound = 2 * fsync_p50_ms + 1
        verdict = "met" if single.p50_ms <= bound else "NOT met"
        print(
            f"target single-caller create p50 <= 2 x fsync p50 + 1 ms = {bound:.3f} ms: "
            f"{single.p50_ms:.3f} ms ({verdict})"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        addresses, key_hex, callers, tag = sys.argv[2:6]
        trio.run(_worker_main, addresses, key_hex, int(callers), tag)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="longest phase (default 3)")
    parser.add_argument("--callers", default="1,16,64", help="concurrent callers to try")
    parser.add_argument("--dir", default=None, help="directory on the disk under test")
    args = parser.parse_args()
    callers_list = [int(c) for c in args.callers.split(",")]
    with tempfile.TemporaryDirectory(prefix="paxfs-bench-ms-", dir=args.dir) as directory:
        run_benchmark(Path(directory), callers_list, args.seconds)


if __name__ == "__main__":
    main()
