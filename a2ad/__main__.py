"""The a2ad command line: serve, check, migrate."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from . import __version__, check, logs, queue_cli, systemd
from .app import create_app
from .daemon import DAEMON
from .errors import StoreUnavailable
from .listener import Runner
from .settings import ConfigError, Settings, load_settings
from .store import StoreLock, StoreLocked, open_store

EXIT_CONFIG = 2

log = logging.getLogger("a2ad")


class CliError(Exception):
    """A one-line error for the operator; exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.code = code


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("A2AD_CONFIG") or None
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise CliError(f"config error: {exc}") from None


def _refuse_open(settings: Settings) -> None:
    """Open endpoints are for loopback only, unless the operator says otherwise."""
    open_groups = settings.open_endpoints
    if open_groups and not settings.server.is_loopback and not settings.auth.allow_open:
        raise CliError(
            f"refusing to serve {', '.join(open_groups)} without tokens on "
            f"{settings.server.host}, which is not a loopback address; configure tokens "
            "or set auth.allow_open = true"
        )


def _take_lock(settings: Settings, action: str) -> StoreLock | None:
    """SQLite's owner lock on <store.path>.lock; PostgreSQL's are advisory locks
    the store takes itself (None here)."""
    if settings.store.is_postgres:
        return None
    lock = StoreLock(settings.store.path)
    try:
        lock.acquire()
    except StoreLocked as exc:
        raise CliError(f"cannot {action}: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot {action}: {lock.path}: {exc.strerror}") from None
    return lock


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _refuse_open(settings)
    lock = _take_lock(settings, "serve")
    try:
        asyncio.run(_serve(settings, lock))
    finally:
        if lock is not None:
            lock.release()
    return 0


# The first generation is collected after this many new container objects, not
# CPython's 700: every send allocates dozens (the parsed request, its Task
# answer, aiohttp's request objects), so at 700 a collection ran every dozen
# or so sends. Measured with `make bench BENCH_ARGS="--only proxy,enqueue"` against
# the previous build in the same run: CPU per durable 202 -7 % at 50 callers and
# -13 % at 200 (wrk), per relayed answer -9 % and -18 %, as with the collector
# off, while cycles are still collected within a fraction of a second.
GC_FIRST_GENERATION = 10_000


def _tune_gc() -> None:
    """Start-up's objects live as long as the process: frozen, no collection scans
    them again; then the first generation's threshold (GC_FIRST_GENERATION)."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_FIRST_GENERATION, second, third)


async def _serve(settings: Settings, lock: StoreLock | None) -> None:
    """Run until SIGTERM or SIGINT; a second signal exits at once.

    Stopping: the listener closes, claiming stops, deliveries get
    shutdown_grace_seconds to finish, unfinished claims go back to the queue
    without using an attempt, the store closes. Exiting at once on a second
    signal loses nothing acknowledged either: every 202 was committed first,
    and the next start returns the claims of this process to the queue."""
    server = settings.server
    app = create_app(settings, lock=lock)
    runner = Runner(
        app,
        server,
        access_log=None,
        shutdown_timeout=server.shutdown_grace_seconds,
        # A caller that leaves ends its handler, so a relayed stream frees its slot.
        handler_cancellation=True,
    )
    try:
        await runner.setup()  # takes the store: migrations, recovery, loops
    except StoreUnavailable as exc:
        raise CliError(exc.message, code=1) from None
    except StoreLocked as exc:
        raise CliError(f"cannot serve: {exc}") from None
    try:
        site = web.TCPSite(runner, server.host, server.port)
        try:
            await site.start()
        except OSError as exc:
            raise CliError(
                f"cannot listen on {server.host}:{server.port}: {exc.strerror}", code=1
            ) from None
        log.info(
            "a2ad %s listening on %s (store %s)", __version__, server.base_url, settings.store.where
        )
        _tune_gc()
        systemd.notify("READY=1")
        interval = systemd.watchdog_interval()
        watchdog = asyncio.create_task(systemd.watchdog(interval)) if interval else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, stop)
        await stop.wait()
        app[DAEMON].begin_shutdown()
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        log.info(
            "stopping: finishing deliveries for up to %g s (signal again to exit now)",
            server.shutdown_grace_seconds,
        )
    finally:
        await runner.cleanup()


def _on_signal(stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second signal: exiting now; unfinished deliveries resume at next start")
        os._exit(1)
    stop.set()


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    lock = _take_lock(settings, "migrate (is a2ad serve running on this store?)")

    async def run() -> list[str]:
        store = open_store(settings.store)
        await store.open()
        try:
            # PostgreSQL: the sole owner's advisory lock, refused while any replica
            # serves (SQLite's file lock is taken above).
            await store.take_ownership()
            applied = await store.migrate()
        finally:
            await store.close()
        return [f"{m.version:04d} {m.name}" for m in applied]

    try:
        applied = asyncio.run(run())
    except StoreLocked as exc:
        raise CliError(f"cannot migrate (is a2ad serve running on this store?): {exc}") from None
    except StoreUnavailable as exc:
        raise CliError(f"cannot migrate: {exc.message}", code=1) from None
    finally:
        if lock is not None:
            lock.release()
    if applied:
        for line in applied:
            print(f"applied {line}")
    else:
        print(f"{settings.store.where}: up to date")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _refuse_open(settings)
    return check.run(settings, args.config)


def log_options(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """--log-level and --log-format, before or after the command's name (a
    command's own copy keeps the value given before it unless given again)."""
    level = os.environ.get("A2AD_LOG_LEVEL", "info") if default else argparse.SUPPRESS
    fmt = os.environ.get("A2AD_LOG_FORMAT", "plain") if default else argparse.SUPPRESS
    parser.add_argument("--log-level", default=level, help="debug, info, warning or error")
    parser.add_argument(
        "--log-format",
        default=fmt,
        choices=logs.FORMATS,
        help="plain text or one JSON object a line",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a2ad", description="The A2A delivery daemon.")
    parser.add_argument("--version", action="version", version=f"a2ad {__version__}")
    log_options(parser, default=True)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_arg(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--config", "-c", help="path to a2ad.toml (or A2AD_CONFIG)")
        log_options(cmd, default=False)

    for name, func, help_text in (
        ("serve", cmd_serve, "run the daemon"),
        ("check", cmd_check, "validate the config, open the store, probe each workspace"),
        ("migrate", cmd_migrate, "apply pending store migrations (refused while serving)"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        config_arg(cmd)
        cmd.set_defaults(func=func)
    queue_cli.add_commands(sub, config_arg)
    for name in ("queue", "workspaces"):
        sub.choices[name].set_defaults(func=cmd_queue)
    return parser


def cmd_queue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        return queue_cli.run(args, settings)
    except queue_cli.QueueCliError as exc:
        raise CliError(str(exc), code=1) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"a2ad: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
