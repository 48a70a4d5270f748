"""The SQL of the SQLite store's busiest statements, and what their rows become;
with the helpers both stores use (an item's place in line, released rows, the
ListTasks query)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .depth import Counted, Depths, Move, Snapshot
from .models import Enqueued, Released, State

# Promotion moves an item up one level per full promote_after_seconds waited.
LEVEL = "(CASE priority WHEN 100 THEN 2 WHEN 50 THEN 1 ELSE 0 END)"

# The best `limit` due items of one workspace: each priority's oldest `limit`, ordered
# by the level they have risen to by waiting, then age. Within a priority an older
# item has risen at least as far, so each priority's oldest `limit` hold its best.
CLAIM_HEAD = """
    SELECT * FROM (SELECT seq, priority, enqueued_at FROM items
        WHERE workspace = :workspace AND state = 'queued' AND priority = {priority}
          AND not_before <= :now AND (expires_at IS NULL OR expires_at > :now)
        ORDER BY seq LIMIT :limit)"""

CLAIMABLE = f"""
SELECT seq FROM ({" UNION ALL ".join(CLAIM_HEAD.format(priority=p) for p in (100, 50, 10))})
ORDER BY MIN(2, {LEVEL} + CAST((:now - enqueued_at) / :promote_after AS INTEGER)) DESC, seq
LIMIT :limit
"""

# All of them in one statement, each with its own token (a claim of 8 items took
# 250 µs as 8 claims of one, which each ran the best-of-three lookup, and 208 µs so).
# `+state` keeps the planner on the rowids: by the live-state index it would read
# every queued row (100,000 queued items: a claim 10 ms, the backlog a third as fast).
CLAIM = """
UPDATE items
SET state = 'dispatching', claim_token = lower(hex(randomblob(16))), lease_until = ?,
    updated_at = ?
WHERE seq IN ({marks}) AND +state = 'queued'
RETURNING {columns}
"""

INSERT = """
INSERT INTO items (id, workspace, caller, method, body, headers, message_id, context_id,
                   request_id, priority, ttl_seconds, expires_at, busy_answers, push,
                   enqueued_at, updated_at)
VALUES (:id, :workspace, :caller, :method, :body, :headers, :message_id, :context_id,
        :request_id, :priority, :ttl_seconds, :expires_at, :busy_answers, :push, :now, :now)
"""

# Items whose claimer is gone go back to queued with an attempt counted, or
# end in failed once the attempts are spent, so an agent that crashes on a
# message cannot loop on it forever.
RELEASE_DISPATCHING = """
UPDATE items
SET attempts = attempts + 1,
    state = CASE WHEN attempts + 1 >= :max_attempts THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN attempts + 1 >= :max_attempts THEN :now END,
    last_error = :reason, claim_token = NULL, lease_until = NULL, updated_at = :now
WHERE state = 'dispatching' {condition}
RETURNING id, workspace, state, priority
"""


def place(done: Enqueued, depths: Depths) -> Enqueued:
    """A new item's place in line as its commit left the queue."""
    depth = depths.of(done.item.workspace)
    position = sum(n for p, n in depth.queued.items() if p >= done.item.priority)
    # Built whole: dataclasses.replace takes four times as long, on every send.
    return Enqueued(done.item, done.created, depth.queued_total, position)


def released(rows: Iterable[Any], old: State, now: float) -> Counted[list[Released]]:
    """Rows of `id, workspace, state, priority` that left `old`, with their moves."""
    released, moves = [], []
    for item_id, workspace, state, priority in rows:
        released.append(Released(item_id, workspace, state))
        moves.append(Move(workspace, item_id, priority, old, state, now))
    return Counted(released, moves)


def live_snapshot(conn: sqlite3.Connection) -> Snapshot:
    """Every workspace's live items, read through the live-state index (only live rows).
    Queued items that ever waited out a backoff keep their not-before; the depth
    compares it with the clock, so it is taken whether it is due or not."""
    queued: dict[str, dict[int, int]] = {}
    dispatching: dict[str, int] = {}
    waiting: dict[str, dict[str, float]] = {}
    for workspace, state, priority, n in conn.execute(
        "SELECT workspace, state, priority, COUNT(*) FROM items"
        " WHERE state IN ('queued', 'dispatching') GROUP BY state, workspace, priority"
    ):
        if state == "queued":
            queued.setdefault(workspace, {})[priority] = n
        else:
            dispatching[workspace] = dispatching.get(workspace, 0) + n
    for workspace, item_id, not_before in conn.execute(
        "SELECT workspace, id, not_before FROM items WHERE state = 'queued' AND not_before > 0"
    ):
        waiting.setdefault(workspace, {})[item_id] = not_before
    return Snapshot(None, queued, dispatching, waiting)


@dataclass(frozen=True, slots=True)
class CallerQuery:
    """One caller's items of a workspace for ListTasks: the filter (for the count)
    and the page's filter (after the cursor), with their params, in the store's
    placeholder."""

    where: str
    params: list[Any]
    page_where: str
    page_params: list[Any]


def caller_query(
    mark: str,
    workspace: str,
    caller: str,
    *,
    context_id: str | None,
    states: Sequence[str] | None,
    updated_from: float | None,
    before: tuple[float, int] | None,
) -> CallerQuery:
    clauses = [f"workspace = {mark}", f"caller = {mark}"]
    params: list[Any] = [workspace, caller]
    if context_id is not None:
        # The context id the caller sees: its own, or the agent's when it gave none.
        clauses.append(f"COALESCE(context_id, agent_context_id) = {mark}")
        params.append(context_id)
    if states is not None:
        clauses.append(f"state IN ({', '.join(mark for _ in states)})")
        params.extend(states)
    if updated_from is not None:
        clauses.append(f"updated_at >= {mark}")
        params.append(updated_from)
    where = " AND ".join(clauses)
    page_where, page_params = where, list(params)
    if before is not None:
        page_where += f" AND (updated_at, seq) < ({mark}, {mark})"
        page_params.extend(before)
    return CallerQuery(where, params, page_where, page_params)
