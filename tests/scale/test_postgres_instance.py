"""deploy/dagster.postgres.yaml against a real PostgreSQL: a region through `dg launch`, read back from the instance."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "dagster.postgres.yaml"
REGION = "sample-pontoise"
ASSETS = ["stac_items", "tile_grid", "sv_points", "pairs"]
# One run worker process for every step: the storage is what is under test, and a process per step costs seconds
# each on two cores.
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'


@pytest.mark.slow
def test_region_through_dg_launch_on_a_postgres_instance(pg_cluster, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(CONFIG, home / "dagster.yaml")  # the documented file itself, unchanged
    env = {**os.environ, **pg_cluster.env(), "DAGSTER_HOME": str(home), "GAIR_DATA_ROOT": str(tmp_path / "data")}
    env.pop("GAIR_REGIONS", None)  # the default regions: the embedded sample
    launch = [str(Path(sys.executable).parent / "dg"), "launch", "--assets", ",".join(ASSETS), "--partition", REGION,
              "--config-json", IN_PROCESS]
    proc = subprocess.run(launch, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert pg_cluster.password not in proc.stdout + proc.stderr

    for key, value in {**pg_cluster.env(), "DAGSTER_HOME": str(home)}.items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"

        runs = instance.get_runs()
        assert len(runs) == 1
        run = runs[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == REGION

        for key in ASSETS:
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert event is not None and event.run_id == run.run_id, key
            assert event.asset_materialization is not None
            assert event.asset_materialization.partition == REGION
        pairs = instance.get_latest_materialization_event(dg.AssetKey("pairs"))
        assert pairs is not None and pairs.asset_materialization is not None
        meta = pairs.asset_materialization.metadata
        assert meta["num_outside_every_tile"].value == 10  # the sample's planted points outside every tile
        assert meta["num_pairs"].value == meta["num_points"].value - 10 > 1000

        checks = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        evaluations = {e.dagster_event.asset_check_evaluation_data.check_name: e.dagster_event
                       .asset_check_evaluation_data.passed for e in checks if e.dagster_event}
        assert {"items_found", "pairs_inside_tile_bbox", "no_point_in_two_tiles",
                "offsets_in_range_and_spread"} <= set(evaluations)
        assert all(evaluations.values()), evaluations

    # The history is in PostgreSQL itself, not in a SQLite file that Dagster fell back to.
    import psycopg2

    with psycopg2.connect(host=pg_cluster.host, port=pg_cluster.port, user=pg_cluster.user,
                          password=pg_cluster.password, dbname=pg_cluster.db) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM runs")
        assert cur.fetchall() == [(run.run_id, "SUCCESS")]
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                    (run.run_id, "ASSET_MATERIALIZATION"))
        assert cur.fetchone() == (len(ASSETS),)
    conn.close()
    assert not list(home.rglob("*.db"))
