"""The store: queue items and run-time workspaces, durably.

`base` is what a2ad asks of a store (QueueStore), `models` the rows as a2ad
sees them, `depth` the queue's counts that change in commit order. For
SQLite, `writer` is the group commit, `sqlite` the store and its writes,
`reads` its reads, `sql` its busiest statements, `schema` its connections and
migrations, `lock` the single-owner lock; for PostgreSQL (the optional extra),
`postgres`, `pg_writer`, `pg_reads` and `pg_sql`. Nothing outside this package writes SQL or imports
a driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StoreUnavailable
from .base import QueueStore
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

if TYPE_CHECKING:
    from ..settings import StoreSettings


def open_store(settings: StoreSettings) -> QueueStore:
    """The store the settings name (not opened yet): PostgreSQL when store.url is
    set, else the SQLite file at store.path."""
    if not settings.is_postgres:
        return Store(
            settings.path,
            synchronous=settings.synchronous,
            busy_timeout=settings.busy_timeout_seconds,
        )
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise StoreUnavailable(
            f"store.url names PostgreSQL but its driver is not installed ({exc.name}):"
            " pip install 'a2ad[postgres]'"
        ) from None
    return PostgresStore(
        settings.url,
        schema=settings.schema_name,
        synchronous=settings.synchronous,
        pool_size=settings.pool_size,
        statement_timeout=settings.statement_timeout_seconds,
        replica=settings.replica_id,
    )


def migrations_for(settings: StoreSettings) -> list[Migration]:
    """The bundled migrations of the store the settings name."""
    return bundled_migrations("migrations_pg" if settings.is_postgres else "migrations")


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
    "QueueStore",
    "Released",
    "State",
    "Store",
    "StoreLock",
    "StoreLocked",
    "answers_again",
    "bundled_migrations",
    "migrations_for",
    "new_queue_id",
    "open_store",
]
