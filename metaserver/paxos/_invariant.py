"""Invariant checks for the consensus core that stay on under ``python -O``.

The core imports nothing of the project (not even ``wire``), so it carries its own
exception type; owners may catch :class:`PaxosInvariantError` to crash loudly.
"""


class PaxosInvariantError(AssertionError):
    """An internal rule of the consensus core was broken: a bug, never a peer's fault."""


def invariant(condition: bool, message: str) -> None:
    """Raise :class:`PaxosInvariantError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise PaxosInvariantError(message)
