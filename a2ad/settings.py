"""The one Settings model: a2ad.toml, with scalar overrides from A2AD_* variables."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "A2AD_"
ENV_DELIMITER = "__"
WORKSPACE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class _Section(BaseModel):
    # Each field's docstring is its description: the configuration reference
    # (a2ad/config_reference.py) is generated from them.
    # No inf or nan: an infinite timeout or TTL breaks the arithmetic built on it.
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


# Headers a2ad sets itself on each request to an agent, or that belong to the
# connection rather than the request: an agent_headers table may not name them.
RESERVED_AGENT_HEADERS = frozenset(
    {
        # the connection and the body's framing
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "content-encoding",
        "accept-encoding",
        # what a2ad passes on from each request (a2a.FORWARDED_HEADERS, STORED_HEADERS)
        "a2a-version",
        "a2a-extensions",
        "accept",
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A header value may not hold control characters: a line break would end the header.
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _read_secret(path: str, field: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {field} {path!r}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{field} {path!r} is empty")
    return value


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    """Address `a2ad serve` listens on."""
    port: int = Field(8470, ge=0, le=65535)
    """Port `a2ad serve` listens on."""
    public_url: str = ""
    """URL callers reach a2ad at, written into agent cards; empty: http://{host}:{port}."""
    max_body_bytes: int = Field(1_048_576, ge=1)
    """Largest request body; a larger one is refused with body_too_large (413)."""
    max_result_bytes: int = Field(10_485_760, ge=1)
    """Largest agent answer kept; a larger one is stored as a result_too_large error."""
    # One header line (and the request line) at most; over it → 431.
    max_header_bytes: int = Field(8190, ge=1024, le=1_048_576)
    """Longest request line or header line; a longer one is refused with 431."""
    # A connection must finish a request's headers, and then its body, within
    # this long (a slow client holds a socket and a handler, not a slot).
    client_timeout_seconds: float = Field(60.0, gt=0)
    """Time a connection has to send a request's headers, and then its body."""
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    """On SIGTERM, time running deliveries get to finish before they are requeued."""

    @property
    def base_url(self) -> str:
        """The URL callers reach a2ad at, without a trailing slash."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class StoreSettings(_Section):
    path: str = "var/a2ad.db"
    """SQLite database file (WAL mode), relative to the working directory."""
    synchronous: Literal["full", "normal"] = "full"
    """SQLite synchronous for new items and operator changes: full keeps every 202
    through a power cut, normal through a crash (a delivery's steps always use normal)."""
    busy_timeout_seconds: float = Field(5.0, ge=0)
    """How long a write waits for another process's lock (the queue commands)."""
    url: str = ""
    """PostgreSQL instead of SQLite: postgresql://user@host:port/db, libpq parameters
    such as sslmode in the query (needs pip install 'a2ad[postgres]')."""
    url_file: str = ""
    """File holding store.url (keeps the password out of the config file)."""
    schema_name: str = Field("a2ad", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """PostgreSQL schema holding a2ad's tables (created by a2ad migrate or serve)."""
    pool_size: int = Field(4, ge=1, le=100)
    """PostgreSQL connections for reads; one more writes (and holds the lock), one listens."""
    statement_timeout_seconds: float = Field(30.0, gt=0)
    """PostgreSQL statement_timeout of a2ad's connections."""
    replica_id: str = Field("", max_length=200, pattern=r"^[^\s\x00]*$")
    """PostgreSQL replicas: this one's name, unique among them (default host:port)."""

    @model_validator(mode="after")
    def _url_from_file(self) -> StoreSettings:
        if self.url_file and not self.url:
            object.__setattr__(self, "url", _read_secret(self.url_file, "store.url_file"))
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("store.url must start with postgresql:// (SQLite takes store.path)")
        if self.schema_name.startswith("pg_"):
            raise ValueError("store.schema may not start with pg_ (PostgreSQL keeps those)")
        return self

    @property
    def is_postgres(self) -> bool:
        return bool(self.url)

    @property
    def where(self) -> str:
        """The store for people and logs, without a password."""
        if not self.is_postgres:
            return self.path
        rest = self.url.split("://", 1)[1]
        host = rest.rsplit("@", 1)[-1].split("?", 1)[0]
        return f"postgresql://{host} (schema {self.schema_name})"


class QueueSettings(_Section):
    max_attempts: int = Field(5, ge=1)
    """Failed deliveries before an item is failed (dead letter); busy answers do not count."""
    lease_seconds: float = Field(60.0, gt=0)
    """Lease of a claimed item, renewed every third of it while the delivery runs."""
    promote_after_seconds: float = Field(120.0, gt=0)
    """Each full period an item waits moves it up a priority: info → task → critical."""
    info_ttl_seconds: float = Field(300.0, gt=0)
    """Expiry of info-priority items sent without an A2AD-TTL header."""
    max_age_seconds: float = Field(86_400.0, gt=0)
    """Every item expires this long after it was queued, whatever its TTL."""
    max_depth_per_workspace: int = Field(10_000, ge=1)
    """Items waiting or being delivered per workspace before sends get queue_full."""
    max_depth: int = Field(1_000_000, ge=1)
    """Items waiting or being delivered in all before sends get queue_full."""
    replay_window_seconds: float = Field(86_400.0, ge=0)
    """A resent messageId is answered from its delivered item for this long."""
    retention_seconds: float = Field(604_800.0, ge=0)
    """Final items are deleted this long after; not below replay_window_seconds."""
    backoff_base_seconds: float = Field(1.0, gt=0)
    """Failed attempt n waits about base × 2^(n-1), with jitter."""
    backoff_max_seconds: float = Field(300.0, gt=0)
    """Longest wait after a failed attempt."""
    blocking_wait_seconds: float = Field(60.0, ge=0)
    """Longest hold of a blocking send that was queued; then it gets the Task with 202."""
    max_held: int = Field(1000, ge=0)
    """Blocking sends held at once; past it a queued send gets the Task with 202 at once."""

    @model_validator(mode="after")
    def _retention_covers_replay(self) -> QueueSettings:
        if self.retention_seconds < self.replay_window_seconds:
            raise ValueError(
                f"retention_seconds ({self.retention_seconds:g}) must not be below "
                f"replay_window_seconds ({self.replay_window_seconds:g})"
            )
        return self


class PushSettings(_Section):
    max_attempts: int = Field(10, ge=1)
    """Attempts to POST one update to a webhook; then it is a dead letter."""
    timeout_seconds: float = Field(10.0, gt=0)
    """Time limit of one POST to a webhook."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Webhook hosts allowed although on loopback or private addresses."""
    max_configs_per_task: int = Field(10, ge=1, le=100)
    """Push configs one task may hold."""


class LivenessSettings(_Section):
    heartbeat_timeout_seconds: float = Field(90.0, gt=0)
    """A heartbeat counts this long; no sign of life for this long: offline."""
    recent_heartbeat_seconds: float = Field(15.0, ge=0)
    """A not-running probe this soon after a sign of life needs a second one."""
    debounce_window_seconds: float = Field(30.0, ge=0)
    """Window for that second probe; busy answers lasting longer ask for a probe."""
    probe_interval_seconds: float = Field(10.0, gt=0)
    """Probe period for offline, restarting or heartbeat-less agents with items."""
    restart_timeout_seconds: float = Field(60.0, gt=0)
    """Time limit of restart_command; not-running probes are ignored this long after."""
    restart_backoff_seconds: float = Field(5.0, ge=0)
    """Wait before a second restart within an hour, doubling per restart up to 600 s."""
    restart_budget_per_hour: int = Field(5, ge=0)
    """Restarts per hour; past it the workspace is failed until POST …/reset."""


class CallerSettings(_Section):
    name: str = Field(min_length=1, max_length=128)
    """Caller name, unique; recorded with its items."""
    token: str = Field("", repr=False)
    """Bearer token the caller sends to the proxy and to read its own items."""
    token_file: str = ""
    """File holding the token, read when token is empty."""

    @model_validator(mode="after")
    def _token_from_file(self) -> CallerSettings:
        if self.token_file and not self.token:
            object.__setattr__(self, "token", _read_secret(self.token_file, "token_file"))
        if not self.token:
            raise ValueError("a caller needs token or token_file")
        return self


class AuthSettings(_Section):
    admin_token: str = Field("", repr=False)
    """Bearer token for the operator endpoints; empty: they are open."""
    admin_token_file: str = ""
    """File holding the admin token, read when admin_token is empty."""
    allow_open: bool = False
    """Serve endpoints without tokens on an address that is not loopback."""
    # Let run-time workspaces (PUT /workspaces/{id}) point at link-local and
    # cloud-metadata addresses; off, because that is how request forgery reaches them.
    allow_link_local_agents: bool = False
    """Let run-time workspaces point at link-local and cloud-metadata addresses."""
    callers: list[CallerSettings] = Field(default_factory=list)
    """Named callers and their tokens; with none, the proxy is open."""

    @model_validator(mode="after")
    def _check(self) -> AuthSettings:
        if self.admin_token_file and not self.admin_token:
            token = _read_secret(self.admin_token_file, "admin_token_file")
            object.__setattr__(self, "admin_token", token)
        names = [c.name for c in self.callers]
        if len(names) != len(set(names)):
            raise ValueError("caller names must be unique")
        return self


class WorkspaceSettings(_Section):
    id: str = Field(pattern=WORKSPACE_ID_PATTERN)
    """Workspace id, in its URLs: /workspaces/{id}/a2a."""
    url: str = Field(pattern=r"^https?://[^\s]+$")
    """The agent's A2A JSON-RPC endpoint."""
    max_concurrent: int = Field(1, ge=1)
    """Slots, unless a heartbeat gives max_concurrent_tasks."""
    token: str = Field("", repr=False)
    """Bearer token of the agent's heartbeats; required with heartbeat = true."""
    token_file: str = ""
    """File holding the token, read when token is empty."""
    heartbeat: bool = True
    """Whether the agent sends heartbeats; false: it is never offline."""
    request_timeout_seconds: float = Field(300.0, gt=0)
    """Time limit of one request to the agent; for a stream, its longest silence."""
    agent_token: str = Field("", repr=False)
    """Bearer token a2ad sends to the agent (Authorization: Bearer) on every request."""
    agent_token_file: str = ""
    """File holding agent_token, read when agent_token is empty."""
    agent_headers: dict[str, str] = Field(default_factory=dict, repr=False)
    """Further headers a2ad sends to the agent on every request, e.g. {X-Api-Key = "…"}."""
    restart_command: list[str] = Field(default_factory=list)
    """argv (no shell, A2AD_WORKSPACE set) that restarts a dead agent; []: none."""
    status_command: list[str] = Field(default_factory=list)
    """argv: exit 0 running, 1 not running; []: probe with a GET of the agent card."""
    replicas: list[str] = Field(default_factory=list)
    """PostgreSQL replicas that may deliver to it (their store.replica_id); []: all."""

    @model_validator(mode="after")
    def _token(self) -> WorkspaceSettings:
        if self.token_file and not self.token:
            object.__setattr__(self, "token", _read_secret(self.token_file, "token_file"))
        if self.heartbeat and not self.token:
            raise ValueError(f"workspace {self.id!r} has heartbeat = true and needs a token")
        return self

    @model_validator(mode="after")
    def _agent_credentials(self) -> WorkspaceSettings:
        # Messages name fields and headers, never values: these are secrets.
        if self.agent_token_file and not self.agent_token:
            token = _read_secret(self.agent_token_file, "agent_token_file")
            object.__setattr__(self, "agent_token", token)
        if _BAD_HEADER_VALUE.search(self.agent_token):
            raise ValueError("agent_token holds a line break or another control character")
        seen: set[str] = set()
        for name, value in self.agent_headers.items():
            lowered = name.lower()
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"agent_headers: {name[:60]!r} is not an HTTP header name")
            if lowered in RESERVED_AGENT_HEADERS:
                raise ValueError(
                    f"agent_headers: {name} is set by a2ad or by the connection, not configured"
                )
            if lowered in seen:
                raise ValueError(f"agent_headers: {name} is given twice")
            seen.add(lowered)
            if lowered == "authorization" and self.agent_token:
                raise ValueError(
                    "agent_headers: Authorization and agent_token set the same header; give one"
                )
            if not value.strip():
                raise ValueError(f"agent_headers: {name} is empty")
            if _BAD_HEADER_VALUE.search(value):
                raise ValueError(
                    f"agent_headers: {name} holds a line break or another control character"
                )
        return self

    @property
    def agent_credentials(self) -> dict[str, str]:
        """The headers a2ad adds to every request to this agent."""
        headers = dict(self.agent_headers)
        if self.agent_token:
            headers["Authorization"] = f"Bearer {self.agent_token}"
        return headers


class _ScalarEnvSource(EnvSettingsSource):
    """A2AD_* variables for scalars only: lists (workspaces, callers) come from the file."""

    _LIST_PREFIXES = (f"{ENV_PREFIX}workspaces", f"{ENV_PREFIX}auth{ENV_DELIMITER}callers")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Dropped before pydantic-settings parses them, so a stray variable is
        # neither used nor an error. Names are compared in lower case, as read.
        prefixes = tuple(p.lower() for p in self._LIST_PREFIXES)
        return {
            name: value
            for name, value in super()._load_env_vars().items()
            if not name.lower().startswith(prefixes)
        }


class Settings(BaseSettings):
    """Everything a2ad is told, built once and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    """The HTTP listener of `a2ad serve`, and the URL callers reach a2ad at."""
    store: StoreSettings = Field(default_factory=StoreSettings)
    """The SQLite file that holds the queue."""
    queue: QueueSettings = Field(default_factory=QueueSettings)
    """Delivery attempts, leases, expiry, depth caps and retention of items."""
    liveness: LivenessSettings = Field(default_factory=LivenessSettings)
    """Heartbeats, probes and restarts of the agents."""
    push: PushSettings = Field(default_factory=PushSettings)
    """Push notifications a2ad sends for queued tasks (webhooks)."""
    auth: AuthSettings = Field(default_factory=AuthSettings)
    """Bearer tokens; endpoints without tokens are open (on loopback only)."""
    workspaces: list[WorkspaceSettings] = Field(default_factory=list)
    """The agents a2ad fronts, one table each."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file, whose contents arrive as init values.
        return (_ScalarEnvSource(settings_cls), init_settings)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        ids = [w.id for w in self.workspaces]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"workspace ids must be unique: {', '.join(dupes)}")
        tokens = [self.auth.admin_token] if self.auth.admin_token else []
        tokens += [c.token for c in self.auth.callers]
        tokens += [w.token for w in self.workspaces if w.token]
        if len(tokens) != len(set(tokens)):
            raise ValueError("every token (admin, callers, workspaces) must be different")
        if not self.store.replica_id:
            replica = f"{socket.gethostname()}:{self.server.port}"
            object.__setattr__(self.store, "replica_id", replica)
        return self

    @property
    def open_endpoints(self) -> list[str]:
        """Which endpoint groups run without a token."""
        groups = []
        if not self.auth.callers:
            groups.append("proxy (no [[auth.callers]])")
        if not self.auth.admin_token:
            groups.append("operator endpoints (no auth.admin_token)")
        return groups


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line for the operator."""


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _env_name(loc: tuple[int | str, ...]) -> str | None:
    parts = [p for p in loc if isinstance(p, str)]
    name = ENV_PREFIX + ENV_DELIMITER.join(parts).upper()
    return name if len(parts) == len(loc) and name in os.environ else None


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc = tuple(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    env = _env_name(loc)
    where = f"environment {env}" if env else source
    field = _field_path(loc)
    more = len(error.errors()) - 1
    extra = f" (and {more} more)" if more else ""
    return f"{where}: {field}: {message}{extra}" if field else f"{where}: {message}{extra}"


def load_settings(path: str | os.PathLike[str] | None) -> Settings:
    """Read the TOML file (if any) under the A2AD_* environment; raise ConfigError."""
    data: dict[str, Any] = {}
    source = "environment"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    except SettingsError as exc:  # an A2AD_* variable that is not valid JSON for its section
        found = re.search(r'field "([^"]+)"', str(exc))
        name = ENV_PREFIX + (found.group(1).upper() if found else "*")
        raise ConfigError(
            f"environment {name}: not valid JSON for that section; set one key at a time, "
            f"e.g. {ENV_PREFIX}SERVER{ENV_DELIMITER}PORT=8470"
        ) from None
