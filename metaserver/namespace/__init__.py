"""The paxfs namespace: a pure, deterministic POSIX metadata state machine.

Public API (everything else in this package is private):

* :class:`Namespace` — ``apply(command) -> reply``, ``query(op, credentials) -> reply``,
  ``snapshot() -> bytes``, ``Namespace.restore(bytes)``, ``digest() -> bytes``,
  ``verify()``, ``next_session_expiry_ns()``.
* :class:`NamespaceConfig` — chunk size, limits, session timeout, default goal; fixed
  at creation and carried in snapshots.
* :class:`SnapshotError` — raised by ``restore`` for bytes it cannot load.
* ``encode_command`` / ``decode_command`` — log bytes of a command (from
  :mod:`wire.namespace_ops`, where every op, reply and command is declared).

The package imports no clock, no randomness and no I/O (a test enforces it).
"""

from wire.namespace_ops import decode_command, encode_command

from ._namespace import Namespace
from ._snapshot import SnapshotError
from ._state import NamespaceConfig

__all__ = ["Namespace", "NamespaceConfig", "SnapshotError", "decode_command", "encode_command"]
