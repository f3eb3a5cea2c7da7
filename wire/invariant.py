"""Invariant checks that stay on under ``python -O``."""


class InvariantViolation(AssertionError):
    """An internal invariant was broken: a bug, never a user error."""


def invariant(condition: bool, message: str) -> None:
    """Raise :class:`InvariantViolation` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvariantViolation(message)
