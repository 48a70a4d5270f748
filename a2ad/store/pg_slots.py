"""Direct sends' slot leases on PostgreSQL, as writer ops that a batch merges: the
takes of one workspace in one statement, every return in one statement. Under
load a replica's writer holds many of them at once, and one round trip each
would bound its direct sends by the writer connection's round trips."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg

from .pg_sql import RETURN_SLOTS, TAKE_SLOTS

Conn = psycopg.AsyncConnection[Any]


class TakeSlot:
    """One send's take; ops with the same `key` run as one statement."""

    one_statement = True
    __slots__ = ("arrived", "cap", "key", "lease", "now", "replica", "token", "workspace")

    def __init__(
        self,
        workspace: str,
        *,
        token: str,
        cap: int,
        arrived: float,
        now: float,
        lease: float,
        replica: str,
    ) -> None:
        self.workspace, self.token, self.cap = workspace, token, cap
        self.arrived, self.now, self.lease, self.replica = arrived, now, lease, replica
        self.key = (workspace, cap)

    async def __call__(self, conn: Conn) -> bool:
        return self.token in await take_slots(conn, [self])


async def take_slots(conn: Conn, ops: Sequence[TakeSlot]) -> set[str]:
    """The tokens that got a slot. An item that was due when the latest of the
    sends arrived holds all of them back (they queue behind it)."""
    first = ops[0]
    params = {
        "tokens": [op.token for op in ops],
        "workspace": first.workspace,
        "cap": first.cap,
        "arrived": max(op.arrived for op in ops),
        "now": max(op.now for op in ops),
        "lease": min(op.lease for op in ops),
        "replica": first.replica,
    }
    rows = await (await conn.execute(TAKE_SLOTS, params)).fetchall()
    return {token for (token,) in rows}


class FreeSlots:
    """Return slot leases; all of a batch's returns run as one statement. `freed`
    hears the workspaces whose slots came free (the batch's NOTIFY names them)."""

    one_statement = True
    __slots__ = ("freed", "tokens")

    def __init__(self, tokens: list[str], freed: Callable[[Iterable[str]], None]) -> None:
        self.tokens, self.freed = tokens, freed

    async def __call__(self, conn: Conn) -> None:
        await free_slots(conn, [self])


async def free_slots(conn: Conn, ops: Sequence[FreeSlots]) -> None:
    tokens = [token for op in ops for token in op.tokens]
    rows = await (await conn.execute(RETURN_SLOTS, {"tokens": tokens})).fetchall()
    ops[0].freed(workspace for (workspace,) in rows)
