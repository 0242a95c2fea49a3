"""`make dev-stop` ends every process `make dev` started: dagster dev, its webserver, daemon and code servers."""

from __future__ import annotations

import shutil
import urllib.request

import pytest

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("setsid") is None,
                                reason="needs make and setsid (util-linux)")


@pytest.mark.slow
def test_dev_stop_ends_the_whole_process_group(dev_server, process_group, tmp_path):
    server = dev_server(tmp_path / "data")
    server.start()
    assert f"Dagster UI: {server.url}" in server.log_tail()  # make dev says where the UI is
    with urllib.request.urlopen(server.url, timeout=30) as resp:
        assert resp.status == 200
    assert server.pgid is not None and server.proc is not None
    members = process_group(server.pgid)
    commands = " ".join(members.values())
    assert server.pgid in members and "dagster dev" in commands
    assert "dagster_webserver" in commands and "dagster._daemon" in commands, commands

    out = server.stop()
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"process group {server.pgid}" in out.stdout
    assert process_group(server.pgid) == {}, "make dev-stop left processes behind"
    assert server.proc.returncode == 0  # make dev returned: the UI it waited for ended cleanly
    assert not (tmp_path / "data" / "dev.pgid").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=5)
    # Nothing running: dev-stop says so and succeeds.
    again = server.stop()
    assert again.returncode == 0 and "not running" in again.stdout
