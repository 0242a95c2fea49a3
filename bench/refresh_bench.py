"""Incremental refresh vs a full build of the same region (bench/results/refresh.json).

Builds ``sample-lund`` from an empty data root (the synthetic sample generated beforehand, not timed), then runs
the same ``build_dataset`` job again with nothing new, and evaluates the catalog sensor, which launches nothing for
an unchanged catalog (the unattended path). Three figures, each a median over ``--repeats`` rounds:

* ``full_build_s``: the job from an empty data root (every stage rebuilt);
* ``refresh_run_s``: the job again with nothing new (every stage skips; Dagster still starts the run and its
  eleven steps, and the sources search the catalog and read the points again);
* ``refresh_work_s``: the region stages' own time in that refresh (the asset and check steps, as Dagster times
  them), i.e. without the fixed cost of starting a run;
* ``sensor_tick_s``: one evaluation of ``new_catalog_items_sensor`` for every region;
* ``points_changed_s``: the job after one street-view point was removed from the region's points file: the
  points, pairs and shards are rebuilt, every chip comes from the chip cache (no tile changed). The point is row
  1: row 0 has a copy at the end of the sample file (a deliberate duplicate id), so removing it removes no point.

Ratios are against ``full_build_s``; the goal is < 5% for a refresh that finds nothing new.

The ``remote`` section measures what the chip cache saves when the rasters are remote. The region's item
assets are served by ``fault_servers.FaultyRasterServer`` on loopback (HTTP range requests, SAS-style signed
URLs through ``LoopbackSigner``), and the region's STAC search goes to ``fault_servers.FaultyStacApi``
(``rustac serve``) with the hrefs rewritten to that server, so every chip is read through GDAL's ``/vsicurl/``.
It runs at each ``--latencies-ms`` value, a delay the server adds before answering each file read (injected on
loopback: a model of an object store's time to first byte, not a real network). Each round:

* ``full_build_s``: the five region assets and their checks from an empty data root (every chip read over HTTP);
* ``points_changed_cached_s``: one street-view point removed, the shards rebuilt with the chip cache (every
  tile a cache hit: ``chip_reads`` 0 in the shards' stats.json);
* ``points_changed_uncached_s``: another single point removed instead, the shards rebuilt with
  ``chip_cache: false`` (no cache lookups nor writes: every chip read over HTTP again).

The two rebuilds alternate their order from round to round. Each build gets a fresh token, hence new URLs, so
nothing of GDAL's process-wide ``/vsicurl/`` cache is reused; the server's range answers and their bytes, and the
chip cache entries written, are counted per build to show it. Once (not a figure), ``cold_cache_check`` rebuilds
with the cache on but its folder deleted: every tile is read again too, and its entry written again.

    python bench/refresh_bench.py [--repeats 3] [--region sample-lund] [--latencies-ms 0,20]
                                  [--section all|local|remote]

``--section local`` or ``remote`` reruns one section and keeps the other's figures from the results file.
"""

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import RESULTS, write_result  # noqa: E402

GOAL = 0.05
#: The stage folders of a data root (all but the sample): removed for a build from an empty data root.
STAGES = ("stac", "tiles", "streetview", "pairs", "shards", ".checks", "cache")
#: The assets of the ``build_dataset`` job (materialised with their checks by the remote section).
BUILD_ASSETS = ("stac_items", "tile_grid", "sv_points", "pairs", "shards")
#: Rows of the region's points file removed for a "one point removed" rebuild. Not row 0: the sample's last row
#: repeats it (a deliberate duplicate id), so without row 0 the copy is kept and no valid point goes.
REMOVED_ROW = {"local": 1, "cached": 1, "uncached": 2, "cold_cache": 3}
REMOTE_NOTE = (
    "Rasters served over loopback HTTP by bench/fault_servers.py FaultyRasterServer (range requests, SAS-style "
    "signed URLs, the server in the bench's own process) and the STAC search by FaultyStacApi (rustac); chips read "
    "through GDAL /vsicurl/ with the pipeline's default 4 chip workers. latency_ms is injected by the server before "
    "each file answer (a model of object-storage time to first byte), not a real network: no bandwidth limit, no "
    "TLS. Each build gets a fresh token (new URLs), so GDAL's /vsicurl/ cache is not reused across builds. "
    "cached: one SV point removed, shards rebuilt from the chip cache; uncached: another single SV point removed, "
    "shards rebuilt with the shards op's chip_cache: false (no cache lookups or writes; deleting the cache folder "
    "instead would also write every tile's entry again: see cold_cache_check). The two rebuilds alternate their "
    "order between rounds. http: range_answers (206) and range_mb, their body bytes; whole_file_answers: GETs "
    "without a Range header, GDAL's size probes (CPL_VSIL_CURL_USE_HEAD=NO), of which it reads only the headers; "
    "every answer but /token waits latency_ms first.")


def _step_seconds(instance, run_id: str) -> dict[str, float]:
    """Each step's duration (STEP_START -> STEP_SUCCESS) in a run, from the instance's event log."""
    starts, total = {}, {}
    for entry in instance.all_logs(run_id):
        e = entry.dagster_event
        if e is None:
            continue
        if e.event_type_value == "STEP_START":
            starts[e.step_key] = entry.timestamp
        elif e.event_type_value == "STEP_SUCCESS" and e.step_key in starts:
            total[e.step_key] = entry.timestamp - starts.pop(e.step_key)
    return total


def _expect(ok: bool, message: str) -> None:
    """Stop the bench when a round did not do what its figure claims (kept under ``python -O``, unlike assert)."""
    if not ok:
        raise RuntimeError(message)


# -- local rasters -------------------------------------------------------------------------------------------


def bench_local(work: Path, region: str, repeats: int) -> dict[str, Any]:
    """The local-raster figures (the top-level keys of refresh.json); prints each round and the summary.

    Args:
        work: The work folder; its ``gair_data`` is the data root (``GAIR_DATA_ROOT``), the sample generated in it.
        region: The region partition.
        repeats: Rounds.
    """
    import dagster as dg
    import pandas as pd

    from pipelines.definitions import defs
    from pipelines.defs.resources import resources

    job = defs.resolve_job_def("build_dataset")
    sensor = defs.resolve_sensor_def("new_catalog_items_sensor")
    full, refresh, refresh_work, full_work, ticks, changed = [], [], [], [], [], []
    chip_reads: list[int] = []
    points_path = work / "gair_data" / "sample" / "streetview" / region / "points.parquet"
    points_bytes = points_path.read_bytes()
    full_steps: list[dict[str, float]] = []
    refresh_steps: list[dict[str, float]] = []
    for r in range(repeats):
        for stage in STAGES:  # an empty data root but the sample: a full build
            shutil.rmtree(work / "gair_data" / stage, ignore_errors=True)
        instance = dg.DagsterInstance.ephemeral()
        t = time.perf_counter()
        res = job.execute_in_process(partition_key=region, instance=instance)
        full.append(time.perf_counter() - t)
        full_steps.append(_step_seconds(instance, res.run_id))
        full_work.append(sum(full_steps[-1].values()))
        t = time.perf_counter()
        res = job.execute_in_process(partition_key=region, instance=instance)
        refresh.append(time.perf_counter() - t)
        refresh_steps.append(_step_seconds(instance, res.run_id))
        refresh_work.append(sum(refresh_steps[-1].values()))
        rebuilt = [m.step_materialization_data.materialization.metadata["rebuilt"].value
                   for m in res.get_asset_materialization_events()]
        assert res.success and not any(rebuilt), rebuilt
        with dg.build_sensor_context(resources=resources().resources) as ctx:
            t = time.perf_counter()
            tick = sensor(ctx)
            ticks.append(time.perf_counter() - t)
        assert region not in {q.partition_key for q in tick.run_requests or []}
        points = pd.read_parquet(points_path)
        points.drop(index=points.index[REMOVED_ROW["local"]]).to_parquet(points_path, index=False)  # one less
        try:
            t = time.perf_counter()
            res = job.execute_in_process(partition_key=region, instance=instance)
            changed.append(time.perf_counter() - t)
        finally:
            points_path.write_bytes(points_bytes)
        shards_md = {m.step_materialization_data.materialization.asset_key.path[-1]:
                     m.step_materialization_data.materialization.metadata
                     for m in res.get_asset_materialization_events()}["shards"]
        assert res.success and shards_md["rebuilt"].value, shards_md
        chip_reads.append(int(shards_md["chip_reads"].value))
        instance.dispose()
        print(f"round {r}: full {full[-1]:.1f}s, refresh {refresh[-1]:.2f}s (steps {refresh_work[-1]:.2f}s), "
              f"sensor {ticks[-1]:.2f}s, one point removed {changed[-1]:.2f}s ({chip_reads[-1]} chip reads)",
              flush=True)
    med = {k: statistics.median(v) for k, v in
           {"full_build_s": full, "full_build_work_s": full_work, "refresh_run_s": refresh,
            "refresh_work_s": refresh_work, "sensor_tick_s": ticks, "points_changed_s": changed}.items()}
    ratios = {"refresh_run": med["refresh_run_s"] / med["full_build_s"],
              "refresh_work": med["refresh_work_s"] / med["full_build_work_s"],
              "sensor_tick": med["sensor_tick_s"] / med["full_build_s"]}
    changed_ratio = med["points_changed_s"] / med["full_build_s"]
    print(f"local: full {med['full_build_s']:.1f}s | refresh run {med['refresh_run_s']:.2f}s "
          f"({100 * ratios['refresh_run']:.1f}%), its steps {med['refresh_work_s']:.2f}s "
          f"({100 * ratios['refresh_work']:.1f}% of the full build's steps) | sensor tick "
          f"{med['sensor_tick_s']:.2f}s ({100 * ratios['sensor_tick']:.1f}%) | one point removed "
          f"{med['points_changed_s']:.2f}s ({100 * changed_ratio:.0f}%, chip reads {chip_reads})", flush=True)
    return {
        "region": region, "repeats": repeats, "medians": med,
        "ratios_vs_full_build": ratios, "goal": GOAL,
        "step_seconds": {k: {"full": round(statistics.median(d[k] for d in full_steps), 3),
                             "refresh": round(statistics.median(d[k] for d in refresh_steps), 3)}
                         for k in sorted(full_steps[0])},
        "meets_goal": {k: v < GOAL for k, v in ratios.items()},
        "points_changed": {"ratio_vs_full_build": changed_ratio, "chip_reads": chip_reads,
                           "note": "one street-view point removed: points, pairs and shards rebuilt, the chips from "
                                   "the chip cache (no goal: it rewrites the whole shard set)"},
        "note": "refresh_run: the build_dataset job rerun with nothing new (in-process executor; it includes "
                "Dagster's fixed cost of a run with eleven steps); refresh_work: the steps' own time; sensor_tick: "
                "the catalog sensor, which launches nothing when no catalog changed (the unattended path).",
    }


# -- remote rasters ------------------------------------------------------------------------------------------


def serve_items(items: list[dict[str, Any]], www: Path, raster_url: str) -> tuple[list[dict[str, Any]], int]:
    """The items with every local asset file linked into ``www`` (a unique name each) and its href on the server.

    ``FaultyRasterServer`` serves files by name only, and every sample item has its own ``B01.tif``: each file is
    linked as ``<item id>__<asset key><suffix>``.

    Returns:
        The rewritten items (unsigned hrefs) and the number of files served.
    """
    www.mkdir(parents=True, exist_ok=True)
    out = json.loads(json.dumps(items))
    n = 0
    for item in out:
        for key, asset in item.get("assets", {}).items():
            href = str(asset.get("href") or "")
            src = Path(href.removeprefix("file://"))
            if ("://" in href and not href.startswith("file://")) or not src.is_file():
                continue
            name = f"{item['id']}__{key}{src.suffix}"
            (www / name).symlink_to(src.resolve())
            asset["href"] = f"{raster_url}/rasters/{name}"
            n += 1
    return out, n


class RemoteRegion:
    """Builds one region in this process with its STAC search and chip reads going through the loopback servers.

    Args:
        root: The data root (the embedded sample already generated in it).
        region: The region partition.
        stac_url: Root of the ``FaultyStacApi`` serving the region's items (hrefs on the raster server).
        raster: The running ``FaultyRasterServer``.
    """

    def __init__(self, root: Path, region: str, stac_url: str, raster: Any) -> None:
        from fault_servers import LoopbackSigner

        from pipelines.common.storage import DataRoot
        from pipelines.definitions import defs
        from pipelines.defs.resources import resources
        from pipelines.defs.shards.resources import RasterAccess
        from pipelines.defs.stac.resources import LiveStacCatalog

        class LoopbackRasterAccess(RasterAccess):
            """Chips signed with tokens of the loopback raster server (as ``bench/fault_scenarios.py`` does)."""

            token_url: str

            def signer(self) -> LoopbackSigner:
                return LoopbackSigner(self.token_url)

        self.root, self.region, self.raster = root, region, raster
        self.cache_dir = root / "cache" / region / "chips"
        self.resources = {**resources().resources,
                          "stac": LiveStacCatalog(url=stac_url, sign_with_planetary_computer=False, timeout_s=30.0),
                          "raster_access": LoopbackRasterAccess(token_url=raster.token_url),
                          "data_root": DataRoot(root=str(root))}
        self.assets = [*(a for a in defs.assets if any(k.to_user_string() in BUILD_ASSETS for k in a.keys)),
                       *defs.asset_checks]

    def build(self, instance: Any, *, chip_cache: bool = True) -> dict[str, Any]:
        """Materialise the region's five assets and their checks; the time, the shards' counters and the HTTP use.

        A fresh token first: new URLs, so GDAL's process-wide ``/vsicurl/`` cache holds nothing of them.

        Raises:
            RuntimeError: the build failed, a check failed or the shards were not rebuilt (the message redacted).
        """
        import dagster as dg
        from fault_servers import LoopbackSigner

        from gair_dataset.signing import redact_text

        LoopbackSigner.forget_all()
        state = self.raster.state
        with state.lock:
            log0, bytes0 = len(state.log), state.range_bytes_served
        config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        if not chip_cache:
            config["ops"] = {"shards": {"config": {"chip_cache": False}}}
        started = time.time()
        t = time.perf_counter()
        result = dg.materialize(self.assets, selection=list(BUILD_ASSETS), resources=self.resources,
                                partition_key=self.region, instance=instance, raise_on_error=False,
                                run_config=config)
        seconds = time.perf_counter() - t
        with state.lock:
            answers = collections.Counter(status for _, status, note in state.log[log0:] if note != "token")
            served = state.range_bytes_served - bytes0
        errors = [e.step_failure_data.error.message.strip().splitlines()[0] for e in result.all_events
                  if e.is_step_failure and e.step_failure_data.error is not None]
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        _expect(result.success and all(checks.values()),
                f"remote build of {self.region} failed: {redact_text('; '.join(errors))} checks {checks}")
        shards_md = {m.step_materialization_data.materialization.asset_key.path[-1]:
                     m.step_materialization_data.materialization.metadata
                     for m in result.get_asset_materialization_events()}["shards"]
        _expect(bool(shards_md["rebuilt"].value), "the shards were not rebuilt")
        stats = json.loads((self.root / "shards" / self.region / "stats.json").read_text())
        return {"seconds": seconds, "shards_step_s": _step_seconds(instance, result.run_id).get("shards", 0.0),
                "chip_reads": int(stats["chip_reads"]), "cached_tiles": int(stats["cached_tiles"]),
                "chip_retries": int(stats["chip_retries"]), "samples": int(stats["samples"]),
                "range_answers": answers[206], "whole_file_answers": answers[200],
                "other_answers": sum(answers.values()) - answers[206] - answers[200],
                "range_mb": round(served / 1e6, 2),
                "cache_entries_written": self.cache_entries(since=started)}

    def cache_entries(self, since: float = 0.0) -> int:
        """Chip cache entries (``<key>.npz``) of the region modified at or after ``since`` (a ``time.time()``)."""
        if not self.cache_dir.is_dir():
            return 0
        return sum(1 for p in self.cache_dir.glob("*.npz") if p.stat().st_mtime >= since)


def bench_remote(work: Path, region: str, repeats: int, latencies_ms: list[float]) -> dict[str, Any]:
    """The remote-raster figures (the ``remote`` key of refresh.json); prints each round and the summary.

    Args:
        work: The work folder; its ``gair_data`` is the data root, the sample already generated in it.
        region: The region partition.
        repeats: Rounds per latency.
        latencies_ms: The delays the raster server adds before each file answer, one set of rounds each.
    """
    import dagster as dg
    import pandas as pd
    from fault_servers import FaultyRasterServer, FaultyStacApi

    from gair_dataset.stac_catalog import search_local
    from pipelines.partitions import REGIONS

    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)  # loopback only (GDAL's curl honours these)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    root = work / "gair_data"
    items = search_local(root / "sample" / "catalog" / "catalog.json", REGIONS[region].search_params())
    points_path = root / "sample" / "streetview" / region / "points.parquet"
    points_bytes = points_path.read_bytes()
    kinds = ("full", "cached", "uncached")
    sections: dict[str, Any] = {}
    with FaultyRasterServer(work / "www") as raster:
        remote_items, n_files = serve_items(items, work / "www", raster.url)
        with FaultyStacApi(remote_items, work) as stac:
            remote = RemoteRegion(root, region, stac.url, raster)
            for latency in latencies_ms:
                raster.state.latency_s = latency / 1000
                runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
                for r in range(repeats):
                    for stage in STAGES:  # an empty data root but the sample: a full build
                        shutil.rmtree(root / stage, ignore_errors=True)
                    points = pd.read_parquet(points_path)
                    # disposed here: an instance left to the garbage collector may close its SQLite in another thread
                    with dg.DagsterInstance.ephemeral() as instance:
                        runs["full"].append(remote.build(instance))
                        try:  # each rebuild one point short of the full build (a different point each)
                            for kind in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
                                points.drop(index=points.index[REMOVED_ROW[kind]]).to_parquet(points_path,
                                                                                              index=False)
                                runs[kind].append(remote.build(instance, chip_cache=kind == "cached"))
                        finally:
                            points_path.write_bytes(points_bytes)
                    full, cached, uncached = (runs[k][-1] for k in kinds)
                    _expect(full["chip_reads"] > 0 and full["cached_tiles"] == 0 and full["range_answers"] > 0,
                            f"the full build read no chips over HTTP: {full}")
                    _expect(cached["chip_reads"] == 0 and cached["cached_tiles"] > 0
                            and cached["range_answers"] + cached["whole_file_answers"] == 0,
                            f"the cached rebuild read chips: {cached}")
                    _expect(uncached["chip_reads"] == full["chip_reads"] and uncached["cached_tiles"] == 0
                            and uncached["cache_entries_written"] == 0 and uncached["range_answers"] > 0,
                            f"the uncached rebuild used a cache: {uncached}")
                    _expect(cached["samples"] == uncached["samples"] == full["samples"] - 1,
                            f"a rebuild is not one sample short: {full['samples']} {cached} {uncached}")
                    print(f"remote {latency:g} ms round {r}: full {full['seconds']:.1f}s ({full['chip_reads']} chip "
                          f"reads, {full['range_answers']} range answers, {full['range_mb']} MB) | one point removed, "
                          f"cached {cached['seconds']:.2f}s ({cached['chip_reads']} reads, {cached['cached_tiles']} "
                          f"tiles from the cache, {cached['range_answers']} range answers) | uncached "
                          f"{uncached['seconds']:.2f}s ({uncached['chip_reads']} reads, {uncached['range_answers']} "
                          f"range answers, {uncached['range_mb']} MB)", flush=True)
                sections[f"latency_{latency:g}ms"] = _remote_summary(latency, runs)
                if "cold_cache_check" not in sections:
                    sections["cold_cache_check"] = _cold_cache_check(remote, latency, points_path, points_bytes,
                                                                     runs["full"][-1])
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "region": region,
            "repeats": repeats, "latencies_ms": latencies_ms, "files_served": n_files,
            "items": len(items), **sections, "note": REMOTE_NOTE}


def _cold_cache_check(remote: RemoteRegion, latency_ms: float, points_path: Path, points_bytes: bytes,
                      full: dict[str, Any]) -> dict[str, Any]:
    """One rebuild with the chip cache on but its folder deleted first (once, not a figure): which no-cache is true.

    Every tile misses and is read over HTTP, as with ``chip_cache: false``, but each tile's entry is written again.
    """
    import dagster as dg
    import pandas as pd

    shutil.rmtree(remote.cache_dir, ignore_errors=True)
    points = pd.read_parquet(points_path)
    try:
        points.drop(index=points.index[REMOVED_ROW["cold_cache"]]).to_parquet(points_path, index=False)
        with dg.DagsterInstance.ephemeral() as instance:
            cold = remote.build(instance, chip_cache=True)
    finally:
        points_path.write_bytes(points_bytes)
    _expect(cold["chip_reads"] == full["chip_reads"] and cold["cached_tiles"] == 0,
            f"the rebuild with the cache folder deleted used cached chips: {cold}")
    print(f"remote {latency_ms:g} ms, cache folder deleted: {cold['seconds']:.2f}s, {cold['chip_reads']} chip reads, "
          f"{cold['cached_tiles']} from the cache, {cold['cache_entries_written']} cache entries written", flush=True)
    return {"latency_ms_injected": latency_ms, "rounds": 1, **cold,
            "note": "chip_cache on, <data root>/cache/<region>/chips deleted before the rebuild: every tile read over "
                    "HTTP like chip_cache: false, and every entry written again (a cold cache, not a no-cache "
                    "rebuild); one build, not a median"}


def _remote_summary(latency_ms: float, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians, rounds, ratios and counters of one latency's rounds (``runs``: full, cached, uncached)."""
    names = {"full": "full_build_s", "cached": "points_changed_cached_s", "uncached": "points_changed_uncached_s"}
    rounds = {names[k]: [round(b["seconds"], 3) for b in v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ratios = {"cached_vs_full_build": med["points_changed_cached_s"] / med["full_build_s"],
              "uncached_vs_full_build": med["points_changed_uncached_s"] / med["full_build_s"],
              "cached_vs_uncached": med["points_changed_cached_s"] / med["points_changed_uncached_s"]}
    counters = ("chip_reads", "cached_tiles", "chip_retries", "samples", "cache_entries_written")
    summary = {
        "latency_ms_injected": latency_ms, "medians": med, "rounds": rounds, "ratios": ratios,
        "saved_by_cache_s": med["points_changed_uncached_s"] - med["points_changed_cached_s"],
        "shards_step_s": {k: {"median": statistics.median([b["shards_step_s"] for b in v]),
                              "rounds": [round(b["shards_step_s"], 3) for b in v]} for k, v in runs.items()},
        "shards_stats_json": {k: {c: [b[c] for b in v] for c in counters} for k, v in runs.items()},
        "http": {k: {c: [b[c] for b in v] for c in ("range_answers", "range_mb", "whole_file_answers", "other_answers")}
                 for k, v in runs.items()},
    }
    print(f"remote {latency_ms:g} ms: full {med['full_build_s']:.1f}s | one point removed: cached "
          f"{med['points_changed_cached_s']:.2f}s ({100 * ratios['cached_vs_full_build']:.0f}%), uncached "
          f"{med['points_changed_uncached_s']:.2f}s ({100 * ratios['uncached_vs_full_build']:.0f}%), cached/uncached "
          f"{100 * ratios['cached_vs_uncached']:.0f}%", flush=True)
    return summary


# -- main ----------------------------------------------------------------------------------------------------


def _previous() -> dict[str, Any]:
    """The results file as it is (empty when missing or unreadable)."""
    try:
        return dict(json.loads((RESULTS / "refresh.json").read_text()))
    except (OSError, ValueError):
        return {}


def main() -> None:
    """Run the sections asked for in a temporary work folder (always removed) and write refresh.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--region", default="sample-lund")
    ap.add_argument("--latencies-ms", default="0,20",
                    help="comma-separated delays (ms) the loopback raster server adds before each file answer")
    ap.add_argument("--section", choices=("all", "local", "remote"), default="all",
                    help="rerun one section only; the other's figures are kept from the results file")
    args = ap.parse_args()
    latencies = [float(v) for v in args.latencies_ms.split(",") if v.strip()]

    work = Path(tempfile.mkdtemp(prefix="refresh_bench_"))
    try:
        os.environ["GAIR_DATA_ROOT"] = str(work / "gair_data")
        os.environ.pop("DAGSTER_HOME", None)
        from gair_dataset.sample_region import ensure_sample

        ensure_sample(work / "gair_data" / "sample")
        previous = _previous() if args.section != "all" else {}
        local = bench_local(work, args.region, args.repeats) if args.section != "remote" else {}
        remote = bench_remote(work, args.region, args.repeats, latencies) if args.section != "local" else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.section == "remote":  # the local figures (and when they were measured) as they were
        payload = {**previous, "remote": remote}
    elif args.section == "local":
        payload = {**local, **({"remote": previous["remote"]} if "remote" in previous else {})}
    else:
        payload = {**local, "remote": remote}
    print(f"-> {write_result('refresh', payload)}")


if __name__ == "__main__":
    main()
