"""The configuration reference in README.md is the one generated from the Settings model,
every setting has a description, and the README's example configuration loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from a2ad import config_reference
from a2ad.config_reference import END, REGENERATE, START, read_block, render, undocumented
from a2ad.errors import A2adError
from a2ad.settings import load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def section(text: str, heading: str) -> str:
    """A `## heading` section of the README, up to the next `## ` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_readme_holds_the_generated_reference() -> None:
    assert read_block(README.read_text(encoding="utf-8")) == render(), (
        "README.md's configuration reference differs from the Settings model; "
        f"regenerate it with: {REGENERATE}"
    )


def test_the_reference_sits_in_the_configuration_section() -> None:
    configuration = section(README.read_text(encoding="utf-8"), "Configuration")
    assert START in configuration and END in configuration


def test_every_setting_has_a_description() -> None:
    missing = list(undocumented())
    assert not missing, (
        f"settings without a description: {', '.join(missing)}; give each a docstring "
        f'("""...""") on the line under the field in a2ad/settings.py, then: {REGENERATE}'
    )


def test_the_reference_names_keys_defaults_and_variables() -> None:
    rows = render().splitlines()
    assert (
        "| `server.port` | integer 0–65535 | `8470` | `A2AD_SERVER__PORT` | "
        "Port `a2ad serve` listens on. |"
    ) in rows
    workspace_id = next(row for row in rows if row.startswith("| `workspaces[].id` |"))
    assert "| required | file only |" in workspace_id
    assert any(row.startswith("| `auth.callers[].name` |") for row in rows)
    assert "`[[workspaces]]`: The agents a2ad fronts, one table each." in rows


def test_write_replaces_only_the_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(f"# before\n\n{START}\nstale table\n{END}\n\n# after\n", encoding="utf-8")
    assert config_reference.main(["--write", str(doc)]) == 0
    assert "updated" in capsys.readouterr().out
    text = doc.read_text(encoding="utf-8")
    assert text == f"# before\n\n{START}\n{render()}{END}\n\n# after\n"
    assert config_reference.main(["--write", str(doc)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert doc.read_text(encoding="utf-8") == text


def test_write_refuses_a_file_without_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "README.md"
    doc.write_text("# no markers here\n", encoding="utf-8")
    assert config_reference.main(["--write", str(doc)]) == 1
    assert START in capsys.readouterr().err
    assert doc.read_text(encoding="utf-8") == "# no markers here\n"


def test_without_options_it_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_reference.main([]) == 0
    assert capsys.readouterr().out == render()


def test_the_readme_example_configuration_loads(tmp_path: Path) -> None:
    configuration = section(README.read_text(encoding="utf-8"), "Configuration")
    found = re.search(r"^```toml\n(.*?)^```", configuration, re.MULTILINE | re.DOTALL)
    assert found, "no ```toml example in the README's Configuration section"
    example = found.group(1)
    # Its token files live in /etc/a2ad; here they are made in tmp_path.
    for i, name in enumerate(sorted(set(re.findall(r'"/etc/a2ad/([^"]+)"', example)))):
        (tmp_path / name).write_text(f"example-token-{i}\n")
    path = tmp_path / "a2ad.toml"
    path.write_text(example.replace('"/etc/a2ad/', f'"{tmp_path}/'), encoding="utf-8")
    settings = load_settings(path)
    assert [w.id for w in settings.workspaces] == ["demo"]


def all_errors() -> list[type[A2adError]]:
    found, todo = [], [A2adError]
    while todo:
        kind = todo.pop()
        todo.extend(kind.__subclasses__())
        if kind is not A2adError:
            found.append(kind)
    return found


def test_readme_error_table_names_every_error_with_its_statuses() -> None:
    """Each error a2ad answers is a row of README's error table, with the HTTP status
    it really has on the proxy path and elsewhere (a user reads the table, not the code)."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("\n### Errors\n") : text.index("\n### Send options\n")]
    rows = {}
    for line in table.splitlines():
        found = re.match(r"\| `([a-z_]+)`[^|]*\| ([^|]+) \| ([^|]+) \|", line)
        if found:
            rows[found.group(1)] = (found.group(2).strip(), found.group(3).strip())
    for kind in all_errors():
        assert kind.code in rows, f"README's error table has no row for {kind.code}"
        proxy, elsewhere = rows[kind.code]
        proxy_status = kind.proxy_status or kind.status
        if proxy != "—":
            assert proxy.split()[0] == str(proxy_status), kind.code
        if elsewhere != "—":
            assert elsewhere == str(kind.status), kind.code
