"""Scripted interaction tests: each ``scripts/*.txt`` replays events and must print the
expected trace exactly. Regenerate on purpose with ``PAXFS_REWRITE_SCRIPTS=1``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.sim.interaction import comments_by_block, parse_script, render_script, run_script

SCRIPTS = sorted((Path(__file__).parent / "scripts").glob("*.txt"))


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) >= 6


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_produces_the_expected_trace(path: Path) -> None:
    text = path.read_text()
    results = run_script(text)
    if os.environ.get("PAXFS_REWRITE_SCRIPTS"):
        header, _ = parse_script(text)
        blocks = [(command, actual) for command, _, actual, _ in results]
        path.write_text(render_script(header, blocks, comments_by_block(text)))
        return
    for command, expected, actual, line in results:
        assert actual == expected, (
            f"{path.name}:{line}: {command}\n--- expected\n{expected}\n--- actual\n{actual}"
        )
