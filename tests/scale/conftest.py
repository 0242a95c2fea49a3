"""A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl), stopped and removed after the module.

PostgreSQL refuses to run as root: as root (here and in CI) the cluster belongs to the ``postgres`` system user
(created by Debian's ``postgresql`` package) and every server command runs through ``runuser -u postgres``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class PgCluster:
    """Where the test cluster listens and how to log in (scram-sha-256, a random password)."""

    host: str
    port: int
    user: str
    password: str
    db: str

    def env(self) -> dict[str, str]:
        """The variables deploy/dagster.postgres.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db}


def _pg_bin() -> Path | None:
    """The folder holding initdb/pg_ctl: on PATH, else the newest Debian /usr/lib/postgresql/<v>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """Start a fresh cluster with one empty database; always stop it and delete its folder."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (install Debian's `postgresql`; `make test` does)")
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to own the cluster")
        prefix = ["runuser", "-u", "postgres", "--"]
    work = Path(tempfile.mkdtemp(prefix="gair-pg-"))
    if owner is not None:
        os.chown(work, owner.pw_uid, owner.pw_gid)
    cluster = PgCluster("127.0.0.1", _free_port(), "gair", secrets.token_hex(16), "dagster")
    pwfile = work / "pw"
    pwfile.write_text(cluster.password + "\n")
    if owner is not None:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    data, log = work / "data", work / "server.log"

    def run(*argv: str | Path) -> None:
        subprocess.run([*prefix, *map(str, argv)], check=True, capture_output=True, text=True, timeout=120)

    run(bindir / "initdb", "-D", data, "-U", cluster.user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
        "-E", "UTF8", "--locale=C")
    pwfile.unlink()
    started = False
    try:
        # -k: the Unix socket in the cluster's own folder (the default /run/postgresql may not exist).
        run(bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
            f"-h {cluster.host} -p {cluster.port} -k {work}", "start")
        started = True
        import psycopg2

        conn = psycopg2.connect(host=cluster.host, port=cluster.port, user=cluster.user, password=cluster.password,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {cluster.db}")
        conn.close()
        yield cluster
    finally:
        try:
            if started:
                run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(work, ignore_errors=True)
