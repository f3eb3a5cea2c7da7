"""The consensus core is pure: it imports no I/O, clock, randomness or project code."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "metaserver" / "paxos"
FORBIDDEN_MODULES = {
    "trio",
    "socket",
    "os",
    "time",
    "random",
    "asyncio",
    "threading",
    "multiprocessing",
    "subprocess",
    "select",
    "selectors",
    "datetime",
    "secrets",
    "io",
    "pathlib",
}
PROJECT_PACKAGES = {"wire", "metaserver", "dataserver", "fuse_client", "tools", "tests"}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            names.append(node.module or "")
    return names


def test_the_core_has_files_to_check() -> None:
    assert (CORE / "node.py").exists()


def test_the_core_imports_no_io_clock_randomness_or_concurrency() -> None:
    for path in sorted(CORE.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_MODULES, f"{path.name} imports {name}"


def test_the_core_imports_nothing_of_the_project_outside_itself() -> None:
    for path in sorted(CORE.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES:
                assert name == "metaserver.paxos" or name.startswith("metaserver.paxos."), (
                    f"{path.name} imports {name}"
                )


def test_the_checker_itself_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os.path\nfrom time import monotonic\nfrom wire import schema\n")
    assert [n.split(".")[0] for n in _imports(sample)] == ["os", "time", "wire"]
