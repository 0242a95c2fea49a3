"""The ``shards`` asset publishes its complete set to object storage when ``publish_url`` is set (loopback S3)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from gair_dataset import object_store
from gair_dataset.contract import SHARDS_JSON_NAME

pytestmark = pytest.mark.slow

PARTITION = "sample-pontoise"


def test_build_dataset_publishes_shards(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAIR_DATA_ROOT", str(tmp_path / "gair_data"))
    from pipelines.definitions import defs

    bucket = s3.new_bucket()
    prefix = f"{bucket}/gair/shards"
    result = defs.resolve_job_def("build_dataset").execute_in_process(
        partition_key=PARTITION, instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"shards": {"config": {"publish_url": prefix}}}})
    assert result.success
    local = tmp_path / "gair_data" / "shards" / PARTITION
    url = f"{prefix}/{PARTITION}/"
    assert object_store.read_bytes(object_store.join(url, SHARDS_JSON_NAME)) == (local / SHARDS_JSON_NAME).read_bytes()
    sets = object_store.list_shard_sets(prefix)
    assert [s.url for s in sets] == [f"{prefix}/{PARTITION}"]
    mat = result.asset_materializations_for_node("shards")[0]
    assert mat.metadata["published_url"].value == url
    assert mat.metadata["published_files"].value == sets[0].n_shards + 1  # the tars and the manifest
