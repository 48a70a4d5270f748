"""The push outbox, for either store: each row is one update of a task to POST to
one of its push configs (push.py sends them). The rows themselves are made by
triggers in the store (migrations 0008 / pg 0003), in the statement that changes
the item, so a committed change always has its updates; what is here is how a
sender takes them, records what happened, and how an operator sees and retries
the ones that could not be delivered (dead letters).

The SQL is written once with `?` placeholders; the PostgreSQL store runs it
with `%s` (none of it holds a literal `?`)."""

from __future__ import annotations

from typing import Any

from .models import PUSH_COLUMNS, Push

# Due rows, each the oldest pending one of its task and config (an update waits for
# the one before it: per-task order), leased to this sender until `next_at`. The
# attempt is counted as it is taken, so a push that kills its sender cannot loop.
# Read in order of due time, by the partial index of pending rows: ordered by seq,
# SQLite would walk the whole table, sent rows included.
CLAIM = f"""
UPDATE push_outbox SET next_at = ?, attempts = attempts + 1
WHERE seq IN (
    SELECT o.seq FROM push_outbox o
    WHERE o.status = 'pending' AND o.next_at <= ?
      AND NOT EXISTS (SELECT 1 FROM push_outbox p WHERE p.item_id = o.item_id
          AND p.config_id = o.config_id AND p.status = 'pending' AND p.seq < o.seq)
    ORDER BY o.next_at, o.seq LIMIT ?{{lock}})
  AND status = 'pending'
RETURNING {PUSH_COLUMNS}
"""
SENT = (
    "UPDATE push_outbox SET status = 'sent', sent_at = ?, last_error = NULL"
    " WHERE seq = ? AND status = 'pending'"
)
# A failed attempt: due again at `next_at`, or a dead letter once its attempts are spent.
FAILED = (
    "UPDATE push_outbox SET next_at = ?, last_error = ?,"
    " status = CASE WHEN attempts >= ? THEN 'dead' ELSE 'pending' END"
    " WHERE seq = ? AND status = 'pending' RETURNING status"
)
# Following a task at the agent: look again at `next_at` with the Task as last seen.
FOLLOW_AGAIN = (
    "UPDATE push_outbox SET next_at = ?, payload = ?, last_error = ?, attempts = ?"
    " WHERE seq = ? AND status = 'pending'"
)
# Following ends: the agent's task is terminal, `payload` its last Task.
FOLLOW_DONE = (
    "UPDATE push_outbox SET status = 'sent', sent_at = ?, payload = ?, last_error = NULL"
    " WHERE seq = ? AND status = 'pending'"
)
FOLLOW = (
    "INSERT INTO push_outbox (item_id, config_id, state, payload, next_at, created_at, token)"
    " SELECT ?, '', 'follow', ?, ?, ?, ? WHERE NOT EXISTS"
    " (SELECT 1 FROM push_outbox WHERE item_id = ? AND config_id = '')"
)
FOLLOWED = f"SELECT {PUSH_COLUMNS} FROM push_outbox WHERE item_id = ? AND config_id = ''"
DEAD = f"SELECT {PUSH_COLUMNS} FROM push_outbox WHERE status = 'dead'"
RETRY = (
    "UPDATE push_outbox SET status = 'pending', attempts = 0, next_at = ?, last_error = NULL"
    " WHERE status = 'dead'"
)
# At start-up of the store's only process: leases of a sender that is gone (and
# backoffs, so a restart tries every receiver again at once).
RELEASE = "UPDATE push_outbox SET next_at = ? WHERE status = 'pending' AND next_at > ?"
# Each by its partial index: sent rows (kept as long as their items) are not read.
COUNTS = (
    "SELECT 'pending', COUNT(*) FROM push_outbox WHERE status = 'pending'"
    " UNION ALL SELECT 'dead', COUNT(*) FROM push_outbox WHERE status = 'dead'"
)


class Outbox:
    """The outbox operations, on a store that runs a statement (`_run_outbox`:
    the rows it returns when `rows`, else its row count) and knows its dialect."""

    _CLAIM_LOCK = ""  # PostgreSQL: FOR UPDATE SKIP LOCKED (replicas claim side by side)
    _SAME_PUSH = "push IS ?"  # the items row still holds the configs read before
    _ADD_UPDATE = ""  # a row per config of the item, for an agent's later Task

    async def _run_outbox(
        self, statement: str, params: tuple[Any, ...], *, rows: bool, durable: bool
    ) -> Any:
        raise NotImplementedError

    async def set_push(self, item_id: str, configs: str | None, *, before: str | None) -> bool:
        """Write an item's push configs (JSON) if they are still `before`; False when
        another writer changed them first (read again and retry) or the item is gone."""
        statement = f"UPDATE items SET push = ? WHERE id = ? AND {self._SAME_PUSH}"
        changed = await self._run_outbox(
            statement, (configs, item_id, before), rows=False, durable=True
        )
        return bool(changed)

    async def claim_pushes(self, *, now: float, lease_until: float, limit: int) -> list[Push]:
        statement = CLAIM.format(lock=self._CLAIM_LOCK)
        found = await self._run_outbox(
            statement, (lease_until, now, limit), rows=True, durable=False
        )
        return sorted((Push(*row) for row in found), key=lambda p: p.seq)

    async def push_sent(self, seq: int, *, now: float) -> None:
        await self._run_outbox(SENT, (now, seq), rows=False, durable=False)

    async def push_failed(self, seq: int, *, next_at: float, error: str, max_attempts: int) -> bool:
        """Record a failed attempt; True when the row is now a dead letter."""
        found = await self._run_outbox(
            FAILED, (next_at, error[:500], max_attempts, seq), rows=True, durable=False
        )
        return bool(found) and found[0][0] == "dead"

    async def add_push_update(self, item_id: str, task: str, *, now: float) -> int:
        """An agent's later Task for every push config of the item (a row each)."""
        return int(
            await self._run_outbox(
                self._ADD_UPDATE, (task, now, now, item_id), rows=False, durable=True
            )
        )

    async def follow_push(
        self, item_id: str, task: str, *, next_at: float, now: float, token: str
    ) -> bool:
        """Follow the item's task at the agent from `next_at` (once per item; False
        when it is followed already). `token`: what the agent's pushes must carry."""
        made = await self._run_outbox(
            FOLLOW, (item_id, task, next_at, now, token, item_id), rows=False, durable=True
        )
        return bool(made)

    async def followed(self, item_id: str) -> Push | None:
        """The item's task as a2ad follows it at the agent (status pending), or
        followed it (sent: to its end; dead: given up); None if it never did."""
        found = await self._run_outbox(FOLLOWED, (item_id,), rows=True, durable=False)
        return Push(*found[0]) if found else None

    async def follow_again(
        self, seq: int, *, next_at: float, task: str, attempts: int, error: str | None = None
    ) -> None:
        """Look at the agent's task again at `next_at`; `attempts`: looks since it changed."""
        await self._run_outbox(
            FOLLOW_AGAIN, (next_at, task, error, attempts, seq), rows=False, durable=False
        )

    async def follow_done(self, seq: int, *, task: str, now: float) -> None:
        await self._run_outbox(FOLLOW_DONE, (now, task, seq), rows=False, durable=False)

    async def dead_pushes(self, *, item_id: str | None = None, limit: int = 100) -> list[Push]:
        statement = DEAD
        params: tuple[Any, ...] = ()
        if item_id is not None:
            statement += " AND item_id = ?"
            params += (item_id,)
        found = await self._run_outbox(
            statement + " ORDER BY seq DESC LIMIT ?", (*params, limit), rows=True, durable=False
        )
        return [Push(*row) for row in found]

    async def retry_pushes(self, *, now: float, seq: int | None = None) -> int:
        """Dead letters (one, or all) back to pending, due now; how many."""
        statement = RETRY
        params: tuple[Any, ...] = (now,)
        if seq is not None:
            statement += " AND seq = ?"
            params += (seq,)
        return int(await self._run_outbox(statement, params, rows=False, durable=True))

    async def release_pushes(self, *, now: float) -> int:
        """Every pending row due now: only where no other sender may hold one."""
        return int(await self._run_outbox(RELEASE, (now, now), rows=False, durable=False))

    async def push_counts(self) -> dict[str, int]:
        """Pending and dead rows of the outbox."""
        found = await self._run_outbox(COUNTS, (), rows=True, durable=False)
        return {"pending": 0, "dead": 0, **{status: int(n) for status, n in found}}
