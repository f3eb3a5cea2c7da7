"""The replicated dataserver-mode table: decommission and maintenance that survive a
leader change (the cluster manager's soft state is rebuilt from it every reign).

A row exists only for a dataserver in a non-normal mode; NORMAL removes it.  Rows are
keyed by the dataserver's stable id; iteration is by id wherever order shows.
"""

from __future__ import annotations

import errno

from wire.cluster_admin_ops import DataserverMode
from wire.invariant import invariant
from wire.namespace_ops import (
    DATASERVER_ADDRESS_MAX_BYTES,
    DATASERVER_MODES_MAX,
    DataserverModeEntry,
    DataserverModesReply,
    GetDataserverModes,
    NsError,
    OkReply,
    SetDataserverMode,
)

from ._state import Context, State

OK = OkReply()
DATASERVER_ID_MAX = (1 << 64) - 1
ROW_MODES = frozenset({DataserverMode.DECOMMISSION, DataserverMode.MAINTENANCE})


def valid_row(dataserver: int, mode: object, since_ns: int, address: object) -> bool:
    """True when the fields make a row the table may hold (restore and checks use it)."""
    return (
        type(dataserver) is int
        and 1 <= dataserver <= DATASERVER_ID_MAX
        and mode in ROW_MODES
        and type(since_ns) is int
        and isinstance(address, str)
        and len(address.encode()) <= DATASERVER_ADDRESS_MAX_BYTES
    )


def set_dataserver_mode(state: State, now_ns: int, op: SetDataserverMode) -> OkReply | NsError:
    """Apply an admin's mode change (see :class:`SetDataserverMode` for the contract)."""
    table = state.dataserver_modes
    if op.mode == DataserverMode.NORMAL:
        if not 1 <= op.dataserver <= DATASERVER_ID_MAX:
            return NsError(errno.EINVAL)
        table.pop(op.dataserver, None)
        return OK
    if not valid_row(op.dataserver, op.mode, now_ns, op.address):
        return NsError(errno.EINVAL)
    row = table.get(op.dataserver)
    if row is None and len(table) >= DATASERVER_MODES_MAX:
        return NsError(errno.EUSERS)
    mode = DataserverMode(op.mode)
    since_ns = row.since_ns if row is not None and row.mode == mode else now_ns
    table[op.dataserver] = DataserverModeEntry(op.dataserver, mode, since_ns, op.address)
    return OK


def get_dataserver_modes(
    state: State, ctx: Context, op: GetDataserverModes
) -> DataserverModesReply:
    table = state.dataserver_modes
    return DataserverModesReply(tuple(table[ds] for ds in sorted(table)))


def check_dataserver_modes(state: State) -> None:
    table = state.dataserver_modes
    invariant(len(table) <= DATASERVER_MODES_MAX, f"{len(table)} dataserver-mode rows")
    for ds, row in table.items():
        invariant(
            row.dataserver == ds and valid_row(ds, row.mode, row.since_ns, row.address),
            f"bad dataserver-mode row {ds}: {row}",
        )
