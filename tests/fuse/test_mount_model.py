"""Model-based: random sequences of POSIX operations on the mount and on a local
directory; every result and every errno must be the same.

Each example runs in a fresh directory on both sides.  The seed is printed; replay a
failure with ``PAXFS_SEED=N`` (Hypothesis also prints the shrunk sequence).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import stat
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuse.conftest import LocalCluster

NAMES = ["a", "b", "c"]
EXAMPLES_MAX = int(os.environ.get("PAXFS_MODEL_EXAMPLES", "40"))
"""Examples per run; raise it with PAXFS_MODEL_EXAMPLES for a deeper search."""
STEPS_MAX = 25

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
contents = st.binary(max_size=3000)
offsets = st.integers(0, 600_000)

operations = st.one_of(
    st.tuples(st.just("write_file"), paths, contents),
    st.tuples(st.just("pwrite"), paths, offsets, contents),
    st.tuples(st.just("append"), paths, contents),
    st.tuples(st.just("truncate"), paths, offsets),
    st.tuples(st.just("read"), paths),
    st.tuples(st.just("mkdir"), paths),
    st.tuples(st.just("rmdir"), paths),
    st.tuples(st.just("unlink"), paths),
    st.tuples(st.just("rename"), paths, paths),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("symlink"), st.sampled_from(NAMES), paths),
    st.tuples(st.just("readlink"), paths),
    st.tuples(st.just("chmod"), paths, st.sampled_from([0o600, 0o644, 0o755, 0o1777])),
    st.tuples(st.just("stat"), paths),
    st.tuples(st.just("listdir"), st.sampled_from(["", *NAMES])),
    st.tuples(st.just("exclusive_create"), paths),
)


def apply(root: Path, operation: tuple[Any, ...]) -> Any:
    """Run one operation under ``root``; its observable result or ``("errno", code)``."""
    kind, *args = operation
    try:
        return _apply(root, kind, args)
    except OSError as error:
        return ("errno", errno.errorcode.get(error.errno or 0, error.errno))


def _apply(root: Path, kind: str, args: list[Any]) -> Any:
    if kind == "write_file":
        (root / args[0]).write_bytes(args[1])
        return None
    if kind == "pwrite":
        fd = os.open(root / args[0], os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            return os.pwrite(fd, args[2], args[1])
        finally:
            os.close(fd)
    if kind == "append":
        fd = os.open(root / args[0], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            return os.write(fd, args[1])
        finally:
            os.close(fd)
    if kind == "truncate":
        os.truncate(root / args[0], args[1])
        return None
    if kind == "read":
        return (root / args[0]).read_bytes()
    if kind == "mkdir":
        os.mkdir(root / args[0], 0o755)
        return None
    if kind == "rmdir":
        os.rmdir(root / args[0])
        return None
    if kind == "unlink":
        os.unlink(root / args[0])
        return None
    if kind == "rename":
        os.rename(root / args[0], root / args[1])
        return None
    if kind == "link":
        os.link(root / args[0], root / args[1], follow_symlinks=False)
        return None
    if kind == "symlink":
        os.symlink(args[0], root / args[1])
        return None
    if kind == "readlink":
        return os.readlink(root / args[0])
    if kind == "chmod":
        os.chmod(root / args[0], args[1], follow_symlinks=True)
        return None
    if kind == "stat":
        info = os.lstat(root / args[0])
        size = None if stat.S_ISDIR(info.st_mode) else info.st_size
        return (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), size, info.st_nlink)
    if kind == "listdir":
        return sorted(os.listdir(root / args[0]))
    if kind == "exclusive_create":
        os.close(os.open(root / args[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))
        return None
    raise AssertionError(f"unknown operation {kind}")


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root`` with its type, mode, size and contents."""
    result: dict[str, Any] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            info = os.lstat(path)
            entry: Any = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_nlink)
            if stat.S_ISREG(info.st_mode):
                entry += (path.read_bytes(),)
            elif stat.S_ISLNK(info.st_mode):
                entry += (os.readlink(path),)
            result[relative] = entry
    return result


def test_random_operation_sequences_match_a_local_directory(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    seed = int(os.environ.get("PAXFS_SEED", random.randrange(1 << 32)))
    print(f"model test seed {seed} (replay with PAXFS_SEED={seed})")
    counter = itertools.count()
    os.umask(0o022)

    @hypothesis.seed(seed)
    @settings(
        max_examples=EXAMPLES_MAX,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(st.lists(operations, min_size=1, max_size=STEPS_MAX))
    def check(sequence: list[tuple[Any, ...]]) -> None:
        number = next(counter)
        remote = cluster.mountpoint / f"model-{number}"
        local = tmp_path / f"model-{number}"
        remote.mkdir()
        local.mkdir()
        try:
            for step, operation in enumerate(sequence):
                expected = apply(local, operation)
                got = apply(remote, operation)
                assert got == expected, f"step {step}: {operation!r}"
            assert snapshot(remote) == snapshot(local)
        finally:
            shutil.rmtree(remote, ignore_errors=True)
            shutil.rmtree(local, ignore_errors=True)

    check()
