"""The one Settings model: a2ad.toml, with scalar overrides from A2AD_* variables."""

from __future__ import annotations

import ipaddress
import os
import re
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
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    port: int = Field(8470, ge=0, le=65535)
    public_url: str = ""
    max_body_bytes: int = Field(1_048_576, ge=1)
    max_result_bytes: int = Field(10_485_760, ge=1)
    shutdown_grace_seconds: float = Field(10.0, ge=0)

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
    synchronous: Literal["full", "normal"] = "full"
    busy_timeout_seconds: float = Field(5.0, ge=0)


class QueueSettings(_Section):
    max_attempts: int = Field(5, ge=1)
    lease_seconds: float = Field(60.0, gt=0)
    promote_after_seconds: float = Field(120.0, gt=0)
    info_ttl_seconds: float = Field(300.0, gt=0)
    max_age_seconds: float = Field(86_400.0, gt=0)
    max_depth_per_workspace: int = Field(10_000, ge=1)
    max_depth: int = Field(1_000_000, ge=1)
    replay_window_seconds: float = Field(86_400.0, ge=0)
    retention_seconds: float = Field(604_800.0, ge=0)
    backoff_base_seconds: float = Field(1.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _retention_covers_replay(self) -> QueueSettings:
        if self.retention_seconds < self.replay_window_seconds:
            raise ValueError(
                f"retention_seconds ({self.retention_seconds:g}) must not be below "
                f"replay_window_seconds ({self.replay_window_seconds:g})"
            )
        return self


class LivenessSettings(_Section):
    heartbeat_timeout_seconds: float = Field(90.0, gt=0)
    recent_heartbeat_seconds: float = Field(15.0, ge=0)
    debounce_window_seconds: float = Field(30.0, ge=0)
    probe_interval_seconds: float = Field(10.0, gt=0)
    restart_timeout_seconds: float = Field(60.0, gt=0)
    restart_backoff_seconds: float = Field(5.0, ge=0)
    restart_budget_per_hour: int = Field(5, ge=0)


class CallerSettings(_Section):
    name: str = Field(min_length=1, max_length=128)
    token: str = Field("", repr=False)
    token_file: str = ""

    @model_validator(mode="after")
    def _token_from_file(self) -> CallerSettings:
        if self.token_file and not self.token:
            object.__setattr__(self, "token", _read_secret(self.token_file, "token_file"))
        if not self.token:
            raise ValueError("a caller needs token or token_file")
        return self


class AuthSettings(_Section):
    admin_token: str = Field("", repr=False)
    admin_token_file: str = ""
    allow_open: bool = False
    callers: list[CallerSettings] = Field(default_factory=list)

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
    url: str = Field(pattern=r"^https?://[^\s]+$")
    max_concurrent: int = Field(1, ge=1)
    token: str = Field("", repr=False)
    token_file: str = ""
    heartbeat: bool = True
    request_timeout_seconds: float = Field(300.0, gt=0)
    restart_command: list[str] = Field(default_factory=list)
    status_command: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _token(self) -> WorkspaceSettings:
        if self.token_file and not self.token:
            object.__setattr__(self, "token", _read_secret(self.token_file, "token_file"))
        if self.heartbeat and not self.token:
            raise ValueError(f"workspace {self.id!r} has heartbeat = true and needs a token")
        return self


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
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    liveness: LivenessSettings = Field(default_factory=LivenessSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    workspaces: list[WorkspaceSettings] = Field(default_factory=list)

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
