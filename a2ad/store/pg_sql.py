"""The PostgreSQL store's busiest statements: claims, releases and enqueues.

Enqueues: one send's in one statement, and all the sends of one batch in one
statement, so a burst of 202s costs one round trip, not one each.

Each answers a send with the item that already answers for its messageId (a live
one, or one delivered within the replay window: models.answers_again), or else
with the new row. The partial unique index over live items settles a race with
another writer (or a second send of the messageId in the same batch): nothing
is inserted for it, and that send's statement runs again on its own.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..errors import QueueFull
from .depth import Counted, Move
from .models import ITEM_COLUMNS, Enqueued, Item, NewItem
from .sql import place

LIVE = "state IN ('queued', 'dispatching')"
_COLUMNS = ITEM_COLUMNS.split(", ")

# Slots for up to {n} requests at a workspace's agent, taken from its count over
# every replica: as many as `cap` (its capacity less its other load, as this
# replica knows it) leaves free. One row per workspace, updated in place (made by
# the first take): a taker that waited for another's row lock reads the count
# that one left (ON CONFLICT DO UPDATE works on the newest row), so two never
# share a slot.
_GRANT = """INSERT INTO slots AS s (workspace, in_use, granted)
    SELECT %(workspace)s, LEAST({n}, %(cap)s), LEAST({n}, %(cap)s) FROM {source}
    WHERE {n} > 0 AND %(cap)s > 0{extra}
    ON CONFLICT (workspace) DO UPDATE
    SET granted = LEAST(EXCLUDED.granted, %(cap)s - s.in_use),
        in_use = s.in_use + LEAST(EXCLUDED.granted, %(cap)s - s.in_use)
    WHERE s.in_use < %(cap)s
    RETURNING s.granted"""

# Promotion moves an item up one level per full promote_after_seconds waited.
_HEAD = """h{p} AS (SELECT seq, enqueued_at, {level} AS level FROM items
    WHERE workspace = %(workspace)s AND state = 'queued' AND priority BETWEEN {p} AND {p}
      AND not_before <= %(now)s AND (expires_at IS NULL OR expires_at > %(now)s)
      AND EXISTS (SELECT 1 FROM turn)
    ORDER BY priority, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"""
# The workspace's claims take turns, over every replica: each first waits for a
# lock of the workspace's (held to its commit), as a one-time filter of each
# head, before it locks any row. Without it, two claims at once could each lock
# the rows the other skips, and the one that got the free slot deliver a newer
# item before an older one the other held (seen: three replicas and a 1-slot
# agent, one item in five runs). Rows a claim before it took fail the recheck
# PostgreSQL makes of every row it locks, so they are passed over.
_TURN = """turn AS MATERIALIZED (SELECT pg_advisory_xact_lock(
    hashtextextended(current_schema() || ':claim:' || %(workspace)s, 0)))"""
# Each priority's oldest `limit` due items (locked, skipping any another statement
# holds), ordered by the level they have risen to by waiting, then age. `priority
# BETWEEN p AND p` and `ORDER BY priority, seq` keep each head on the index of
# queued rows: with `priority = p` the planner may walk the primary key in seq
# order instead and step over every row already claimed or delivered at its head
# (while the table's statistics still say they are queued), a cost that grows
# with the drain.
CLAIM = f"""WITH {_TURN},
{", ".join(_HEAD.format(p=p, level=lv) for p, lv in ((100, 2), (50, 1), (10, 0)))},
heads AS (
    SELECT seq, row_number() OVER (
        ORDER BY LEAST(2, level + floor((%(now)s - enqueued_at) / %(promote)s)) DESC, seq
    ) AS place
    FROM (SELECT * FROM h100 UNION ALL SELECT * FROM h50 UNION ALL SELECT * FROM h10) h),
wanted AS (SELECT count(*) AS n FROM heads WHERE place <= %(limit)s),
granted AS ({_GRANT.format(n="wanted.n", source="wanted", extra="")}),
claimed AS (
    UPDATE items SET state = 'dispatching',
        claim_token = replace(gen_random_uuid()::text, '-', ''),
        lease_until = %(lease)s, updated_at = %(now)s
    FROM heads WHERE items.seq = heads.seq AND heads.place <= (SELECT granted FROM granted)
    RETURNING heads.place, {", ".join("items." + c for c in _COLUMNS)}),
leased AS (
    INSERT INTO slot_leases (token, workspace, replica, lease_until)
    SELECT claim_token, workspace, %(replica)s, %(lease)s FROM claimed)
SELECT {ITEM_COLUMNS} FROM claimed ORDER BY place"""

# A direct send's slot: taken only while no item of the workspace is due that was
# queued before the send arrived (a send never passes the queue, whichever replica
# holds its items; later sends stand behind it).
_NONE_DUE = """
    AND NOT EXISTS (SELECT 1 FROM items
        WHERE workspace = %(workspace)s AND state = 'queued' AND priority IN (10, 50, 100)
          AND enqueued_at < %(arrived)s
          AND not_before <= %(now)s AND (expires_at IS NULL OR expires_at > %(now)s))"""
# Direct sends' slots, one lease each, for sends to one workspace that a batch
# holds together: the first as many as are free get one (in the order they came).
_TAKE_SOME = _GRANT.format(
    n="(SELECT count(*) FROM input)", source="(SELECT 1) AS one", extra=_NONE_DUE
)
TAKE_SLOTS = f"""WITH input AS (
    SELECT * FROM unnest(%(tokens)s::text[]) WITH ORDINALITY AS t(token, ord)),
granted AS ({_TAKE_SOME})
INSERT INTO slot_leases (token, workspace, replica, lease_until)
SELECT token, %(workspace)s, %(replica)s, %(lease)s FROM input
WHERE ord <= (SELECT granted FROM granted)
RETURNING token"""

# Slot leases returned (`gone`: a DELETE … RETURNING workspace), and each one's
# workspace's count lowered in the same statement.
FREE_SLOTS = """gone AS ({gone}),
freed AS (
    UPDATE slots SET in_use = slots.in_use - g.n
    FROM (SELECT workspace, count(*) AS n FROM gone GROUP BY workspace) g
    WHERE slots.workspace = g.workspace
    RETURNING slots.workspace)"""
FREE_TOKENS = FREE_SLOTS.format(
    gone="DELETE FROM slot_leases WHERE token = ANY(%(tokens)s::text[]) RETURNING workspace"
)
RETURN_SLOTS = f"WITH {FREE_TOKENS} SELECT workspace FROM freed"  # the leases of %(tokens)s
SWEEP_SLOTS = (
    "WITH "
    + FREE_SLOTS.format(
        gone="DELETE FROM slot_leases WHERE lease_until < %(now)s"
        " AND NOT token = ANY(%(keep)s::text[]) RETURNING workspace"
    )
    + " SELECT workspace FROM freed"
)

RELEASE_DISPATCHING = """
UPDATE items
SET attempts = attempts + 1,
    state = CASE WHEN attempts + 1 >= %(max_attempts)s THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN attempts + 1 >= %(max_attempts)s THEN %(now)s END,
    last_error = %(reason)s, claim_token = NULL, lease_until = NULL, updated_at = %(now)s
WHERE state = 'dispatching' {condition}
RETURNING id, workspace, state, priority
"""

_NEW = (
    "id, workspace, caller, method, body, headers, message_id, context_id, request_id,"
    " priority, ttl_seconds, expires_at, busy_answers, push"
)
# The columns' types, for the arrays a batch's sends arrive in.
_TYPES = [*["text"] * 4, "bytea", *["text"] * 4, "int", "float8", "float8", "int", "text"]
_ANSWERING = f"{LIVE} OR (state = 'delivered' AND %(now)s - finished_at <= %(window)s)"
_CONFLICT = f"ON CONFLICT (workspace, caller, message_id) WHERE message_id IS NOT NULL AND {LIVE}"

ENQUEUE_ONE = f"""WITH found AS (
    SELECT {ITEM_COLUMNS} FROM items
    WHERE %(message_id)s::text IS NOT NULL AND workspace = %(workspace)s
      AND caller = %(caller)s AND message_id = %(message_id)s
    ORDER BY ({LIVE}) DESC, seq DESC LIMIT 1),
answering AS (SELECT * FROM found WHERE {_ANSWERING}),
inserted AS (
    INSERT INTO items ({_NEW}, enqueued_at, updated_at)
    SELECT {", ".join(f"%({c})s" for c in _NEW.split(", "))}, %(now)s, %(now)s
    WHERE NOT EXISTS (SELECT 1 FROM answering)
    {_CONFLICT} DO NOTHING
    RETURNING seq)
SELECT (SELECT seq FROM inserted), answering.* FROM (SELECT 1) AS one
LEFT JOIN answering ON true"""

_MANY_NEW = _NEW + ", now"
_UNNEST = ", ".join(
    f"%({c})s::{t}[]" for c, t in zip(_MANY_NEW.split(", "), [*_TYPES, "float8"], strict=True)
)
ENQUEUE_MANY = f"""WITH input AS (
    SELECT * FROM unnest({_UNNEST}) WITH ORDINALITY AS i({_MANY_NEW}, ord)),
found AS (
    SELECT DISTINCT ON (i.ord) i.ord, i.now AS at, {", ".join("f." + c for c in _COLUMNS)}
    FROM input i JOIN items f ON i.message_id IS NOT NULL AND f.workspace = i.workspace
        AND f.caller = i.caller AND f.message_id = i.message_id
    ORDER BY i.ord, (f.state IN ('queued', 'dispatching')) DESC, f.seq DESC),
answering AS (
    SELECT * FROM found
    WHERE {LIVE} OR (state = 'delivered' AND at - finished_at <= %(window)s)),
inserted AS (
    INSERT INTO items ({_NEW}, enqueued_at, updated_at)
    SELECT {", ".join("i." + c for c in _NEW.split(", "))}, i.now, i.now FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM answering a WHERE a.ord = i.ord)
    ORDER BY i.ord
    {_CONFLICT} DO NOTHING
    RETURNING id, seq)
SELECT ins.seq, {", ".join("a." + c for c in _COLUMNS)}
FROM input i LEFT JOIN inserted ins ON ins.id = i.id LEFT JOIN answering a ON a.ord = i.ord
ORDER BY i.ord"""


class Enqueue:
    """The op of one send; the writer runs a batch's Enqueue ops together (`many`).
    `caps`: the depth caps (per workspace, in all; None: not near it) the store
    must hold it to, counted over every replica's items (past_caps)."""

    __slots__ = ("caps", "new", "now", "window")

    def __init__(
        self,
        new: NewItem,
        now: float,
        window: float,
        caps: tuple[int | None, int | None] = (None, None),
    ) -> None:
        self.new, self.now, self.window, self.caps = new, now, window, caps

    def values(self) -> dict[str, Any]:
        return {**self.new.row(self.now), "window": self.window}

    def answer(self, row: Any) -> Counted[Enqueued] | None:
        """What a row of either statement says: the new item, the one that answers
        for its messageId, or None (a conflict: run again)."""
        seq, found = row[0], row[1:]
        if seq is not None:
            new = self.new
            move = Move(new.workspace, new.id, new.priority, None, "queued", self.now)
            return Counted(Enqueued(Item.stored(new, seq, self.now), True), (move,), then=place)
        if found[0] is not None:
            return Counted(Enqueued(Item.from_row(found), created=False))
        return None

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> Counted[Enqueued]:
        while True:
            row = await (await conn.execute(ENQUEUE_ONE, self.values())).fetchone()
            answer = self.answer(row)
            if answer is not None:
                return answer


_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || %s, 0))"
_LIVE_IN = f"SELECT count(*) FROM items WHERE workspace = %s AND {LIVE}"
_LIVE_ALL = f"SELECT count(*) FROM items WHERE {LIVE}"


async def past_caps(
    conn: psycopg.AsyncConnection[Any], ops: list[tuple[int, Enqueue]]
) -> dict[int, QueueFull]:
    """The sends of a batch (index, op) that a depth cap refuses, counted in the
    store over every replica's items. Each cap is checked under a transaction
    lock of its own (a workspace's, in their order, then the total's), so the
    replicas' batches take turns and none counts before another's commit."""
    refused: dict[int, QueueFull] = {}
    by_workspace: dict[str, list[tuple[int, Enqueue]]] = {}
    for index, op in ops:
        if op.caps[0] is not None:
            by_workspace.setdefault(op.new.workspace, []).append((index, op))
    for workspace in sorted(by_workspace):
        await conn.execute(_LOCK, (f":depth:{workspace}",))
        row = await (await conn.execute(_LIVE_IN, (workspace,))).fetchone()
        live = row[0] if row else 0
        for index, op in by_workspace[workspace]:
            cap = op.caps[0]
            assert cap is not None
            if live >= cap:
                refused[index] = QueueFull.workspace(workspace, cap)
            else:
                live += 1
    total = [(i, op) for i, op in ops if op.caps[1] is not None and i not in refused]
    if total:
        await conn.execute(_LOCK, (":depth",))
        row = await (await conn.execute(_LIVE_ALL)).fetchone()
        live = row[0] if row else 0
        for index, op in total:
            cap = op.caps[1]
            assert cap is not None
            if live >= cap:
                refused[index] = QueueFull.total(cap)
            else:
                live += 1
    return refused


async def enqueue_many(
    conn: psycopg.AsyncConnection[Any], ops: list[Enqueue]
) -> list[Counted[Enqueued]]:
    """Every send of a batch in one statement (the replay window is a setting: the
    same for all of them)."""
    columns: dict[str, list[Any]] = {c: [] for c in _MANY_NEW.split(", ")}
    for op in ops:
        for key, value in op.values().items():
            if key in columns:
                columns[key].append(value)
    params = {**columns, "window": ops[0].window}
    rows = await (await conn.execute(ENQUEUE_MANY, params)).fetchall()
    answers = []
    for op, row in zip(ops, rows, strict=True):
        answer = op.answer(row)
        answers.append(answer if answer is not None else await op(conn))
    return answers
