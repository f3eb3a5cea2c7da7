"""The rooms of the repository import downward only (DESIGN.md, "Repository layout").

``tools -> fuse_client -> wire``, ``metaserver -> wire``, ``dataserver -> wire``;
the Paxos core imports nothing of the project; no server imports another's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("wire", "metaserver", "dataserver", "fuse_client", "tools")
ALLOWED: dict[str, set[str]] = {
    "wire": {"wire"},
    "metaserver": {"metaserver", "wire"},
    "dataserver": {"dataserver", "wire"},
    "fuse_client": {"fuse_client", "wire"},
    "tools": set(ROOMS),
}


def _project_imports(path: Path) -> set[str]:
    """Top-level project packages imported by one module (absolute imports)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.add(name)
    return found


def _modules(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_the_rooms_below_it(room: str) -> None:
    offenders = []
    for path in _modules(room):
        for name in _project_imports(path):
            top = name.split(".")[0]
            if top in ROOMS and top not in ALLOWED[room]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_paxos_core_imports_nothing_of_the_project() -> None:
    offenders = []
    for path in _modules("metaserver/paxos"):
        for name in _project_imports(path):
            if name.split(".")[0] in ROOMS and not name.startswith("metaserver.paxos"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)
