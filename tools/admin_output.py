"""How the admin tools print: rich tables for people, JSON for programs.

JSON output is one document on stdout, built from the tools' own dataclasses and the wire
messages they received by :func:`json_ready`: field names kept, dataserver ids as 16 hex
digits (as the logs print them), chunk ids as ``0x...``, enums by value, chunk access
tokens left out.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console

DATASERVER_ID_KEYS = frozenset(
    {"dataserver_id", "dataserver", "source", "target", "holders", "dataservers_excluded"}
)
CHUNK_ID_KEYS = frozenset({"chunk"})
HIDDEN_KEYS = frozenset({"token"})
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


PIPED_WIDTH = 160
"""Columns of output that goes to a file or a pipe (a terminal's own width otherwise)."""


def console() -> Console:
    """The console tables and progress bars go to (stdout; no colour when piped)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)


def plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def ds_id(value: int) -> str:
    return f"{value:016x}"


def chunk_id(value: int) -> str:
    return f"{value:#x}"


def human_bytes(value: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(value)
    for unit in UNITS:
        if abs(size) < 1024 or unit == UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    seconds = int(round(value))
    if seconds < 60:
        return f"{value:.1f} s" if value < 10 else f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def _convert(value: Any, key: str) -> Any:
    if isinstance(value, enum.Enum):
        return value.value if not isinstance(value.value, int) else value.name.lower()
    if isinstance(value, bool) or value is None or isinstance(value, (float, str)):
        return value
    if isinstance(value, int):
        if key in DATASERVER_ID_KEYS:
            return ds_id(value)
        if key in CHUNK_ID_KEYS:
            return chunk_id(value)
        return int(value)
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _convert(getattr(value, field.name), field.name)
            for field in dataclasses.fields(value)
            if field.name not in HIDDEN_KEYS
        }
    if isinstance(value, Mapping):
        return {
            str(_convert(k, key)): _convert(v, k if isinstance(k, str) else key)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_convert(item, key) for item in items]
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON values (see the module docstring)."""
    return _convert(value, "")


def print_json(value: Any) -> None:
    json.dump(json_ready(value), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
