"""Faults injected into a real dataset build (bench/faults_bench.py, scenarios in bench/fault_scenarios.py).

One subprocess builds the region clean through the loopback STAC API and raster server, then once per fault; each
fault must be survived: the build recovers (outputs byte-identical to the clean build, checked file by file), or it
fails with a clear message, leaves the published shard set complete or absent (never partial) and a rerun is
identical to the clean build.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[2]
KINDS = ("stac_429", "stac_503", "stac_timeout", "stac_malformed_page", "raster_403_expired",
         "raster_connection_cut", "worker_killed", "disk_full")


@pytest.fixture(scope="module")
def tally(tmp_path_factory) -> dict:
    shared_path("rasters", "s2_l2a_patches", "images", "patch_252161.tif")
    shared_path("streetview", "exif_photos", "lund")
    out = tmp_path_factory.mktemp("faults") / "faults.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "faults_bench.py"), "--out", str(out),
                           "--only", ",".join(KINDS)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _survived(tally: dict, kind: str) -> dict:
    r = tally["faults"][kind]
    assert r["injected"] >= 1, r  # the fault really was served
    assert r["survived"] == r["injected"] and r["samples_lost"] == 0, r
    return r


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stac_429", "stac_503", "stac_timeout", "stac_malformed_page"])
def test_stac_faults_recover_to_the_clean_outputs(tally, kind):
    r = _survived(tally, kind)
    assert r["outcome"] == "recovered"
    answers = r["details"]["search_answers"]
    assert answers[-1] == "200" and len(answers) == r["injected"] + 1, answers
    if kind == "stac_429":
        assert r["details"]["seconds_after_fault"][0] >= 0.95  # Retry-After: 1 was honoured


@pytest.mark.slow
def test_expired_signature_is_re_signed(tally):
    r = _survived(tally, "raster_403_expired")
    assert r["outcome"] == "recovered"
    # A fresh token is fetched only after a reader dropped the refused one, and each refused read re-signs at most
    # once; how many reader threads were refused before the first new token depends on timing.
    d = r["details"]
    assert d["reads_resigned"] is not None, d  # the shards' stats.json was written and counts them
    assert d["answers_403"] >= 1 and 1 <= d["tokens_issued"] <= d["reads_resigned"]


@pytest.mark.slow
def test_connection_cut_mid_body_loses_no_sample(tally):
    r = _survived(tally, "raster_connection_cut")
    assert r["outcome"] == "recovered" and r["details"]["answers_cut"] >= 1
    assert r["details"]["tiles_read_again"] >= 1 and r["details"]["chip_workers"] > 1


@pytest.mark.slow
def test_worker_killed_mid_shards_leaves_no_partial_set_and_rerun_matches(tally):
    r = _survived(tally, "worker_killed")
    d = r["details"]
    assert r["outcome"] == "failed_clean" and d["killed_with_staging"] == [".staging"] and d["returncode"] == -9
    assert d["published_after_kill"] == "complete" and d["previous_set_kept"] and d["earlier_stages_intact"]
    assert d["rerun_identical"]


@pytest.mark.slow
def test_tally_counts_every_kind(tally):
    assert set(tally["faults"]) == set(KINDS)
    assert tally["totals"]["injected"] == sum(r["injected"] for r in tally["faults"].values())
    assert tally["region"]["clean_samples"] > 0 and tally["region"]["published_files"] > 5
    assert tally["totals"]["all_survived"] and tally["totals"]["samples_lost"] == 0


@pytest.mark.slow
def test_full_disk_fails_at_once_with_a_clear_message_and_rerun_matches(tally):
    r = _survived(tally, "disk_full")
    assert r["outcome"] == "failed_clean" and "File too large" in r["message"] + json.dumps(r["details"])
    assert r["details"]["published_after_fault"] == "complete" and r["details"]["previous_set_kept"]
