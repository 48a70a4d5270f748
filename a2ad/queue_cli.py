"""`a2ad queue ls|show|retry|purge|pushes|push-retry` and `a2ad workspaces`: the store, read and
changed from the shell, safely beside a running daemon (which notices the
writes within about a second and recounts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .a2a import timestamp
from .clock import Clock
from .results import dead_push_views, item_view
from .settings import Settings
from .store import FINAL_STATES, STATES, Item, QueueStore, migrations_for, open_store

DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class QueueCliError(Exception):
    """A one-line error for the operator."""


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `7d` → seconds."""
    match = DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * UNITS[match.group(2)]


def add_commands(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `queue …` and `workspaces` to the CLI's subcommands."""
    queue = sub.add_parser("queue", help="list, show, retry and purge queue items")
    verbs = queue.add_subparsers(dest="verb", required=True)

    ls = verbs.add_parser("ls", help="list items, oldest first")
    ls.add_argument("--workspace", "-w")
    ls.add_argument("--state", "-s", choices=STATES)
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(run=_ls)

    show = verbs.add_parser("show", help="one item, with its request and the agent's answer")
    show.add_argument("id")
    show.set_defaults(run=_show)

    retry = verbs.add_parser("retry", help="failed or expired items back to the queue")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--failed", action="store_true", help="every failed item of --workspace")
    retry.add_argument("--workspace", "-w")
    retry.set_defaults(run=_retry)

    purge = verbs.add_parser("purge", help="delete final items")
    purge.add_argument("--state", "-s", required=True, choices=FINAL_STATES)
    purge.add_argument("--older-than", required=True, type=parse_duration, metavar="DURATION")
    purge.add_argument("--workspace", "-w")
    purge.set_defaults(run=_purge)

    pushes = verbs.add_parser("pushes", help="push updates that became dead letters")
    pushes.add_argument("--item", help="only this item's")
    pushes.add_argument("--limit", type=int, default=100)
    pushes.set_defaults(run=_pushes)

    push_retry = verbs.add_parser("push-retry", help="dead push updates back to the outbox")
    which = push_retry.add_mutually_exclusive_group(required=True)
    which.add_argument("seq", nargs="?", type=int, help="one dead letter, by its SEQ")
    which.add_argument("--all", action="store_true", help="every dead letter")
    push_retry.set_defaults(run=_push_retry)

    workspaces = sub.add_parser("workspaces", help="workspaces and their queue counts")
    workspaces.set_defaults(run=_workspaces)

    for parser in (ls, show, retry, purge, pushes, push_retry, workspaces):
        config_arg(parser)
        parser.add_argument("--json", action="store_true", help="JSON for scripts")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Open the store (never recovering claims: that is the owning daemon's) and run."""
    if not settings.store.is_postgres and not os.path.exists(settings.store.path):
        raise QueueCliError(f"no store at {settings.store.path}; a2ad serve creates it")
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    where = settings.store.where
    store = open_store(settings.store)
    await store.open()
    try:
        version, latest = await store.schema_version(), migrations_for(settings.store)[-1].version
        if version < latest:
            raise QueueCliError(
                f"{where} is at schema {version}, this a2ad needs {latest}: run a2ad migrate"
            )
        command: Callable[[QueueStore, argparse.Namespace, Settings], Awaitable[int]] = args.run
        return await command(store, args, settings)
    finally:
        await store.close()


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


async def _now(store: QueueStore) -> float:
    """Wall time on the store's clock, as the daemon keeps it (clock.py)."""
    clock = Clock()
    await clock.follow(store.server_time)
    return clock.now()


async def _ls(store: QueueStore, args: argparse.Namespace, settings: Settings) -> int:
    items = await store.list_items(workspace=args.workspace, state=args.state, limit=args.limit)
    if args.json:
        _print_json([item_view(i, with_result=False) for i in items])
        return 0
    if not items:
        print("no items")
        return 0
    now = await _now(store)
    rows = [
        (
            i.id,
            i.workspace,
            i.state,
            item_view(i)["priority"],
            str(i.attempts),
            _age(now - i.enqueued_at),
            (i.last_error or "")[:60],
        )
        for i in items
    ]
    _table(rows, ("ID", "WORKSPACE", "STATE", "PRIORITY", "ATTEMPTS", "AGE", "LAST ERROR"))
    return 0


async def _item(store: QueueStore, item_id: str) -> Item:
    item = await store.get(item_id)
    if item is None:
        raise QueueCliError(f"no queue item {item_id!r}")
    return item


async def _show(store: QueueStore, args: argparse.Namespace, settings: Settings) -> int:
    view = item_view(await _item(store, args.id), with_body=True)
    if args.json:
        _print_json(view)
        return 0
    for key, value in view.items():
        if key in ("body", "result"):
            continue
        print(f"{key + ':':<14}{'' if value is None else value}")
    for key in ("body", "result"):
        print(f"{key}:")
        print(json.dumps(view[key], indent=2) if view[key] is not None else "  (none)")
    return 0


async def _retry(store: QueueStore, args: argparse.Namespace, settings: Settings) -> int:
    now, max_age = await _now(store), settings.queue.max_age_seconds
    if args.failed:
        if not args.workspace:
            raise QueueCliError("--failed needs --workspace")
        count = await store.retry_failed(args.workspace, now=now, max_age=max_age)
        result: dict[str, Any] = {"workspace": args.workspace, "retried": count}
        message = f"{count} failed items of {args.workspace} queued again"
    else:
        item = await _item(store, args.id)
        outcome = await store.retry(item.id, now=now, max_age=max_age)
        if outcome == "duplicate":
            raise QueueCliError(f"{item.id}: a newer item with its messageId is waiting")
        if outcome == "not_final":
            raise QueueCliError(f"{item.id} is {item.state}; only failed or expired items")
        retried = await _item(store, item.id)
        expires = timestamp(retried.expires_at) if retried.expires_at else "never"
        result = {"id": item.id, "state": retried.state, "expires_at": expires}
        message = f"{item.id} queued again (attempts reset, expires {expires})"
    _print_json(result) if args.json else print(message)
    return 0


async def _purge(store: QueueStore, args: argparse.Namespace, settings: Settings) -> int:
    before = await _now(store) - args.older_than
    count = await store.purge(state=args.state, before=before, workspace=args.workspace)
    if args.json:
        _print_json({"state": args.state, "deleted": count})
    else:
        print(f"deleted {count} {args.state} items older than {_age(args.older_than)}")
    return 0


async def _pushes(store: QueueStore, args: argparse.Namespace, settings: Settings) -> int:
    views = await dead_push_views(store, item_id=args.item, limit=args.limit)
    if args.json:
        _print_json(views)
        return 0
    if not views:
        print("no dead push updates")
        return 0
    rows = [
        (
            str(v["seq"]),
            v["item_id"],
            v["update"],
            v["url"] or ("(the agent's task)" if v["config_id"] == "" else "(config deleted)"),
            str(v["attempts"]),
            (v["last_error"] or "")[:60],
        )
        for v in views
    ]
    _table(rows, ("SEQ", "ITEM", "UPDATE", "WEBHOOK", "ATTEMPTS", "LAST ERROR"))
    return 0


async def _push_retry(store: QueueStore, args: argparse.Namespace, settings: Settings) -> int:
    count = await store.retry_pushes(now=await _now(store), seq=None if args.all else args.seq)
    if not args.all and not count:
        raise QueueCliError(f"no dead push update {args.seq}")
    _print_json({"retried": count}) if args.json else print(f"{count} push updates due again")
    return 0


async def _workspaces(store: QueueStore, args: argparse.Namespace, settings: Settings) -> int:
    counts = await store.counts()
    urls = {w.id: w.url for w in settings.workspaces}
    for saved in await store.load_workspaces():  # registered at run time
        urls.setdefault(str(saved.get("id")), str(saved.get("url")))
    ids = list(urls) + sorted(set(counts) - set(urls))  # items of removed workspaces too
    queues = {ws_id: {s: counts.get(ws_id, {}).get(s, 0) for s in STATES} for ws_id in ids}
    if args.json:
        _print_json([{"id": i, "url": urls.get(i), "queue": queues[i]} for i in ids])
        return 0
    rows = [(i, urls.get(i, "(not configured)"), *(str(queues[i][s]) for s in STATES)) for i in ids]
    _table(rows, ("ID", "URL", *(s.upper() for s in STATES)))
    return 0
