"""`make dev` on 127.0.0.1 (started and stopped as a user does) and Debian's Chromium driven by selenium.

Screenshots go to ``test-artifacts/ui/`` at the top of the checkout (gitignored; CI keeps it as an artifact).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
# The suite never installs anything: `make test` has run `make install` first, so `make dev` is told not to
# remake the install stamp (a pyproject.toml newer than the stamp would otherwise start pip).
MAKE_DEV = ["make", "-o", ".venv/.installed-stamp", "dev"]


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_members(pgid: int) -> dict[int, str]:
    """Every live process of the process group ``pgid``: pid -> command line (from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # the process ended while being read
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            found[int(stat.parent.name)] = cmdline
    return found


class DevServer:
    """``make dev`` for one data root and port; :meth:`stop` runs ``make dev-stop``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "make-dev.log"
        self.env = {k: v for k, v in os.environ.items() if k not in ("GAIR_REGIONS", "GAIR_UI_HOST")} | {
            "GAIR_DATA_ROOT": str(root), "DAGSTER_HOME": str(root / "dagster_home"), "GAIR_UI_PORT": str(self.port)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None

    def start(self, timeout: float = 240) -> None:
        """Start ``make dev`` (its own session, so the test can always end it) and wait until the URL answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(MAKE_DEV, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"make dev exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as resp:
                    if resp.status == 200:
                        self.pgid = int((self.root / "dev.pgid").read_text())
                        return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"{self.url} did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        """The end of make dev's output."""
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> subprocess.CompletedProcess[str]:
        """``make dev-stop``, then wait for ``make dev`` itself to return."""
        out = subprocess.run(["make", "dev-stop"], cwd=REPO, env=self.env, capture_output=True, text=True,
                             timeout=120, check=False)
        if self.proc is not None:
            self.proc.wait(timeout=60)
        return out

    def kill(self) -> None:
        """Last resort after a failed test: SIGKILL whatever is left of both process groups."""
        for pgid in (self.pgid, self.proc.pid if self.proc else None):
            if pgid and group_members(pgid):
                os.killpg(pgid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dev_server() -> Iterator[type[DevServer]]:
    """The :class:`DevServer` class; every server made in the module is killed at its end if still running."""
    made: list[DevServer] = []

    class Tracked(DevServer):
        def __init__(self, root: Path, port: int | None = None) -> None:
            super().__init__(root, port)
            made.append(self)

    yield Tracked
    for server in made:
        server.kill()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """Headless Debian Chromium through the system chromedriver (same package version; nothing downloaded)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium or chromedriver missing: `make test` installs them (apt-get install chromium "
                    "chromium-driver, as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: Chromium's sandbox refuses to run as root (the tests run as root in CI).
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    drv = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """``test-artifacts/ui/`` (created): where the screenshots go."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def process_group():
    """:func:`group_members`: the live processes of a process group."""
    return group_members
