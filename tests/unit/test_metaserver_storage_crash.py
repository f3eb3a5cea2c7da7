"""kill -9 in the middle of appends: every acknowledged record survives, in order.

A child process appends from many concurrent tasks (single records and small batches, with
segments rolling over) and prints one line per append that returned. The test kills it with
SIGKILL after a seeded number of acknowledgements, reopens the directory and checks that every
acknowledged record is there under the number it was given; then lets a new child go on in
the same directory, for several rounds. Prints ``PAXFS_SEED=<n>``; rerun with it to replay.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from metaserver.storage import open_storage

SEED = int(os.environ.get("PAXFS_SEED") or random.SystemRandom().randrange(2**32))
REPO = Path(__file__).resolve().parents[2]
ROUNDS = 4
APPENDERS = 24
ACKS_MIN = 30
ACKS_MAX = 400
CHILD_TIMEOUT_S = 60

CHILD = """
import random, sys, trio
from metaserver.storage import StorageOptions, open_storage

directory, seed, round_number, appenders = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])

async def appender(storage, task):
    rng = random.Random(f"{seed}:{round_number}:{task}")
    sequence = 0
    while True:
        batch = []
        for _ in range(3 if task % 4 == 0 else 1):
            head = f"{round_number}:{task}:{sequence}:".encode()
            batch.append(head + rng.randbytes(rng.randrange(0, 1500)))
            sequence += 1
        numbers = await storage.append(batch)
        lengths = ",".join(str(len(p)) for p in batch)
        print(f"ACK {numbers.start} {task} {sequence - len(batch)} {lengths}", flush=True)

async def main():
    options = StorageOptions(segment_bytes_target=64 * 1024)
    async with open_storage(directory, "crash-cluster", options) as storage:
        print("OPEN", flush=True)
        async with trio.open_nursery() as nursery:
            for task in range(appenders):
                nursery.start_soon(appender, storage, task)

trio.run(main)
"""


def _run_round(directory: Path, round_number: int, acks_wanted: int) -> list[str]:
    """Start a child, read until ``acks_wanted`` acknowledgements, SIGKILL it; return all
    acknowledgement lines it printed before it died."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(SEED), str(round_number), str(APPENDERS)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    lines: list[str] = []
    try:
        for line in child.stdout:
            lines.append(line)
            if sum(1 for seen in lines if seen.startswith("ACK")) >= acks_wanted:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, errors = child.communicate(timeout=CHILD_TIMEOUT_S)
    lines.extend(rest.splitlines(keepends=True))
    assert child.returncode == -signal.SIGKILL, f"child died early: {errors}"
    assert lines and lines[0] == "OPEN\n", errors
    return [line for line in lines if line.startswith("ACK") and line.endswith("\n")]


async def test_acknowledged_records_survive_sigkill(tmp_path: Path) -> None:
    print(f"PAXFS_SEED={SEED}")
    rng = random.Random(SEED)
    acknowledged: dict[int, tuple[bytes, int]] = {}  # number -> (payload head, length)
    for round_number in range(ROUNDS):
        for line in _run_round(tmp_path, round_number, rng.randrange(ACKS_MIN, ACKS_MAX)):
            _, first, task, sequence, lengths = line.split()
            for i, length in enumerate(lengths.split(",")):
                head = f"{round_number}:{task}:{int(sequence) + i}:".encode()
                acknowledged[int(first) + i] = (head, int(length))
        async with open_storage(tmp_path, "crash-cluster") as storage:
            records = storage.recovered.records
        numbers = [record.number for record in records]
        assert numbers == list(range(1, len(records) + 1)), "record numbers must be contiguous"
        by_number = {record.number: record.payload for record in records}
        for number, (head, length) in acknowledged.items():
            payload = by_number.get(number)
            assert payload is not None, f"acknowledged record {number} lost (round {round_number})"
            assert payload.startswith(head) and len(payload) == length, f"record {number} differs"
        per_task: dict[bytes, list[int]] = {}
        for record in records:
            round_text, task, sequence, _ = record.payload.split(b":", 3)
            per_task.setdefault(round_text + b":" + task, []).append(int(sequence))
        assert all(seq == sorted(seq) for seq in per_task.values()), "a task's records reordered"
    assert len(acknowledged) >= ROUNDS * ACKS_MIN
