"""The PostgreSQL store: the SQLite store's operations, on psycopg 3 (the extra
`a2ad[postgres]`). One connection writes (group commit: pg_writer.py), a pool
reads (pg_reads.py), one listens for other processes' commits and notes. Tables
live in a schema of a2ad's own (`store.schema`), which any number of replicas
serve together (each under its store.replica_id); what they share besides the
queue is here too: slots, heartbeats, duties (replicas.py, shared_slots.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import sql as pgsql
from psycopg_pool import AsyncConnectionPool

from ..errors import StoreUnavailable
from .depth import Counted, Depths, Move, Snapshot
from .lock import StoreLocked
from .models import (
    FINAL_STATES,
    Enqueued,
    Item,
    NewItem,
    Released,
    State,
)
from .outbox import Outbox
from .pg_reads import Conn, PgReads, live_snapshot
from .pg_slots import FreeSlots, TakeSlot
from .pg_sql import (
    CLAIM,
    FREE_TOKENS,
    RELEASE_DISPATCHING,
    RETURN_SLOTS,
    SWEEP_SLOTS,
    Enqueue,
)
from .pg_writer import (
    CHANGED,
    FINISHED,
    MAX_PAYLOAD,
    AdvisoryLock,
    OwnerLost,
    PgOp,
    PgWriter,
    one_statement,
    recount_elsewhere,
)
from .schema import Migration, bundled_migrations
from .sql import released

log = logging.getLogger("a2ad.store")

T = TypeVar("T")

NOTE = "!"  # a note between replicas, not a commit: "<sender> !<kind> <fields…>"
NO_CAP = 2**31 - 1  # a claim without a slot limit (the store's own tests)

# Analyze the items table once this many rows changed, plus this share of its rows.
ANALYZE_ROWS = 1000
ANALYZE_SHARE = 0.2


CAP_MARGIN = 1000  # items other replicas may have queued that this one has not counted


def _near(live: int, cap: int) -> bool:
    return cap - live <= max(CAP_MARGIN, cap // 2)


def _lock_key(purpose: str, schema: str) -> str:
    return f"a2ad:{purpose}:{schema}"


class PostgresStore(PgReads, Outbox):
    """The PostgreSQL store. `open()` it, `migrate()` it, use it, `close()` it."""

    is_server = True
    _CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"  # replicas take disjoint rows side by side
    _SAME_PUSH = "push IS NOT DISTINCT FROM ?::text"
    _ADD_UPDATE = (
        "INSERT INTO push_outbox (item_id, config_id, state, payload, next_at, created_at)"
        " SELECT i.id, c->>'id', 'update', ?, ?, ?"
        " FROM items i, jsonb_array_elements(i.push::jsonb) AS c WHERE i.id = ?"
    )

    def __init__(
        self,
        url: str,
        *,
        schema: str = "a2ad",
        synchronous: str = "full",
        pool_size: int = 4,
        statement_timeout: float = 30.0,
        replica: str = "",
    ) -> None:
        self.url = url
        self.replica = replica  # store.replica_id: whose slot leases are whose
        self.schema = schema
        self.synchronous = synchronous
        self.pool_size = pool_size
        self.statement_timeout = statement_timeout
        self.depths = Depths()
        self.instance = uuid.uuid4().hex
        self.channel = f"a2ad_changes_{schema}"
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._writer: PgWriter | None = None
        self._listener: Conn | None = None
        self._listening: asyncio.Task[None] | None = None
        self._listen_error: str | None = None  # the listening connection is lost
        self._listen_lost_at = 0  # the writer's commits then
        self._changes = 0  # commits by other processes seen (LISTEN), for data_version
        # Told of another process's commit (its NOTIFY): the workspaces whose queue
        # it changed, those where it only freed slots, the items it finished; and
        # of replicas' other notes (kind, fields).
        self.on_change: Callable[[list[str], list[str], list[str]], None] = (
            lambda changed, freed, finished: None
        )
        self.on_note: Callable[[str, list[str]], None] = lambda kind, fields: None
        self._sole = True  # not (yet) one of the replicas that serve it

    # -- connections ---------------------------------------------------------

    @property
    def _options(self) -> str:
        timeout = int(self.statement_timeout * 1000)
        return f"-c search_path={self.schema} -c statement_timeout={timeout}"

    async def _connect(self, *, writer: bool = False) -> Conn:
        # The writer runs a handful of statements over and over (psycopg prepares
        # them): a generic plan skips planning the claim each time, a third of its
        # cost under a deep backlog, and its index scans do not depend on values.
        writing = " -c synchronous_commit=off -c plan_cache_mode=force_generic_plan"
        options = self._options + (writing if writer else "")
        try:
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, options=options, connect_timeout=5
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot connect to the store: {str(exc).strip()}", retry_after=1
            ) from None

    @property
    def last_write_error(self) -> str | None:
        """Why the store cannot write now, or None. An idle daemon's writer tries
        nothing, so the listening connection's loss counts too: it is the first to
        see a server go away."""
        if self._writer is None:
            return None
        if self._writer.last_error is not None:
            return self._writer.last_error
        if self._listen_error is not None and self._writer.commits == self._listen_lost_at:
            return self._listen_error  # and nothing committed since
        return None

    @property
    def commits(self) -> int:
        return self._writer.commits if self._writer is not None else 0

    async def open(self, *, create_schema: bool = True) -> None:
        if create_schema:
            admin = await self._connect()
            try:
                await admin.execute(
                    pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                        pgsql.Identifier(self.schema)
                    )
                )
            except psycopg.Error as exc:
                raise StoreUnavailable(f"cannot open the store: {str(exc).strip()}") from None
            finally:
                await admin.close()
        self._pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "options": self._options},
            open=False,
            timeout=5,
        )
        await self._pool.open()
        self._writer = PgWriter(
            lambda: self._connect(writer=True),
            synchronous=self.synchronous,
            depths=self.depths,
            channel=self.channel,
            instance=self.instance,
        )
        self._writer.start()
        self._listener = await self._connect()
        await self._listener.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(self.channel)))
        self._listening = asyncio.create_task(self._listen(), name="a2ad-store-listen")

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
            self._listening = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        """Count other processes' commits; after a lost connection, count one (what
        was missed is unknown, so the daemon recounts) and listen again."""
        while True:
            conn = self._listener
            try:
                assert conn is not None
                async for note in conn.notifies():
                    sender, *fields = note.payload.split(" ")
                    if sender == self.instance:
                        continue
                    if fields and fields[0].startswith(NOTE):
                        self.on_note(fields[0][1:], fields[1:])
                        continue
                    changed = [f[1:] for f in fields if f.startswith(CHANGED)]
                    if changed or not fields:  # not fields: it could not say what
                        self._changes += 1
                    self.on_change(
                        changed,
                        [f for f in fields if f[:1] not in (CHANGED, FINISHED)],
                        [f[1:] for f in fields if f.startswith(FINISHED)],
                    )
            except (psycopg.Error, AssertionError) as exc:
                self._listen_error = f"lost the connection to the server: {str(exc).strip()}"
                self._listen_lost_at = self.commits
                if self._writer is not None:
                    self._writer.suspect = True
            self._changes += 1
            await asyncio.sleep(1.0)
            try:
                self._listener = await self._connect()
                await self._listener.execute(
                    pgsql.SQL("LISTEN {}").format(pgsql.Identifier(self.channel))
                )
            except (StoreUnavailable, psycopg.Error) as exc:
                self._listen_error = str(exc).strip()
                continue
            self._listen_error = None

    async def take_ownership(self, replica: str | None = None) -> None:
        """Take the store: as its one owner (`a2ad migrate`), or as one of the
        replicas that serve it (`replica`: this one's store.replica_id). Session
        advisory locks held by the writer connection (taken again after a
        reconnect, pg_writer.py), so nothing is written without them: the owner's
        lock excludes every replica, a replica's shares it with the others and
        holds its own name alone. StoreLocked when another process holds them."""
        assert self._writer is not None, "open() first"
        owner = _lock_key("owner", self.schema)
        if replica is None:
            refusal = f"{self.where} is held by another a2ad; stop it first"
            locks = [AdvisoryLock(owner, False, refusal)]
        else:
            locks = [
                AdvisoryLock(owner, True, f"{self.where} is held by a2ad migrate; try again"),
                AdvisoryLock(
                    _lock_key(f"replica:{replica}", self.schema),
                    False,
                    f"{self.where} is served by a running replica named {replica!r};"
                    " stop it first, or give this one another store.replica_id",
                ),
            ]
        self._writer.locks = locks

        async def nothing(conn: Conn) -> None:
            return None

        try:
            await self._write(nothing, durable=False)
        except OwnerLost as exc:
            self._writer.locks = []
            raise StoreLocked(str(exc)) from None
        self._sole = replica is None
        self.depths.shared = not self._sole
        # A sole owner's commits need no telling; a replica's tell the others.
        self._writer.announce = not self._sole

    @property
    def where(self) -> str:
        rest = self.url.split("://", 1)[1]
        return f"postgresql://{rest.rsplit('@', 1)[-1].split('?', 1)[0]} (schema {self.schema})"

    # -- the two paths ---------------------------------------------------------

    def _submit(
        self,
        op: PgOp[Any],
        *,
        durable: bool = True,
        if_cancelled: Callable[[Any], None] | None = None,
        settled: bool = False,
    ) -> asyncio.Future[Any]:
        if self._writer is None or self._writer.closing:
            raise StoreUnavailable("the store is closed", retry_after=1)
        return self._writer.submit(op, durable=durable, if_cancelled=if_cancelled, settled=settled)

    async def _write(self, op: PgOp[Any], *, durable: bool = True) -> Any:
        return await self._submit(op, durable=durable)

    async def _run_outbox(
        self, statement: str, params: tuple[Any, ...], *, rows: bool, durable: bool
    ) -> Any:
        statement = statement.replace("?", "%s")

        async def op(conn: Conn) -> Any:
            cursor = await conn.execute(statement, params)
            return await cursor.fetchall() if rows else cursor.rowcount

        return await self._write(op, durable=durable)

    async def probe_write(self, now: float) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO write_probe (id, at) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
                (now,),
            )

        await self._write(op)

    # -- migrations --------------------------------------------------------------

    async def migrate(self, migrations: Iterable[Migration] | None = None) -> list[Migration]:
        """Apply the migrations the database has not seen, each in its own
        transaction under an advisory lock, so two processes never race."""
        pending = sorted(
            migrations if migrations is not None else bundled_migrations("migrations_pg"),
            key=lambda m: m.version,
        )
        conn = await self._connect()
        applied = []
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at double precision NOT NULL)"
            )
            for migration in pending:
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                        (_lock_key("migrate", self.schema),),
                    )
                    seen = await (
                        await conn.execute(
                            "SELECT 1 FROM schema_migrations WHERE version = %s",
                            (migration.version,),
                        )
                    ).fetchone()
                    if seen:
                        continue
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                        (migration.version, migration.name, time.time()),
                    )
                applied.append(migration)
        finally:
            await conn.close()
        return applied

    # -- writes ----------------------------------------------------------------

    async def enqueue(self, new: NewItem, *, now: float, replay_window: float) -> Enqueued:
        return await self.submit_enqueue(new, now=now, replay_window=replay_window)

    def submit_enqueue(
        self,
        new: NewItem,
        *,
        now: float,
        replay_window: float,
        caps: tuple[int, int] | None = None,
    ) -> asyncio.Future[Enqueued]:
        """A send's item. `caps` (per workspace, in all), checked by the caller
        against its counts: while other replicas are live, those counts may lag
        theirs by a moment (the items they queued since they last told), so near
        a cap (within CAP_MARGIN items or half of it) the store counts every
        replica's items itself, under a lock (pg_sql.past_caps)."""
        checked: tuple[int | None, int | None] = (None, None)
        if caps is not None and self._writer is not None and self._writer.announce:
            per_workspace, total = caps
            here = self.depths.of(new.workspace).live
            checked = (
                per_workspace if _near(here, per_workspace) else None,
                total if _near(self.depths.live_total, total) else None,
            )
        return self._submit(Enqueue(new, now, replay_window, checked), settled=True)

    def submit_claim(
        self,
        workspace: str,
        *,
        now: float,
        lease_seconds: float,
        promote_after: float,
        limit: int = 1,
        cap: int | None = None,
        if_cancelled: Callable[[list[Item]], None] | None = None,
    ) -> asyncio.Future[list[Item]]:
        params = {
            "workspace": workspace,
            "now": now,
            "limit": limit,
            "promote": promote_after,
            "lease": now + lease_seconds,
            "cap": NO_CAP if cap is None else cap,
            "replica": self.replica,
        }

        @one_statement
        async def op(conn: Conn) -> Counted[list[Item]]:
            rows = await (await conn.execute(CLAIM, params)).fetchall()
            items = [Item.from_row(row) for row in rows]  # best first
            moves = [Move(workspace, i.id, i.priority, "queued", "dispatching", now) for i in items]
            return Counted(items, moves)

        return self._submit(op, durable=False, if_cancelled=if_cancelled)

    async def claim(
        self,
        workspace: str,
        *,
        now: float,
        lease_seconds: float,
        promote_after: float,
        limit: int = 1,
        cap: int | None = None,
    ) -> list[Item]:
        return await self.submit_claim(
            workspace,
            now=now,
            lease_seconds=lease_seconds,
            promote_after=promote_after,
            limit=limit,
            cap=cap,
        )

    # -- slots shared by the replicas -------------------------------------------

    def submit_take_slot(
        self,
        workspace: str,
        *,
        token: str,
        cap: int,
        arrived: float,
        now: float,
        lease_until: float,
        if_cancelled: Callable[[bool], None] | None = None,
    ) -> asyncio.Future[bool]:
        """A direct send's slot, counted with every replica's: True when taken
        (a lease under `token`), False when none is free or an item queued
        before the send `arrived` is due. A taker cancelled while it waits is
        not told: `if_cancelled` is, once the take committed, to return it."""
        op = TakeSlot(
            workspace,
            token=token,
            cap=cap,
            arrived=arrived,
            now=now,
            lease=lease_until,
            replica=self.replica,
        )
        return self._submit(op, durable=False, if_cancelled=if_cancelled)

    async def take_slot(
        self,
        workspace: str,
        *,
        token: str,
        cap: int,
        arrived: float,
        now: float,
        lease_until: float,
    ) -> bool:
        return await self.submit_take_slot(
            workspace, token=token, cap=cap, arrived=arrived, now=now, lease_until=lease_until
        )

    def submit_free_slots(self, tokens: list[str]) -> asyncio.Future[None]:
        """Return direct sends' slots (the other replicas are told, to use them)."""
        return self._submit(FreeSlots(tokens, self._freed), durable=False)

    async def renew_slots(self, tokens: list[str], *, lease_until: float) -> set[str]:
        """Renew direct sends' slot leases; the tokens whose lease was gone."""

        @one_statement
        async def op(conn: Conn) -> set[str]:
            rows = await (
                await conn.execute(
                    "UPDATE slot_leases SET lease_until = %s WHERE token = ANY(%s) RETURNING token",
                    (lease_until, tokens),
                )
            ).fetchall()
            return set(tokens) - {token for (token,) in rows}

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    # -- what replicas share besides slots ------------------------------------------

    async def share_heartbeat(
        self, workspace: str, *, active: int, capacity: int | None, at: float
    ) -> int:
        """Store an agent's heartbeat for every replica and tell them; its load
        that is not a2ad's (its active tasks less the slots a2ad holds there)."""
        prefix = f"{self.instance} {NOTE}hb {workspace} {active} {capacity or '-'} "
        params = {"ws": workspace, "active": active, "cap": capacity, "at": at}

        async def op(conn: Conn) -> int:
            row = await (
                await conn.execute(
                    "WITH hb AS (INSERT INTO heartbeats AS h"
                    " (workspace, active, capacity, external, at)"
                    " VALUES (%(ws)s, %(active)s, %(cap)s, GREATEST(0, %(active)s - COALESCE("
                    "  (SELECT in_use FROM slots WHERE workspace = %(ws)s), 0)), %(at)s)"
                    " ON CONFLICT (workspace) DO UPDATE SET active = EXCLUDED.active,"
                    " capacity = EXCLUDED.capacity, external = EXCLUDED.external, at = EXCLUDED.at"
                    " RETURNING external)"
                    " SELECT external, pg_notify(%(channel)s,"
                    "  %(prefix)s || external::text || ' ' || %(at)s::text) FROM hb",
                    {**params, "channel": self.channel, "prefix": prefix},
                )
            ).fetchone()
            assert row is not None
            return int(row[0])

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def load_heartbeats(self) -> list[tuple[str, int, int | None, int, float]]:
        """Every agent's last heartbeat: (workspace, active, capacity, external, at)."""
        return await self._rows("SELECT workspace, active, capacity, external, at FROM heartbeats")

    async def take_duties(
        self, wanted: dict[str, bool], *, now: float, lease_seconds: float, started_at: float
    ) -> set[str]:
        """Take or keep the duties this replica wants (duty → whether it can
        restart that agent) and say it is alive; the duties it holds now. A duty
        is taken when free, lapsed, or held by one that cannot restart the agent
        when this one can. Whether other replicas are live decides whether its
        commits are announced."""
        duties = sorted(wanted)  # every replica locks duty rows in one order
        can = [wanted[d] for d in duties]

        async def op(conn: Conn) -> set[str]:
            await conn.execute(
                "INSERT INTO replicas (replica, started_at, seen_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (replica) DO UPDATE SET seen_at = EXCLUDED.seen_at,"
                " started_at = EXCLUDED.started_at",
                (self.replica, started_at, now),
            )
            await conn.execute(
                "DELETE FROM duties WHERE replica = %s AND NOT duty = ANY(%s)",
                (self.replica, duties),
            )
            rows = await (
                await conn.execute(
                    "INSERT INTO duties AS d (duty, replica, can_restart, lease_until)"
                    " SELECT duty, %(replica)s, can, %(until)s"
                    " FROM unnest(%(duties)s::text[], %(can)s::bool[]) AS w(duty, can)"
                    " ON CONFLICT (duty) DO UPDATE SET replica = EXCLUDED.replica,"
                    " can_restart = EXCLUDED.can_restart, lease_until = EXCLUDED.lease_until"
                    " WHERE d.replica = EXCLUDED.replica OR d.lease_until < %(now)s"
                    " OR (EXCLUDED.can_restart AND NOT d.can_restart)"
                    " RETURNING duty",
                    {
                        "replica": self.replica,
                        "until": now + lease_seconds,
                        "duties": duties,
                        "can": can,
                        "now": now,
                    },
                )
            ).fetchall()
            held = {duty for (duty,) in rows}
            others = await (
                await conn.execute(
                    "SELECT count(*) FROM replicas WHERE replica <> %s AND seen_at > %s",
                    (self.replica, now - lease_seconds),
                )
            ).fetchone()
            # Alone, its commits need no telling (a replica that joins counts the
            # queue and reads the heartbeats as it starts); else each batch tells.
            if self._writer is not None:
                self._writer.announce = bool(others and others[0])
            return held

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def drop_duties(self) -> None:
        """Stopping: another replica takes this one's duties at once."""

        async def op(conn: Conn) -> None:
            await conn.execute("DELETE FROM duties WHERE replica = %s", (self.replica,))

        await self._write(op, durable=False)

    async def replicas_seen(self) -> list[tuple[str, float, float, list[str]]]:
        """Each replica: (name, started_at, seen_at, the duties it holds)."""
        return await self._rows(
            "SELECT r.replica, r.started_at, r.seen_at,"
            " COALESCE(array_agg(d.duty ORDER BY d.duty) FILTER (WHERE d.duty IS NOT NULL), '{}')"
            " FROM replicas r LEFT JOIN duties d ON d.replica = r.replica"
            " GROUP BY r.replica, r.started_at, r.seen_at ORDER BY r.replica"
        )

    async def slots_in_use(self) -> dict[str, int]:
        """Each workspace's slots held over every replica (its agent's requests)."""
        return dict(await self._rows("SELECT workspace, in_use FROM slots"))

    async def record_restart(self, workspace: str, *, at: float, duty: str) -> bool:
        """Record a restart this replica is about to run, if it still holds the
        agent's `duty` (False: another took it over, and that one restarts)."""

        async def op(conn: Conn) -> bool:
            await conn.execute("DELETE FROM restarts WHERE at < %s - 3600", (at,))
            cursor = await conn.execute(
                "INSERT INTO restarts (workspace, at, replica) SELECT %s, %s, %s"
                " WHERE EXISTS (SELECT 1 FROM duties"
                "  WHERE duty = %s AND replica = %s AND lease_until > %s)",
                (workspace, at, self.replica, duty, self.replica, at),
            )
            return cursor.rowcount == 1

        return await self._write(op)  # type: ignore[no-any-return]

    async def clear_restarts(self, workspace: str) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute("DELETE FROM restarts WHERE workspace = %s", (workspace,))

        await self._write(op)

    async def restarts_since(self, workspace: str, since: float) -> list[float]:
        rows = await self._rows(
            "SELECT at FROM restarts WHERE workspace = %s AND at >= %s ORDER BY at",
            (workspace, since),
        )
        return [at for (at,) in rows]

    async def tell(self, kind: str, *fields: str) -> None:
        """A note to the other replicas (on_note there): a failure signal, a
        decision of the one that acts for an agent, a run-time workspace changed."""
        payload = " ".join([self.instance, NOTE + kind, *fields])[:MAX_PAYLOAD]
        await self._read(
            lambda conn: conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
        )

    def _freed(self, workspaces: Iterable[str]) -> None:
        """Workspaces whose slots a write freed: the commit's NOTIFY names them."""
        if self._writer is not None:
            self._writer.touched.update(workspaces)

    async def renew(self, claims: dict[str, str], *, lease_until: float, now: float) -> set[str]:
        @one_statement
        async def op(conn: Conn) -> set[str]:
            tokens = list(claims.values())
            rows = await (
                await conn.execute(
                    "WITH slots_renewed AS (UPDATE slot_leases SET lease_until = %s"
                    " WHERE token = ANY(%s))"
                    " UPDATE items SET lease_until = %s, updated_at = %s"
                    " WHERE id = ANY(%s) AND claim_token = ANY(%s) AND state = 'dispatching'"
                    " RETURNING id, claim_token",
                    (lease_until, tokens, lease_until, now, list(claims), tokens),
                )
            ).fetchall()
            kept = {item_id for item_id, token in rows if claims.get(item_id) == token}
            return set(claims) - kept

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def settle(
        self,
        item_id: str,
        token: str,
        *,
        state: State,
        now: float,
        result: bytes | None = None,
        last_error: str | None = None,
        agent_task_id: str | None = None,
        agent_context_id: str | None = None,
        attempt_used: bool = False,
    ) -> bool:
        assert state in FINAL_STATES
        return await self._move_claimed(
            "UPDATE items SET state = %(state)s, result = %(result)s,"
            " last_error = %(error)s, agent_task_id = %(task)s, agent_context_id = %(context)s,"
            " attempts = attempts + %(used)s, finished_at = %(now)s, updated_at = %(now)s,"
            " claim_token = NULL, lease_until = NULL",
            {
                "state": state,
                "result": result,
                "error": last_error,
                "task": agent_task_id,
                "context": agent_context_id,
                "used": int(attempt_used),
            },
            item_id,
            token,
            state,
            now,
        )

    async def hand_back(
        self,
        item_id: str,
        token: str,
        *,
        now: float,
        not_before: float = 0.0,
        attempt_used: bool = False,
        busy: bool = False,
        last_error: str | None = None,
    ) -> bool:
        return await self._move_claimed(
            "UPDATE items SET state = 'queued', attempts = attempts + %(used)s,"
            " busy_answers = busy_answers + %(busy)s, not_before = %(not_before)s,"
            " last_error = COALESCE(%(error)s, last_error), claim_token = NULL,"
            " lease_until = NULL, updated_at = %(now)s",
            {
                "used": int(attempt_used),
                "busy": int(busy),
                "not_before": not_before,
                "error": last_error,
            },
            item_id,
            token,
            "queued",
            now,
            not_before,
        )

    async def _move_claimed(
        self,
        update: str,
        params: dict[str, Any],
        item_id: str,
        token: str,
        new: State,
        now: float,
        not_before: float = 0.0,
    ) -> bool:
        """Move a claimed item on, and return its slot, in one statement."""
        statement = (
            f"WITH {FREE_TOKENS}, moved AS ({update}"
            " WHERE id = %(id)s AND claim_token = %(token)s AND state = 'dispatching'"
            " RETURNING workspace, priority) SELECT workspace, priority FROM moved"
        )
        params = {**params, "id": item_id, "token": token, "tokens": [token], "now": now}

        @one_statement
        async def op(conn: Conn) -> Counted[bool]:
            row = await (await conn.execute(statement, params)).fetchone()
            if row is None:
                return Counted(False)
            workspace, priority = row
            move = Move(workspace, item_id, priority, "dispatching", new, now, not_before)
            return Counted(True, (move,))

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def recover_dispatching(self, *, now: float, max_attempts: int) -> list[Released]:
        """At start-up. A sole owner takes back every item being delivered, with
        an attempt counted. A replica takes back only those whose lease lapsed:
        another replica's live claim is its own, and so may be one of an earlier
        run of this replica's name whose process still runs (cut off from the
        server, not dead), so nothing comes back before its lease says."""
        if not self._sole:
            return await self.sweep_leases(now=now, max_attempts=max_attempts)
        reason = "a2ad stopped while delivering (recovered at start-up)"
        params = {"now": now, "max_attempts": max_attempts, "reason": reason}

        async def op(conn: Conn) -> Counted[list[Released]]:
            rows = await (
                await conn.execute(RELEASE_DISPATCHING.format(condition=""), params)
            ).fetchall()
            await conn.execute("DELETE FROM slot_leases")
            await conn.execute("UPDATE slots SET in_use = 0 WHERE in_use <> 0")
            return released(rows, "dispatching", now)

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def sweep_leases(
        self, *, now: float, max_attempts: int, except_tokens: Collection[str] = ()
    ) -> list[Released]:
        """Claims and slots whose lease lapsed (a replica that died, or a server
        that lost a claim's outcome), but for `except_tokens`: back to the queue,
        and free again."""
        params = {
            "now": now,
            "max_attempts": max_attempts,
            "reason": "claim lease expired",
            "keep": list(except_tokens),
        }
        statement = RELEASE_DISPATCHING.format(
            condition="AND lease_until < %(now)s AND NOT claim_token = ANY(%(keep)s::text[])"
        )

        async def op(conn: Conn) -> Counted[list[Released]]:
            rows = await (await conn.execute(statement, params)).fetchall()
            swept = await (await conn.execute(SWEEP_SLOTS, params)).fetchall()
            self._freed(workspace for (workspace,) in swept)
            return released(rows, "dispatching", now)

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def release_claims(
        self, claims: dict[str, str], *, now: float, max_attempts: int
    ) -> list[Released]:
        statement = RELEASE_DISPATCHING.format(
            condition="AND id = %(id)s AND claim_token = %(token)s"
        )
        params = {"now": now, "max_attempts": max_attempts, "reason": "claim lease expired"}

        async def op(conn: Conn) -> Counted[list[Released]]:
            rows: list[Any] = []
            for item_id, token in claims.items():
                cur = await conn.execute(statement, {**params, "id": item_id, "token": token})
                rows += await cur.fetchall()
            await conn.execute(RETURN_SLOTS, {"tokens": list(claims.values())})
            return released(rows, "dispatching", now)

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def expire_due(self, *, now: float) -> list[Released]:
        @one_statement
        async def op(conn: Conn) -> Counted[list[Released]]:
            rows = await (
                await conn.execute(
                    "UPDATE items SET state = 'expired', finished_at = %(now)s,"
                    " updated_at = %(now)s, last_error = 'expired before it could be delivered'"
                    " || COALESCE(' (last: ' || last_error || ')', '')"
                    " WHERE state = 'queued' AND expires_at <= %(now)s"
                    " RETURNING id, workspace, state, priority",
                    {"now": now},
                )
            ).fetchall()
            return released(rows, "queued", now)

        return await self._write(op, durable=False)  # type: ignore[no-any-return]

    async def cancel(self, item_id: str, *, now: float) -> bool:
        async def op(conn: Conn) -> Counted[bool]:
            row = await (
                await conn.execute(
                    "UPDATE items SET state = 'cancelled', finished_at = %s, updated_at = %s,"
                    " last_error = 'cancelled' WHERE id = %s AND state = 'queued'"
                    " RETURNING workspace, priority",
                    (now, now, item_id),
                )
            ).fetchone()
            if row is None:
                return Counted(False)
            return Counted(True, (Move(row[0], item_id, row[1], "queued", "cancelled", now),))

        return await self._write(op)  # type: ignore[no-any-return]

    async def _requeue(self, conn: Conn, item_id: str, now: float, max_age: float) -> Any:
        """One failed or expired item back to queued, in a savepoint: a newer live
        item with its messageId makes this one a duplicate (UniqueViolation)."""
        async with conn.transaction():
            return await (
                await conn.execute(
                    "UPDATE items SET state = 'queued', attempts = 0, not_before = 0,"
                    " expires_at = %s + COALESCE(ttl_seconds, %s), finished_at = NULL,"
                    " updated_at = %s WHERE id = %s AND state IN ('failed', 'expired')"
                    " RETURNING workspace, priority",
                    (now, max_age, now, item_id),
                )
            ).fetchone()

    async def retry(
        self, item_id: str, *, now: float, max_age: float
    ) -> Literal["retried", "not_final", "duplicate"]:
        async def op(conn: Conn) -> Counted[Literal["retried", "not_final", "duplicate"]]:
            try:
                row = await self._requeue(conn, item_id, now, max_age)
            except psycopg.errors.UniqueViolation:
                return Counted("duplicate")
            if row is None:
                return Counted("not_final")
            return Counted("retried", (Move(row[0], item_id, row[1], "final", "queued", now),))

        return await self._write(op)  # type: ignore[no-any-return]

    async def retry_failed(self, workspace: str, *, now: float, max_age: float) -> int:
        async def op(conn: Conn) -> Counted[int]:
            failed = await (
                await conn.execute(
                    "SELECT id FROM items WHERE workspace = %s AND state = 'failed' ORDER BY seq",
                    (workspace,),
                )
            ).fetchall()
            moves = []
            for (item_id,) in failed:
                try:
                    row = await self._requeue(conn, item_id, now, max_age)
                except psycopg.errors.UniqueViolation:
                    continue  # a newer live item has its messageId: it stays failed
                if row is not None:
                    moves.append(Move(workspace, item_id, row[1], "final", "queued", now))
            return Counted(len(moves), moves)

        return await self._write(op)  # type: ignore[no-any-return]

    async def _count_changed(self, statement: str, params: Sequence[Any], *, durable: bool) -> int:
        @recount_elsewhere
        async def op(conn: Conn) -> int:
            return (await conn.execute(statement, params)).rowcount

        return await self._write(op, durable=durable)  # type: ignore[no-any-return]

    async def delete(self, item_id: str) -> bool:
        statement = (
            "DELETE FROM items WHERE id = %s AND state IN"
            " ('delivered', 'failed', 'expired', 'cancelled')"
        )
        return await self._count_changed(statement, (item_id,), durable=True) == 1

    async def purge(self, *, state: str, before: float, workspace: str | None = None) -> int:
        assert state in FINAL_STATES
        statement = "DELETE FROM items WHERE state = %s AND finished_at < %s"
        params: tuple[Any, ...] = (state, before)
        if workspace is not None:
            statement += " AND workspace = %s"
            params += (workspace,)
        return await self._count_changed(statement, params, durable=True)

    async def delete_finished(self, *, before: float, chunk: int = 2000) -> int:
        """Retention, a chunk per transaction, so sends never wait behind one long delete."""
        statement = (
            "DELETE FROM items WHERE seq IN (SELECT seq FROM items WHERE finished_at < %s LIMIT %s)"
        )
        deleted = 0
        while True:
            n = await self._count_changed(statement, (before, chunk), durable=False)
            deleted += n
            if n < chunk:
                return deleted

    async def recount(self) -> None:
        async def op(conn: Conn) -> Counted[None]:
            return Counted(None, snapshot=await live_snapshot(conn))

        await self._submit(op, durable=False)

    # -- run-time workspaces ----------------------------------------------------

    async def save_workspace(
        self, workspace_id: str, config: dict[str, Any], *, now: float
    ) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO workspaces (id, config, updated_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET config = EXCLUDED.config,"
                " updated_at = EXCLUDED.updated_at",
                (workspace_id, json.dumps(config), now),
            )

        await self._write(op)

    async def remove_workspace(self, workspace_id: str, *, purge: bool) -> int:
        async def op(conn: Conn) -> Counted[int]:
            await conn.execute("DELETE FROM workspaces WHERE id = %s", (workspace_id,))
            if not purge:
                return Counted(0)
            n = (
                await conn.execute("DELETE FROM items WHERE workspace = %s", (workspace_id,))
            ).rowcount
            return Counted(n, snapshot=Snapshot(frozenset([workspace_id])))

        return await self._write(op)  # type: ignore[no-any-return]

    async def tend(self) -> None:
        """Keep the planner's statistics of the items table current. A queue table
        grows and turns over fast, and autovacuum analyzes it at most once a minute:
        until then the writer's plans take a fresh table for an empty one, and
        looking up a batch's messageIds costs more with every row (measured: 4.5 ms
        a batch of 50 at 30,000 rows when analyzed as it grows, 11 ms when not)."""
        rows = await self._rows(
            "SELECT n_mod_since_analyze, n_live_tup FROM pg_stat_user_tables"
            " WHERE relid = 'items'::regclass"
        )
        if rows and rows[0][0] > ANALYZE_ROWS + ANALYZE_SHARE * rows[0][1]:
            await self._read(lambda conn: conn.execute("ANALYZE items"))

    async def data_version(self) -> int:
        """Changes when another process commits to the store (heard by LISTEN), and
        when the writer writes again after a failure: a commit whose answer was lost
        may have happened, so the daemon counts again."""
        return self._changes + (self._writer.recoveries if self._writer is not None else 0)
