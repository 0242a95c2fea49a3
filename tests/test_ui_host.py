"""`make dev` binds the Dagster UI to the loopback interface unless GAIR_UI_HOST says otherwise."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _dev_command(**env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GAIR_UI_")} | env
    out = subprocess.run(["make", "-n", "-s", "dev"], cwd=REPO, env=full, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    lines = [ln for ln in out.splitlines() if " dev " in f" {ln} " and "dagster" in ln]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def _host(argv: list[str]) -> str:
    hosts = [argv[i + 1] for i, a in enumerate(argv) if a in ("-h", "--host")]
    assert len(hosts) == 1, argv  # an explicit host: dagster's own default is not relied on
    return hosts[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_dev_binds_loopback_by_default() -> None:
    assert _host(_dev_command()) == "127.0.0.1"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_dev_host_from_environment() -> None:
    assert _host(_dev_command(GAIR_UI_HOST="0.0.0.0")) == "0.0.0.0"


def test_no_other_ui_launcher_binds_elsewhere() -> None:
    """Every place that starts the UI passes an explicit host (only the Makefile does today)."""
    launchers = []
    for path in [*REPO.glob("*.mk"), REPO / "Makefile", *REPO.glob("**/*.sh"), *REPO.glob("pipelines/**/*.py"),
                 *REPO.glob("bench/**/*.py")]:
        if ".venv" in path.parts or not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if any(cmd in line for cmd in ("dagster dev", "dg dev", "dagster-webserver", "dagster_webserver")):
                launchers.append((path, line))
                assert "-h " in line or "--host" in line, f"{path}: {line.strip()} has no explicit host"
    assert launchers, "the Makefile's dev target should start the UI"
