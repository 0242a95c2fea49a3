"""Faults injected into a real dataset build (stac_items -> tile_grid -> sv_points -> pairs -> shards of one region).

The region's STAC API is :class:`fault_servers.FaultyStacApi` (rustac) and its rasters are served by
:class:`fault_servers.FaultyRasterServer` (the bands of a real Sentinel-2 L2A patch, one GeoTIFF per Earth
Search-style asset, read through SAS-style signed URLs). A clean build is published first; each scenario then
rebuilds on a copy of it with one fault and must either recover (outputs byte-identical to the clean build) or fail
with a clear message, leave the published outputs intact (or the shard set absent, never partial), and be followed
by a rerun identical to the clean build. :func:`run_all` returns the tally that ``bench/faults_bench.py`` writes to
``bench/results/faults.json`` and ``tests/faults`` checks.

Dagster and the pipelines are imported only inside :func:`build` (after :func:`prepare` has set ``GAIR_REGIONS``),
because the code location reads its regions when it loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from fault_servers import FaultyRasterServer, FaultyStacApi, LoopbackSigner

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
PATCH = SHARED_DATA / "rasters" / "s2_l2a_patches" / "images" / "patch_252161.tif"
PHOTOS = SHARED_DATA / "streetview" / "exif_photos" / "lund"
ITEM = REPO / "tests" / "fixtures" / "earth_search" / "s2_l2a_v1_item.json"
BBOX = (19.875, -32.838, 19.900, -32.818)
REGION = "faults"
REGION_ASSETS = ("stac_items", "tile_grid", "sv_points", "pairs", "shards")
STAGES = ("stac", "tiles", "streetview", "pairs", "shards")
#: stats.json fields that describe the run rather than its output: timings, the incremental-build versions (hashes
#: of what a stage was built from, which may include the data root's location) and I/O counters.
VOLATILE_STATS = {"seconds", "input_version", "data_version", "chip_reads", "chip_retries", "chip_resigned",
                  "cached_tiles"}
N_POINTS = 40
STAC_TIMEOUT_S = 5.0  # the client's timeout: a stalled answer outlasts it, a real one on a loaded machine does not
FSIZE_LIMIT = 64 * 1024  # bytes a file may grow to in the full-disk scenario (a shard is larger)


def missing_inputs() -> list[str]:
    """The real inputs (``../shared/data``) that are absent."""
    return [str(p) for p in (PATCH, PHOTOS) if not p.exists()]


@dataclass
class Setup:
    """The prepared work folder: rasters, the region, and the servers' URLs once started."""

    work: Path
    www: Path
    items: list[dict[str, Any]]
    stac_url: str = ""
    token_url: str = ""


def prepare(work: Path) -> Setup:
    """Write the rasters, street-view points and regions file under ``work`` and point ``GAIR_REGIONS`` at it."""
    from gair_dataset.bands import S2_COMMON_NAMES, S2_L2A_ALL_BANDS

    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    with rasterio.open(PATCH) as src:
        prof = {**src.profile, "count": 1, "tiled": False}
        prof.pop("blockxsize", None), prof.pop("blockysize", None)
        data = src.read()
    for i, band in enumerate(S2_L2A_ALL_BANDS):
        with rasterio.open(www / f"{S2_COMMON_NAMES[band]}.tif", "w", **prof) as dst:
            dst.write(data[i], 1)
    with rasterio.open(www / "scl.tif", "w", **{**prof, "dtype": "uint8"}) as dst:
        dst.write(np.full(data.shape[1:], 4, np.uint8), 1)  # vegetation everywhere: no cloud
    item = json.loads(ITEM.read_text())
    item["assets"] = {k: a for k, a in item["assets"].items() if (www / Path(a["href"]).name).exists()}
    photos = sorted(PHOTOS.glob("*.jpg"))
    rng = np.random.default_rng(0)
    pd.DataFrame({"id": [f"f{i:03d}" for i in range(N_POINTS)],
                  "lon": rng.uniform(BBOX[0], BBOX[2], N_POINTS), "lat": rng.uniform(BBOX[1], BBOX[3], N_POINTS),
                  "image_path": [str(photos[i % len(photos)]) for i in range(N_POINTS)]}).to_csv(
        work / "points.csv", index=False)
    (work / "regions.yaml").write_text(f"""
regions:
  {REGION}:
    bbox: [{BBOX[0]}, {BBOX[1]}, {BBOX[2]}, {BBOX[3]}]
    collections: [sentinel-2-l2a]
    datetime: 2020-01-01/2025-12-31
    max_cloud_cover: 30
    tile_grid: {{kind: utm, tile_px: 32, resolution: 10.0, items_per_tile: 1}}
    split: {{block_tiles: 1, val_fraction: 0.2, test_fraction: 0.2, seed: 0}}
    streetview: {{kind: table, path: points.csv}}
""")
    os.environ["GAIR_REGIONS"] = str(work / "regions.yaml")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    return Setup(work=work, www=www, items=[item])


def point_items_at(items: list[dict[str, Any]], raster_url: str) -> list[dict[str, Any]]:
    """The items with their asset hrefs on the raster server (unsigned)."""
    out = json.loads(json.dumps(items))
    for it in out:
        for asset in it["assets"].values():
            asset["href"] = f"{raster_url}/p/{Path(asset['href']).name}"
    return out


# -- one build ------------------------------------------------------------------------------------------------


@dataclass
class Build:
    """The outcome of one build: success, check results and the failure message (redacted by Dagster's log)."""

    success: bool
    checks: dict[str, bool]
    error: str
    seconds: float


def build(root: Path, stac_url: str, token_url: str, selection: tuple[str, ...] = REGION_ASSETS,
          chip_workers: int | None = None) -> Build:
    """Materialise the region's assets (``selection``) into ``root`` in this process, through the servers."""
    import dagster as dg

    from pipelines.common.storage import DataRoot
    from pipelines.definitions import defs
    from pipelines.defs.resources import resources
    from pipelines.defs.shards.resources import RasterAccess
    from pipelines.defs.stac.resources import LiveStacCatalog

    class LoopbackRasterAccess(RasterAccess):
        """Chips signed with tokens of the loopback raster server."""

        token_url: str

        def signer(self) -> LoopbackSigner:
            return LoopbackSigner(self.token_url)

    res = dict(resources().resources)
    res["stac"] = LiveStacCatalog(url=stac_url, sign_with_planetary_computer=False, max_retries=3,
                                  backoff_factor=0.2, timeout_s=STAC_TIMEOUT_S)
    res["raster_access"] = LoopbackRasterAccess(token_url=token_url)
    res["data_root"] = DataRoot(root=str(root))
    assets = [a for a in defs.assets if any(k.to_user_string() in REGION_ASSETS for k in a.keys)]
    t0 = time.monotonic()
    result = dg.materialize([*assets, *defs.asset_checks], selection=list(selection), resources=res,
                            partition_key=REGION, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
                            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}},
                                        **({"ops": {"shards": {"config": {"chip_workers": chip_workers}}}}
                                           if chip_workers else {})})
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    errors = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            err = event.step_failure_data.error
            while err is not None:  # Dagster's wrapper, then the cause the step raised
                errors.append(err.message.strip().splitlines()[0] if err.message.strip() else "")
                err = err.cause
    return Build(success=result.success and all(checks.values()), checks=checks,
                 error=" <- ".join(e for e in errors if e), seconds=time.monotonic() - t0)


# -- comparing outputs ----------------------------------------------------------------------------------------


def outputs(root: Path) -> dict[str, str]:
    """Every published file of the region's stages -> sha256 (stats.json without its timings and data roots).

    Data roots are the folders of one work folder (``root.parent``); the paths stats.json records are compared
    without them.

    The same comparison as ``tests/pipelines/test_concurrent_runs.py``; staging folders and temporary files are
    not published and are listed by :func:`leftovers`.
    """
    out = {}
    for stage in STAGES:
        for p in sorted((root / stage / REGION).rglob("*")):
            if not p.is_file() or p.name.startswith(".staging") or any(q.name.startswith(".staging")
                                                                       for q in p.parents):
                continue
            data = p.read_bytes()
            if p.name == "stats.json":
                stats = {k: v for k, v in json.loads(data).items() if k not in VOLATILE_STATS}
                text = json.dumps(stats, sort_keys=True)
                data = re.sub(re.escape(str(root.parent)) + r"/[^/\"]+", "<data root>", text).encode()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary files and staging folders under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".tmp-" in p.name or p.name.startswith(".staging"))


def shard_set_state(root: Path) -> tuple[str, int]:
    """``("complete", n_samples)`` when shards.json, the manifest and every listed shard agree (sha256 included),
    ``("absent", 0)`` when neither shards.json nor the manifest is published, else ``("partial", n)``."""
    folder = root / "shards" / REGION
    doc_path, manifest = folder / "shards.json", folder / "manifest.parquet"
    if not doc_path.exists() and not manifest.exists():
        return "absent", 0
    if not doc_path.exists() or not manifest.exists():
        return "partial", 0
    doc = json.loads(doc_path.read_text())
    ok = all((folder / s["path"]).is_file()
             and hashlib.sha256((folder / s["path"]).read_bytes()).hexdigest() == s["sha256"] for s in doc["shards"])
    rows = len(pd.read_parquet(manifest, columns=["key"]))
    ok = ok and rows == doc["n_samples"] == sum(s["n_samples"] for s in doc["shards"])
    return ("complete" if ok else "partial"), int(doc["n_samples"])


# -- scenarios ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One fault kind's line of the tally."""

    kind: str
    injected: int
    survived: int
    samples_lost: int
    outcome: str  # recovered | failed_clean | not_survived
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What every scenario shares: the clean build, the servers and a work folder."""

    setup: Setup
    stac: FaultyStacApi
    raster: FaultyRasterServer
    clean_root: Path
    clean: dict[str, str]
    clean_samples: int
    published: set[Path] = field(default_factory=set)  # roots that held the clean build's shard set before

    def kept_published_set(self, root: Path) -> bool:
        """The clean build's shards, manifest and shards.json are all still there, byte for byte."""
        now = outputs(root)
        return all(now.get(k) == v for k, v in self.clean.items()
                   if k.startswith("shards/") and not k.endswith("stats.json"))

    def empty_root(self, name: str) -> Path:
        """A new, empty data root: every stage runs (and reads through the servers)."""
        root = self.setup.work / name
        shutil.rmtree(root, ignore_errors=True)
        return root

    def published_root(self, name: str) -> Path:
        """A copy of the clean build's data root whose shard set must be rebuilt (its stats.json removed, so that
        an incremental build cannot skip it): a refresh with published outputs to keep intact."""
        root = self.empty_root(name)
        shutil.copytree(self.clean_root, root)
        (root / "shards" / REGION / "stats.json").unlink()
        shutil.rmtree(root / "cache", ignore_errors=True)  # the rebuild reads its chips through the servers again
        self.published.add(root)
        return root

    def build(self, root: Path, selection: tuple[str, ...] = REGION_ASSETS, chip_workers: int | None = None) -> Build:
        """A build through the servers with a token cache of its own (new URLs: GDAL caches nothing of them)."""
        LoopbackSigner.forget_all()
        return build(root, self.setup.stac_url, self.setup.token_url, selection, chip_workers)


def _judge(ctx: Context, kind: str, injected: int, root: Path, run: Build, how: str,
           details: dict[str, Any]) -> Outcome:
    """Recovered, or failed cleanly and rerun to the clean outputs; anything else is not survived."""
    details = {**details, "seconds": round(run.seconds, 1)}
    if run.success and outputs(root) == ctx.clean and not leftovers(root):
        return Outcome(kind, injected, injected, 0, "recovered", how, details)
    state, _ = shard_set_state(root)
    intact = state in ("complete", "absent") and not leftovers(root)
    if root in ctx.published:  # a shard set was published before the fault: it must still be, unchanged
        details["previous_set_kept"] = ctx.kept_published_set(root)
        intact = intact and state == "complete" and details["previous_set_kept"]
    rerun = ctx.build(root)
    state_after, n_after = shard_set_state(root)
    identical = rerun.success and outputs(root) == ctx.clean and not leftovers(root)
    details.update(run_error=run.error, published_after_fault=state, rerun_identical=identical)
    lost = ctx.clean_samples - n_after if state_after == "complete" else ctx.clean_samples
    if not run.success and intact and identical:
        return Outcome(kind, injected, injected, lost, "failed_clean", f"{how}: {run.error}", details)
    return Outcome(kind, injected, 0, lost, "not_survived", f"{how}: {run.error or 'outputs differ'}", details)


def stac_fault(ctx: Context, kind: str, faults: tuple[str, ...], how: str) -> Outcome:
    """A refresh whose STAC search meets ``faults`` (the next POST /search answers) before the real answer."""
    root = ctx.empty_root(kind)
    ctx.stac.inject(*faults)
    start = len(ctx.stac.log)
    try:
        run = ctx.build(root)
    finally:
        ctx.stac.release.set()  # a stalled request ends now
    log = ctx.stac.log[start:]
    served = [o for _, _, _, o in log if o in faults]
    gaps = [round(b[0] - a[0], 2) for a, b in zip(log, log[1:], strict=False) if a[3] in faults]
    return _judge(ctx, kind, len(served), root, run, how,
                  {"search_answers": [o for _, m, _, o in log if m == "POST"], "seconds_after_fault": gaps,
                   "pending": ctx.stac.pending()})


def raster_expired(ctx: Context) -> Outcome:
    """The chips' cached token is expired by the server's clock: 403 until re-signed with a fresh token."""
    root = ctx.empty_root("raster_403_expired")
    LoopbackSigner.forget_all()
    LoopbackSigner(ctx.setup.token_url)("warm")  # the token a long run would have cached
    ctx.raster.expire_tokens()
    before_403, before_tokens = ctx.raster.count(403, "expired"), ctx.raster.state.tokens_issued
    run = build(root, ctx.setup.stac_url, ctx.setup.token_url)  # keeps the cached, now expired, token
    refused = ctx.raster.count(403, "expired") - before_403
    stats_path = root / "shards" / REGION / "stats.json"
    resigned = json.loads(stats_path.read_text()).get("chip_resigned") if stats_path.exists() else None
    # answers_403 counts what the server refused; reads_resigned what the readers saw refused, which was once more
    # (3 fresh tokens after 2 answers: GDAL's /vsicurl/ keeps per-URL state shared between threads). Every fresh
    # token follows a re-sign, so tokens_issued <= reads_resigned whatever the timing.
    return _judge(ctx, "raster_403_expired", 1 if refused else 0, root, run,
                  "HTTP 403 (expired signature) on chip reads; the chip reader dropped the cached token and "
                  "re-signed once", {"answers_403": refused, "reads_resigned": resigned,
                                     "tokens_issued": ctx.raster.state.tokens_issued - before_tokens})


def raster_cut(ctx: Context, n: int = 2) -> Outcome:
    """The next ``n`` range answers stop half-way and reset the connection (four chip reader threads).

    GDAL neither retries a range answer cut mid-body nor forgets it (its ``/vsicurl/`` cache keeps the short bytes
    for the process); the chip prefetcher reads such a tile again once the other reads in flight are done, with
    those cached bytes dropped.
    """
    root = ctx.empty_root("raster_connection_cut")
    before = ctx.raster.count(206, "cut")
    ctx.raster.cut_next(n)
    run = ctx.build(root, chip_workers=4)
    cut = ctx.raster.count(206, "cut") - before
    ctx.raster.cut_next(0)
    stats: dict[str, Any] = {}
    path = root / "shards" / REGION / "stats.json"
    if path.exists():
        stats = json.loads(path.read_text())
    return _judge(ctx, "raster_connection_cut", cut, root, run,
                  "range answers cut mid-body: the tiles whose reads failed were read again, alone, after GDAL's "
                  "cached bytes of those files were dropped",
                  {"answers_cut": cut, "chip_workers": 4, "tiles_read_again": stats.get("chip_retries"),
                   "rejected_by_reason": stats.get("rejected_by_reason", {})})


CHILD = "--child-build"


def worker_killed(ctx: Context) -> Outcome:
    """SIGKILL a build (a subprocess) while its shards step stages shards, then rerun."""
    root = ctx.published_root("worker_killed")
    held = ctx.raster.hold_reads()
    args = json.dumps({"root": str(root), "stac_url": ctx.setup.stac_url, "token_url": ctx.setup.token_url})
    log_path = ctx.setup.work / "killed.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("faults_bench.py")), CHILD, args],
                                stdout=fh, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        staging: list[Path] = []
        if ctx.raster.state.held.wait(180):  # the shards step is reading chips
            deadline = time.monotonic() + 60
            while not staging and time.monotonic() < deadline and proc.poll() is None:
                staging = list((root / "shards" / REGION).glob(".staging-*"))  # created right after the reads
                time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        held.set()
        ctx.raster.release_reads()
    killed_mid_shards = bool(staging) and proc.returncode == -signal.SIGKILL
    state, _ = shard_set_state(root)
    kept = ctx.kept_published_set(root)
    upstream_intact = all(v == ctx.clean.get(k) for k, v in outputs(root).items() if not k.startswith("shards/"))
    rerun = ctx.build(root)
    state_after, n_after = shard_set_state(root)
    identical = rerun.success and outputs(root) == ctx.clean and not leftovers(root)
    ok = killed_mid_shards and state == "complete" and kept and upstream_intact and identical
    details = {"killed_with_staging": [p.name.split("-")[0] for p in staging], "returncode": proc.returncode,
               "published_after_kill": state, "previous_set_kept": kept, "earlier_stages_intact": upstream_intact,
               "rerun_identical": identical, "rerun_seconds": round(rerun.seconds, 1)}
    if not killed_mid_shards:
        details["child_log"] = log_path.read_text()[-3000:]
    lost = ctx.clean_samples - n_after if state_after == "complete" else ctx.clean_samples
    how = ("SIGKILL while the shards step staged a rebuild; the shard set published before left "
           f"{state}{' and unchanged' if kept else ''}, the staging folder of the dead writer removed by the rerun, "
           "which matched the clean run")
    return Outcome("worker_killed", int(killed_mid_shards), int(ok), lost, "failed_clean" if ok else "not_survived",
                   how, details)


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG in this process (SIGXFSZ ignored), as on a full disk."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def disk_full(ctx: Context) -> Outcome:
    """The shards step writes into a file-size limit (EFBIG at the OS call), then reruns without it."""
    root = ctx.published_root("disk_full")
    LoopbackSigner.forget_all()
    with file_size_limit(FSIZE_LIMIT):
        run = build(root, ctx.setup.stac_url, ctx.setup.token_url, ("shards",))
    injected = int(not run.success and "File too large" in run.error)
    return _judge(ctx, "disk_full", injected, root, run,
                  f"shard writes past {FSIZE_LIMIT // 1024} KiB fail with EFBIG (RLIMIT_FSIZE); the step fails at "
                  "once (no retry for a full disk) saying to free space", {})


def run_all(work: Path, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Prepare, build clean, run every scenario (or those named in ``only``); the tally."""
    setup = prepare(work)
    with FaultyRasterServer(setup.www) as raster:
        setup.token_url = raster.token_url
        with FaultyStacApi(point_items_at(setup.items, raster.url), work) as stac:
            setup.stac_url = stac.url
            clean_root = work / "clean"
            LoopbackSigner.forget_all()
            clean_run = build(clean_root, setup.stac_url, setup.token_url)
            if not clean_run.success:
                raise RuntimeError(f"the clean build failed: {clean_run.error}")
            state, n = shard_set_state(clean_root)
            if state != "complete" or n == 0:
                raise RuntimeError(f"the clean build published no complete shard set ({state}, {n} samples)")
            ctx = Context(setup, stac, raster, clean_root, outputs(clean_root), n)
            scenarios = {
                "stac_429": lambda: stac_fault(ctx, "stac_429", ("429",),
                                               "HTTP 429 with Retry-After on the search; urllib3 waited and retried"),
                "stac_503": lambda: stac_fault(ctx, "stac_503", ("503", "503"),
                                               "HTTP 503 twice on the search; retried with exponential backoff"),
                "stac_timeout": lambda: stac_fault(ctx, "stac_timeout", ("stall",),
                                                   f"no answer to the search within the {STAC_TIMEOUT_S:g} s "
                                                   "timeout; the read timeout was retried"),
                "stac_malformed_page": lambda: stac_fault(ctx, "stac_malformed_page", ("malformed",),
                                                          "HTTP 200 with half a page (not JSON); the page was "
                                                          "fetched again"),
                "raster_403_expired": lambda: raster_expired(ctx),
                "raster_connection_cut": lambda: raster_cut(ctx),
                "worker_killed": lambda: worker_killed(ctx),
                "disk_full": lambda: disk_full(ctx),
            }
            results = [fn() for name, fn in scenarios.items() if not only or name in only]
    faults = {r.kind: {"injected": r.injected, "survived": r.survived, "samples_lost": r.samples_lost,
                       "outcome": r.outcome, "message": r.message, "details": r.details} for r in results}
    return {
        "region": {"name": REGION, "clean_samples": ctx.clean_samples,
                   "clean_build_seconds": round(clean_run.seconds, 1), "published_files": len(ctx.clean)},
        "faults": faults,
        "totals": {"kinds": len(results), "injected": sum(r.injected for r in results),
                   "survived": sum(r.survived for r in results),
                   "samples_lost": sum(r.samples_lost for r in results),
                   "all_survived": all(r.injected > 0 and r.survived == r.injected and r.samples_lost == 0
                                       for r in results)},
    }


def child_build(args: str) -> int:
    """Entry point of the subprocess build of :func:`worker_killed` (``faults_bench.py --child-build``)."""
    spec = json.loads(args)
    run = build(Path(spec["root"]), spec["stac_url"], spec["token_url"])
    print("BUILD", run.success, run.error, flush=True)
    return 0 if run.success else 1
