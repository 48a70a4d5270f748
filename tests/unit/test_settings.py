"""load_settings(): a2ad.toml under A2AD_* variables, and one-line errors for a bad config."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from a2ad import a2a
from a2ad.settings import RESERVED_AGENT_HEADERS, ConfigError, Settings, load_settings

# The Configuration block of SPEC.md, every key set to a value that is not its default.
FULL_CONFIG = """
[server]
host = "127.0.0.2"
port = 9470
public_url = "https://a2ad.example.org/"
max_body_bytes = 2048
max_result_bytes = 4096
shutdown_grace_seconds = 2.5

[store]
path = "var/other.db"
synchronous = "normal"

[queue]
max_attempts = 3
lease_seconds = 1.5
promote_after_seconds = 12.5
info_ttl_seconds = 30.5
max_age_seconds = 3600.5
max_depth_per_workspace = 10
max_depth = 100
replay_window_seconds = 60.5
retention_seconds = 120.5

[liveness]
heartbeat_timeout_seconds = 9.5
recent_heartbeat_seconds = 1.5
debounce_window_seconds = 3.5
probe_interval_seconds = 0.25
restart_timeout_seconds = 6.5
restart_backoff_seconds = 0.5
restart_budget_per_hour = 2

[auth]
admin_token = "admin-secret"
allow_open = true

[[auth.callers]]
name = "planner"
token = "planner-secret"

[[workspaces]]
id = "demo"
url = "http://127.0.0.1:9001/"
max_concurrent = 3
token = "demo-secret"
heartbeat = true
request_timeout_seconds = 30.5
agent_token = "agent-secret"
agent_headers = { X-Api-Key = "key-secret", X-Tenant = "blue" }
restart_command = ["systemctl", "restart", "agent@demo"]
status_command = ["systemctl", "is-active", "agent@demo"]
"""


@pytest.fixture(autouse=True)
def no_a2ad_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's own A2AD_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("A2AD_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "a2ad.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path) -> str:
    """The ConfigError message for `path`, checked to be one line naming the file."""
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


# -- what loads ----------------------------------------------------------------


def test_defaults_from_an_empty_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8470
    assert settings.server.base_url == "http://127.0.0.1:8470"
    assert settings.server.max_body_bytes == 1_048_576
    assert settings.server.max_result_bytes == 10_485_760
    assert settings.server.shutdown_grace_seconds == 10
    assert settings.store.path == "var/a2ad.db"
    assert settings.store.synchronous == "full"
    q = settings.queue
    assert (q.max_attempts, q.lease_seconds, q.promote_after_seconds) == (5, 60, 120)
    assert (q.info_ttl_seconds, q.max_age_seconds) == (300, 86_400)
    assert (q.max_depth_per_workspace, q.max_depth) == (10_000, 1_000_000)
    assert (q.replay_window_seconds, q.retention_seconds) == (86_400, 604_800)
    lv = settings.liveness
    assert (lv.heartbeat_timeout_seconds, lv.recent_heartbeat_seconds) == (90, 15)
    assert (lv.debounce_window_seconds, lv.probe_interval_seconds) == (30, 10)
    assert (lv.restart_timeout_seconds, lv.restart_backoff_seconds) == (60, 5)
    assert lv.restart_budget_per_hour == 5
    assert settings.auth.admin_token == ""
    assert settings.auth.allow_open is False
    assert settings.auth.callers == []
    assert settings.workspaces == []


def test_workspace_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[workspaces]]
        id = "demo"
        url = "http://127.0.0.1:9001/"
        token = "t"
        """,
    )
    (ws,) = load_settings(path).workspaces
    assert ws.max_concurrent == 1
    assert ws.heartbeat is True
    assert ws.request_timeout_seconds == 300
    assert ws.restart_command == []
    assert ws.status_command == []
    assert (ws.agent_token, ws.agent_token_file, ws.agent_headers) == ("", "", {})
    assert ws.agent_credentials == {}


def test_every_spec_key_is_accepted(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL_CONFIG))

    server = settings.server
    assert (server.host, server.port) == ("127.0.0.2", 9470)
    assert server.base_url == "https://a2ad.example.org"
    assert (server.max_body_bytes, server.max_result_bytes) == (2048, 4096)
    assert server.shutdown_grace_seconds == 2.5
    assert (settings.store.path, settings.store.synchronous) == ("var/other.db", "normal")
    q = settings.queue
    assert (q.max_attempts, q.lease_seconds, q.promote_after_seconds) == (3, 1.5, 12.5)
    assert (q.info_ttl_seconds, q.max_age_seconds) == (30.5, 3600.5)
    assert (q.max_depth_per_workspace, q.max_depth) == (10, 100)
    assert (q.replay_window_seconds, q.retention_seconds) == (60.5, 120.5)
    lv = settings.liveness
    assert (lv.heartbeat_timeout_seconds, lv.recent_heartbeat_seconds) == (9.5, 1.5)
    assert (lv.debounce_window_seconds, lv.probe_interval_seconds) == (3.5, 0.25)
    assert (lv.restart_timeout_seconds, lv.restart_backoff_seconds) == (6.5, 0.5)
    assert lv.restart_budget_per_hour == 2
    assert settings.auth.admin_token == "admin-secret"
    assert settings.auth.allow_open is True
    (caller,) = settings.auth.callers
    assert (caller.name, caller.token) == ("planner", "planner-secret")
    (ws,) = settings.workspaces
    assert (ws.id, ws.url, ws.max_concurrent) == ("demo", "http://127.0.0.1:9001/", 3)
    assert (ws.token, ws.heartbeat, ws.request_timeout_seconds) == ("demo-secret", True, 30.5)
    assert ws.restart_command == ["systemctl", "restart", "agent@demo"]
    assert ws.status_command == ["systemctl", "is-active", "agent@demo"]
    assert ws.agent_token == "agent-secret"
    assert ws.agent_headers == {"X-Api-Key": "key-secret", "X-Tenant": "blue"}
    assert settings.open_endpoints == []


def test_durations_accept_integers_and_floats(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [queue]
        lease_seconds = 7
        max_age_seconds = 0.75
        [liveness]
        probe_interval_seconds = 1e-1
        """,
    )
    settings = load_settings(path)
    assert settings.queue.lease_seconds == 7.0
    assert settings.queue.max_age_seconds == 0.75
    assert settings.liveness.probe_interval_seconds == pytest.approx(0.1)


def test_secrets_are_read_from_token_files(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("admin-from-file\n")
    (tmp_path / "caller.token").write_text("  caller-from-file  \n")
    (tmp_path / "ws.token").write_text("ws-from-file\n")
    path = write(
        tmp_path,
        f"""
        [auth]
        admin_token_file = "{tmp_path / "admin.token"}"
        [[auth.callers]]
        name = "planner"
        token_file = "{tmp_path / "caller.token"}"
        [[workspaces]]
        id = "demo"
        url = "http://127.0.0.1:9001/"
        token_file = "{tmp_path / "ws.token"}"
        """,
    )
    settings = load_settings(path)
    assert settings.auth.admin_token == "admin-from-file"
    assert settings.auth.callers[0].token == "caller-from-file"
    assert settings.workspaces[0].token == "ws-from-file"


def test_tokens_are_not_in_the_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL_CONFIG))
    text = repr(settings)
    for secret in ("admin-secret", "planner-secret", "demo-secret", "agent-secret", "key-secret"):
        assert secret not in text


# -- the environment -------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        """
        [server]
        host = "127.0.0.2"
        port = 1234
        """,
    )
    monkeypatch.setenv("A2AD_SERVER__PORT", "4321")
    monkeypatch.setenv("A2AD_QUEUE__LEASE_SECONDS", "2.5")
    monkeypatch.setenv("A2AD_AUTH__ADMIN_TOKEN", "from-env")
    settings = load_settings(path)
    assert settings.server.port == 4321
    assert settings.server.host == "127.0.0.2"  # the rest of [server] stays the file's
    assert settings.queue.lease_seconds == 2.5
    assert settings.auth.admin_token == "from-env"


def test_lists_come_from_the_file_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        """
        [[workspaces]]
        id = "from-file"
        url = "http://127.0.0.1:9001/"
        heartbeat = false
        """,
    )
    monkeypatch.setenv(
        "A2AD_WORKSPACES",
        '[{"id": "from-env", "url": "http://127.0.0.1:9002/", "heartbeat": false}]',
    )
    monkeypatch.setenv("A2AD_AUTH__CALLERS", '[{"name": "env-caller", "token": "env-token"}]')
    settings = load_settings(path)
    assert [ws.id for ws in settings.workspaces] == ["from-file"]
    assert settings.auth.callers == []


def test_a_non_json_list_variable_is_ignored_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    monkeypatch.setenv("A2AD_WORKSPACES", "demo")
    assert load_settings(path).workspaces == []


def test_a_section_variable_that_is_not_json_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    monkeypatch.setenv("A2AD_SERVER", "x")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "A2AD_SERVER" in str(caught.value)


def test_a_bad_environment_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    monkeypatch.setenv("A2AD_SERVER__PORT", "x")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "A2AD_SERVER__PORT" in message
    assert "server.port" in message


def test_other_a2ad_variables_are_not_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read by the CLI, not part of the model: they must not count as unknown keys.
    monkeypatch.setenv("A2AD_CONFIG", str(tmp_path / "elsewhere.toml"))
    monkeypatch.setenv("A2AD_LOG_LEVEL", "debug")
    assert load_settings(write(tmp_path, "")) == Settings()


# -- errors: one line, the file and the field ---------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.toml")
    assert "no such file" in message


def test_bad_toml(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, '[server]\nhost = "127.0.0.1\n'))
    assert "TOML" in message
    assert "line 2" in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("colour = 1\n", "colour"),
        ("[server]\ncolour = 1\n", "server.colour"),
        ("[queue]\nmax_attempt = 3\n", "queue.max_attempt"),
        (
            '[[workspaces]]\nid = "a"\nurl = "http://x/"\nheartbeat = false\ncolour = 1\n',
            "workspaces[0].colour",
        ),
        ('[[auth.callers]]\nname = "a"\ntoken = "t"\ncolour = 1\n', "auth.callers[0].colour"),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, field: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f": {field}: unknown key" in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[server]\nport = "x"\n', "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ('[store]\nsynchronous = "off"\n', "store.synchronous"),
        ("[queue]\nlease_seconds = 0\n", "queue.lease_seconds"),
        ('[queue]\nmax_attempts = "many"\n', "queue.max_attempts"),
        ('[[workspaces]]\nid = "a"\nurl = "ftp://x/"\nheartbeat = false\n', "workspaces[0].url"),
        ('[[workspaces]]\nid = "a"\nheartbeat = false\n', "workspaces[0].url"),
        (
            '[[workspaces]]\nid = "a"\nurl = "http://x/"\nmax_concurrent = 0\nheartbeat = false\n',
            "workspaces[0].max_concurrent",
        ),
    ],
)
def test_invalid_value(tmp_path: Path, text: str, field: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f": {field}: " in message


def test_retention_below_replay_window(tmp_path: Path) -> None:
    text = "[queue]\nreplay_window_seconds = 100\nretention_seconds = 99.5\n"
    message = config_error(write(tmp_path, text))
    assert "retention_seconds" in message
    assert "replay_window_seconds" in message


def test_retention_equal_to_replay_window_is_fine(tmp_path: Path) -> None:
    text = "[queue]\nreplay_window_seconds = 100\nretention_seconds = 100\n"
    assert load_settings(write(tmp_path, text)).queue.retention_seconds == 100


def test_heartbeat_workspace_needs_a_token(tmp_path: Path) -> None:
    text = '[[workspaces]]\nid = "demo"\nurl = "http://127.0.0.1:9001/"\n'
    message = config_error(write(tmp_path, text))
    assert "workspaces[0]" in message
    assert "token" in message
    assert "heartbeat" in message


def test_workspace_without_heartbeat_needs_no_token(tmp_path: Path) -> None:
    text = '[[workspaces]]\nid = "demo"\nurl = "http://127.0.0.1:9001/"\nheartbeat = false\n'
    (ws,) = load_settings(write(tmp_path, text)).workspaces
    assert ws.token == ""


@pytest.mark.parametrize("bad_id", ["Demo", "-demo", "de mo", "", "a" * 65, "démo"])
def test_bad_workspace_id(tmp_path: Path, bad_id: str) -> None:
    text = f'[[workspaces]]\nid = "{bad_id}"\nurl = "http://x/"\nheartbeat = false\n'
    message = config_error(write(tmp_path, text))
    assert ": workspaces[0].id: " in message


@pytest.mark.parametrize("good_id", ["demo", "0", "a_b-c", "a" * 64])
def test_good_workspace_id(tmp_path: Path, good_id: str) -> None:
    text = f'[[workspaces]]\nid = "{good_id}"\nurl = "http://x/"\nheartbeat = false\n'
    assert load_settings(write(tmp_path, text)).workspaces[0].id == good_id


def test_duplicate_workspace_ids(tmp_path: Path) -> None:
    text = """
    [[workspaces]]
    id = "demo"
    url = "http://127.0.0.1:9001/"
    heartbeat = false
    [[workspaces]]
    id = "other"
    url = "http://127.0.0.1:9002/"
    heartbeat = false
    [[workspaces]]
    id = "demo"
    url = "http://127.0.0.1:9003/"
    heartbeat = false
    """
    message = config_error(write(tmp_path, text))
    assert "workspace ids must be unique" in message
    assert "demo" in message
    assert "other" not in message


@pytest.mark.parametrize("section", ["admin_token_file", "caller", "workspace"])
def test_missing_token_file_names_the_field(tmp_path: Path, section: str) -> None:
    missing = tmp_path / "missing.token"
    text = {
        "admin_token_file": f'[auth]\nadmin_token_file = "{missing}"\n',
        "caller": f'[[auth.callers]]\nname = "planner"\ntoken_file = "{missing}"\n',
        "workspace": f'[[workspaces]]\nid = "demo"\nurl = "http://x/"\ntoken_file = "{missing}"\n',
    }[section]
    message = config_error(write(tmp_path, text))
    assert "token_file" in message
    assert str(missing) in message
    field = {"admin_token_file": "auth", "caller": "auth.callers[0]", "workspace": "workspaces[0]"}
    assert f": {field[section]}: " in message


def test_empty_token_file(tmp_path: Path) -> None:
    (tmp_path / "empty.token").write_text("\n")
    text = f'[auth]\nadmin_token_file = "{tmp_path / "empty.token"}"\n'
    message = config_error(write(tmp_path, text))
    assert "admin_token_file" in message
    assert "empty" in message


def test_several_errors_stay_one_line(tmp_path: Path) -> None:
    text = '[server]\nport = "x"\ncolour = 1\n[queue]\nmax_attempts = 0\n'
    message = config_error(write(tmp_path, text))
    assert "more" in message


# -- agent credentials: from the file, checked at load --------------------------------

AGENT_WS = '[[workspaces]]\nid = "demo"\nurl = "http://127.0.0.1:9001/"\nheartbeat = false\n'


def test_agent_credentials_are_sent_as_headers(tmp_path: Path) -> None:
    (tmp_path / "agent.token").write_text("  agent-from-file \n")
    text = AGENT_WS + (
        f'agent_token_file = "{tmp_path / "agent.token"}"\nagent_headers = {{ X-Api-Key = "k" }}\n'
    )
    (ws,) = load_settings(write(tmp_path, text)).workspaces
    assert ws.agent_token == "agent-from-file"
    assert ws.agent_credentials == {"X-Api-Key": "k", "Authorization": "Bearer agent-from-file"}
    assert "agent-from-file" not in repr(ws)


def test_missing_agent_token_file_names_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "missing.token"
    message = config_error(write(tmp_path, AGENT_WS + f'agent_token_file = "{missing}"\n'))
    assert ": workspaces[0]: " in message
    assert "agent_token_file" in message and str(missing) in message


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "content-length",
        "Content-Type",
        "Transfer-Encoding",
        "Connection",
        "A2A-Version",
        "traceparent",
        "X-Request-Id",
    ],
)
def test_reserved_agent_headers_are_refused(tmp_path: Path, name: str) -> None:
    text = AGENT_WS + f'agent_headers = {{ "{name}" = "value-secret" }}\n'
    message = config_error(write(tmp_path, text))
    assert ": workspaces[0]: agent_headers: " in message
    assert name in message
    assert "value-secret" not in message


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ('{ "X Api" = "v-secret" }', "is not an HTTP header name"),
        ('{ X-Api-Key = "v-secret\\r\\nX-Evil: 1" }', "line break"),
        ('{ X-Api-Key = "" }', "X-Api-Key is empty"),
        ('{ X-Api-Key = "v-secret", x-api-key = "v-secret" }', "given twice"),
        ("{ X-Api-Key = 12 }", "valid string"),
    ],
)
def test_bad_agent_headers_are_one_line_errors(tmp_path: Path, table: str, says: str) -> None:
    message = config_error(write(tmp_path, AGENT_WS + f"agent_headers = {table}\n"))
    assert ": workspaces[0]" in message and says in message
    assert "v-secret" not in message


def test_agent_token_and_an_authorization_header_conflict(tmp_path: Path) -> None:
    text = AGENT_WS + 'agent_token = "t-secret"\nagent_headers = { Authorization = "Basic x" }\n'
    message = config_error(write(tmp_path, text))
    assert "Authorization and agent_token" in message
    assert "t-secret" not in message


def test_an_agent_token_with_a_line_break_is_refused(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, AGENT_WS + 'agent_token = "t-secret\\nX: y"\n'))
    assert ": workspaces[0]: agent_token holds a line break" in message
    assert "t-secret" not in message


def test_an_authorization_header_alone_is_allowed(tmp_path: Path) -> None:
    text = AGENT_WS + 'agent_headers = { Authorization = "Basic dTpw" }\n'
    (ws,) = load_settings(write(tmp_path, text)).workspaces
    assert ws.agent_credentials == {"Authorization": "Basic dTpw"}


def test_every_header_a2ad_passes_on_is_reserved() -> None:
    """A configured header never collides with one a2ad sets per request."""
    passed = {*a2a.FORWARDED_HEADERS, *a2a.STORED_HEADERS, "X-Request-Id", "Accept-Encoding"}
    assert {name.lower() for name in passed} <= RESERVED_AGENT_HEADERS
