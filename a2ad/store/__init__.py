"""The store: queue items and run-time workspaces, durably.

`models` holds the rows as a2ad sees them, `depth` the queue's counts that
change in commit order, `writer` SQLite's group commit, `sqlite` the queries,
`lock` the single-owner lock. Nothing outside this package writes SQL.
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
from .sqlite import Migration, Store, bundled_migrations

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
