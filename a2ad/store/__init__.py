"""The store: queue items and run-time workspaces, durably.

`models` holds the rows as a2ad sees them, `depth` the queue's counts that
change in commit order; for SQLite, `writer` is the group commit, `sqlite`
the store and its writes, `reads` its reads, `sql` its busiest statements,
`schema` its connections and migrations, `lock` the single-owner lock.
Nothing outside this package writes SQL.
"""

from .depth import Depth, Depths
from .lock import StoreLock, StoreLocked
from .models import (
    FINAL_STATES,
    LIVE_STATES,
    PRIORITIES,
    PRIORITY_NAMES,
    STATES,
    Enqueued,
    Item,
    NewItem,
    Released,
    State,
    answers_again,
    new_queue_id,
)
from .schema import Migration, bundled_migrations
from .sqlite import Store

__all__ = [
    "FINAL_STATES",
    "LIVE_STATES",
    "PRIORITIES",
    "PRIORITY_NAMES",
    "STATES",
    "Depth",
    "Depths",
    "Enqueued",
    "Item",
    "Migration",
    "NewItem",
    "Released",
    "State",
    "Store",
    "StoreLock",
    "StoreLocked",
    "answers_again",
    "bundled_migrations",
    "new_queue_id",
]
