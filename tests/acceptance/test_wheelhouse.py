"""The air-gapped install: `make wheelhouse`, then a fresh venv that installs a2ad from
that folder alone (no index) and runs `a2ad migrate`, `a2ad check` and `a2ad --help`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pgserver import PgServer

if TYPE_CHECKING:
    from conftest import Launcher

REPO_ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT = 180.0  # the wheel build downloads what pip's cache lacks
RUN_TIMEOUT = 20.0
QUIET = ("--quiet", "--disable-pip-version-check")

# What `pip wheel .` must not see or write into: the checkout's venv, caches and build
# output. The build runs on a copy, so setuptools' build/ and *.egg-info land in
# tmp_path and two test runs at once do not share a build directory.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".ci",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    "var",
    "results",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
)


def run(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def offline_env() -> dict[str, str]:
    """No pip configuration and no A2AD_* variables: on the air-gapped machine nothing
    but the wheelhouse is there. (This machine's pip.conf adds find-links of its own.)"""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "A2AD_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def test_install_from_wheelhouse_without_an_index(
    tmp_path: Path, launcher: Launcher, pg_server: PgServer
) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    wheelhouse = tmp_path / "wheelhouse"
    # As `make wheelhouse` does, with this interpreter (the project's venv).
    run(
        # With the PostgreSQL extra, as `make wheelhouse` builds it.
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            *QUIET,
            "--wheel-dir",
            str(wheelhouse),
            f"{source}[postgres]",
        ],
        env=dict(os.environ),
        cwd=tmp_path,
        timeout=PIP_TIMEOUT,
    )
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    assert any(name.startswith("a2ad-") for name in wheels), wheels

    # The air-gapped side: a fresh venv, the index disabled, the wheelhouse only.
    venv = tmp_path / "venv"
    env = offline_env()
    run([sys.executable, "-m", "venv", str(venv)], env=env, cwd=tmp_path, timeout=PIP_TIMEOUT)
    python, a2ad = venv / "bin" / "python", venv / "bin" / "a2ad"
    wheelhouse_only = ("--no-index", "--find-links", str(wheelhouse))
    run(
        [str(python), "-m", "pip", "install", *QUIET, *wheelhouse_only, "a2ad"],
        env=env,
        cwd=tmp_path,
        timeout=PIP_TIMEOUT,
    )
    where = run(
        [str(python), "-c", "import a2ad; print(a2ad.__file__)"],
        env=env,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT,
    )
    assert Path(where.strip()).is_relative_to(venv), f"a2ad imported from {where}"

    assert "serve" in run([str(a2ad), "--help"], env=env, cwd=tmp_path, timeout=RUN_TIMEOUT)

    agent = launcher.demo_agent(delay=0.0)
    config = launcher.config(workspaces=[{"id": "demo", "url": agent.url, "heartbeat": False}])
    cli = [str(a2ad), "--log-level", "warning"]
    # migrate applies the SQL files shipped in the wheel; check then reads them back.
    migrated = run(
        [*cli, "migrate", "--config", str(config.path)],
        env=env,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT,
    )
    assert "applied 0001" in migrated, migrated
    checked = run(
        [*cli, "check", "--config", str(config.path)], env=env, cwd=tmp_path, timeout=RUN_TIMEOUT
    )
    # Exit 0 (run() asserts it) means the config, the store and the agent all passed.
    assert "schema" in checked and agent.url in checked, checked

    # The PostgreSQL extra from the same wheelhouse, against a real server.
    run(
        [str(python), "-m", "pip", "install", *QUIET, *wheelhouse_only, "a2ad[postgres]"],
        env=env,
        cwd=tmp_path,
        timeout=PIP_TIMEOUT,
    )
    pg_config = launcher.config(
        name="pg.toml",
        store={"url": pg_server.url, "schema": "wheelhouse"},
        workspaces=[{"id": "demo", "url": agent.url, "heartbeat": False}],
    )
    migrated = run(
        [*cli, "migrate", "--config", str(pg_config.path)],
        env=env,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT,
    )
    assert "applied 0001 schema" in migrated, migrated
    checked = run(
        [*cli, "check", "--config", str(pg_config.path)], env=env, cwd=tmp_path, timeout=RUN_TIMEOUT
    )
    assert "PostgreSQL" in checked and "writable" in checked, checked
