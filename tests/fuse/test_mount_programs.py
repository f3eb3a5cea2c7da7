"""Real programs in the mount: git, tar, cp -a + diff -r, rm -rf of 10,000 files, SQLite."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TREE_FILES = 10_000
FILL_THREADS = 16


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def make_tree(root: Path) -> None:
    """A small source-like tree: nested dirs, text and binary files, a symlink, modes."""
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "docs").mkdir()
    for index in range(30):
        (root / "src" / "pkg" / f"module{index}.py").write_text(
            f"def f{index}():\n    return {index}\n" * 20
        )
    (root / "docs" / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "README").write_text("hello\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("README", root / "LINK")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_init_add_commit_log(workdir: Path) -> None:
    repo = workdir / "repo"
    repo.mkdir()
    make_tree(repo)
    run("git", "init", "-q", cwd=repo)
    run("git", "config", "user.email", "t@example.com", cwd=repo)
    run("git", "config", "user.name", "Tester", cwd=repo)
    run("git", "add", ".", cwd=repo)
    run("git", "commit", "-q", "-m", "first", cwd=repo)
    (repo / "README").write_text("hello again\n")
    run("git", "commit", "-q", "-am", "second", cwd=repo)
    log = run("git", "log", "--format=%s", cwd=repo)
    assert log.split() == ["second", "first"]
    run("git", "fsck", "--strict", cwd=repo)
    assert run("git", "status", "--porcelain", cwd=repo) == ""


@pytest.mark.skipif(shutil.which("tar") is None, reason="tar is not installed")
def test_tar_extract_then_create_round_trip(workdir: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    archive = tmp_path / "tree.tar"
    run("tar", "cf", str(archive), "-C", str(source), ".", cwd=tmp_path)
    target = workdir / "extracted"
    target.mkdir()
    run("tar", "xpf", str(archive), "-C", str(target), cwd=tmp_path)
    again = tmp_path / "again.tar"
    run("tar", "cf", str(again), "-C", str(target), ".", cwd=tmp_path)
    listing = run("tar", "tvf", str(archive), cwd=tmp_path)
    listing_again = run("tar", "tvf", str(again), cwd=tmp_path)
    assert sorted(_names_modes_sizes(listing)) == sorted(_names_modes_sizes(listing_again))
    back = tmp_path / "back"
    back.mkdir()
    run("tar", "xf", str(again), "-C", str(back), cwd=tmp_path)
    run("diff", "-r", "--no-dereference", str(source), str(back), cwd=tmp_path)


def _names_modes_sizes(listing: str) -> list[tuple[str, str, str]]:
    rows = []
    for line in listing.splitlines():
        fields = line.split()
        rows.append((fields[0], fields[2], " ".join(fields[5:])))
    return rows


def test_cp_a_and_diff_r(workdir: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    run("cp", "-a", str(source), str(workdir / "copy"), cwd=tmp_path)
    run("diff", "-r", "--no-dereference", str(source), str(workdir / "copy"), cwd=tmp_path)
    run("cp", "-a", str(workdir / "copy"), str(tmp_path / "back"), cwd=tmp_path)
    run("diff", "-r", "--no-dereference", str(source), str(tmp_path / "back"), cwd=tmp_path)
    assert os.stat(workdir / "copy" / "run.sh").st_mode & 0o777 == 0o755
    assert (
        os.stat(workdir / "copy" / "README").st_mtime_ns == os.stat(source / "README").st_mtime_ns
    )


def test_rm_rf_of_a_tree_of_10000_files(workdir: Path) -> None:
    root = workdir / "tree"
    directories = [root / f"d{top}" / f"e{middle}" for top in range(10) for middle in range(10)]

    def fill(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for leaf in range(TREE_FILES // len(directories)):
            os.close(os.open(directory / f"f{leaf}", os.O_CREAT | os.O_WRONLY, 0o644))

    # Creates in one directory serialise on its lock in the kernel; fill many at once.
    with ThreadPoolExecutor(FILL_THREADS) as pool:
        list(pool.map(fill, directories))
    assert sum(len(files) for _, _, files in os.walk(root)) == TREE_FILES
    run("rm", "-rf", str(root), cwd=workdir)
    assert not root.exists()
    assert os.listdir(workdir) == []


def test_sqlite_database(workdir: Path) -> None:
    path = workdir / "db.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("create table t (id integer primary key, name text, blob blob)")
    for batch in range(20):
        connection.executemany(
            "insert into t (name, blob) values (?, ?)",
            [(f"row {batch}-{n}", os.urandom(200)) for n in range(100)],
        )
        connection.commit()
    connection.execute("delete from t where id % 3 = 0")
    connection.commit()
    connection.execute("vacuum")
    connection.close()
    connection = sqlite3.connect(path)
    assert connection.execute("pragma integrity_check").fetchone() == ("ok",)
    assert connection.execute("select count(*) from t").fetchone() == (2000 - 2000 // 3,)
    connection.close()
