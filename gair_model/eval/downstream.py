"""Real downstream tasks: frozen encoders + ridge / kNN probes over the task registry.

:func:`run_tasks` runs every task of the selected families with every applicable method and both probes, and
returns flat result rows (the report writer depends on their exact keys)::

    {"task", "family", "encoder", "type", "target", "method", "probe", "n_train", "n_test", "n_skipped_inputs",
     "metrics": {"r2", "mae"} | {"accuracy", "macro_f1"}, "alpha", "seed", "wall_s", "checkpoint", "note"}

A task that could not run gives ``{"task", "family", "skipped": "<reason naming the missing file>"}``; a method
that could not run on a task (GeoCLIP not installed) gives the same with an extra ``"method"`` key.

``wall_s`` of a row is the time to compute that method's features plus the time of that probe. The feature time
is shared by the probes of a method (it appears in each of their rows: do not add ``wall_s`` over probes), and
image decoding, done once per task for all methods, is only reported in the note. Tasks over the same image
files (two targets of one table) share the decoded images and the features; the later task's rows then count
no feature time and say so in the note.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gair_model.eval.features import (
    GEOCLIP,
    LOCATION_ONLY_METHODS,
    RAW_LONLAT,
    RGB_TO_S2_NOTE,
    RGB_TO_S2_SHORT,
    DecodedImages,
    decode_images,
    extract_features,
    input_size,
)
from gair_model.eval.geoclip_baseline import GeoCLIPUnavailable, geoclip_weights_path, load_geoclip_location
from gair_model.eval.loading import LoadedModel, random_model
from gair_model.eval.probes import KNN_K, PROBES, SEED, ProbeInputError, run_probes
from gair_model.eval.tasks import ENCODER_FAMILY, TaskData, TaskDataMissing, TaskSpec, check_task, load_task_data

#: Task families and the encoder each evaluates.
FAMILIES: dict[str, str] = {family: encoder for encoder, family in ENCODER_FAMILY.items()}

Log = Callable[[str], None] | None


def rgb_to_bands_note() -> str:
    """How RGB scene images are fed to the 10-band Sentinel-2 RS encoder (for reports)."""
    return RGB_TO_S2_NOTE


def default_methods(trained: LoadedModel, *, seed: int = 0) -> dict[str, LoadedModel]:
    """``{"gair": trained, "random_init": same architecture with random weights (seeded)}``."""
    return {"gair": trained, "random_init": random_model(trained.config, seed=seed, device=trained.device,
                                                         rs_stats=trained.rs_stats,
                                                         preprocessing=trained.preprocessing)}


def select_tasks(tasks: Iterable[TaskSpec], families: Iterable[str] | None = None) -> list[TaskSpec]:
    """The tasks of the given families (all when ``None``).

    Raises:
        ValueError: An unknown family name.
    """
    tasks = list(tasks)
    if families is None:
        return tasks
    families = list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown famil(ies) {unknown}; choose from {list(FAMILIES)}")
    return [t for t in tasks if t.family in families]


def _skipped(spec: TaskSpec, reason: str, method: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"task": spec.name, "family": spec.family}
    if method is not None:
        row["method"] = method
    row["skipped"] = reason
    return row


def _task_methods(spec: TaskSpec, methods: Mapping[str, LoadedModel]) -> list[str]:
    names = list(methods)
    if spec.encoder == "location":
        names += list(LOCATION_ONLY_METHODS)
    return names


def _base_note(data: TaskData, images: DecodedImages | None) -> list[str]:
    parts = list(data.notes)
    if images is not None:
        if images.n_failed:
            parts.append(f"{images.n_failed} unreadable image(s) skipped (e.g. {images.failed[0]})")
        parts.append(f"images decoded once for all methods in {images.wall_s:.1f}s")
    if data.spec.encoder == "rs":
        parts.append(RGB_TO_S2_SHORT)
    return parts


def _ensure_geoclip(geoclip: dict[str, Any]) -> bool:
    """Load GeoCLIP's location encoder once into ``geoclip`` (``model``, ``path`` or ``error``); True if loaded."""
    if "model" not in geoclip:
        try:
            geoclip["path"] = str(geoclip_weights_path())
            geoclip["model"] = load_geoclip_location()
        except GeoCLIPUnavailable as exn:
            geoclip["model"], geoclip["error"] = None, str(exn)
    return geoclip["model"] is not None


def _run_one_task(spec: TaskSpec, methods: Mapping[str, LoadedModel], data_root: Path, *, probes: Sequence[str],
                  knn_k: int, batch_size: int, geoclip: dict[str, Any], cache: dict[tuple, Any],
                  log: Log) -> list[dict[str, Any]]:
    try:
        data = load_task_data(spec, data_root, log=log)
    except TaskDataMissing as exn:
        return [_skipped(spec, str(exn))]
    images = None
    image_key: tuple | None = None
    if data.image_paths is not None:
        sizes = tuple(sorted({s for m in methods.values() if (s := input_size(spec.encoder, m)) is not None}))
        # Tasks over the same images (e.g. two targets of one table) share the decoding and the features.
        image_key = (tuple(str(p) for p in data.image_paths), sizes)
        if ("images", image_key) not in cache:
            cache[("images", image_key)] = decode_images(data.image_paths, sizes, log=log, name=spec.name)
        images = cache[("images", image_key)]
    targets = data.targets if images is None else data.targets[images.keep]
    n_skipped = data.n_skipped_inputs + (images.n_failed if images is not None else 0)
    base_note = _base_note(data, images)
    rows: list[dict[str, Any]] = []
    for method in _task_methods(spec, methods):
        loaded = methods.get(method)
        checkpoint = loaded.checkpoint if loaded is not None else None
        if method == GEOCLIP:
            if not _ensure_geoclip(geoclip):
                rows.append(_skipped(spec, f"geoclip_pretrained not run: {geoclip['error']}", method))
                continue
            checkpoint = geoclip["path"]
        feat_key = ("features", method, spec.encoder, image_key)
        if image_key is not None and feat_key in cache:
            feats, feat_s, first_task = cache[feat_key]
            reuse = f"features reused from task {first_task} (computed in {feat_s:.1f}s)"
            feat_s = 0.0
        else:
            t0 = time.perf_counter()
            try:
                feats = extract_features(data, method, loaded, images=images, geoclip=geoclip.get("model"),
                                         batch_size=batch_size, log=log)
            except (ValueError, RuntimeError) as exn:  # e.g. a model whose RS encoder does not take these bands
                rows.append(_skipped(spec, f"cannot embed with {method}: {exn}", method))
                continue
            feat_s = time.perf_counter() - t0
            reuse = ""
            if image_key is not None:
                cache[feat_key] = (feats, feat_s, spec.name)
        try:
            results = run_probes(feats, targets, spec.type, probes=probes, k=knn_k, seed=SEED)
        except (ProbeInputError, ValueError) as exn:  # sklearn refuses some degenerate splits with ValueError
            rows.append(_skipped(spec, f"cannot probe {method}: {exn}", method))
            continue
        for res in results:
            note = base_note + [f"{res.n_dropped} row(s) with missing target or non-finite feature dropped"
                                if res.n_dropped else ""]
            if res.k is not None:
                note.append(f"k={res.k}")
            note.append(reuse or f"features {feats.shape[1]}-d in {feat_s:.1f}s")
            rows.append({
                "task": spec.name, "family": spec.family, "encoder": spec.encoder, "type": spec.type,
                "target": spec.target_name, "method": method, "probe": res.probe,
                "n_train": res.n_train, "n_test": res.n_test, "n_skipped_inputs": n_skipped,
                "metrics": res.metrics, "alpha": res.alpha, "seed": SEED, "wall_s": round(feat_s + res.wall_s, 4),
                "checkpoint": checkpoint, "note": "; ".join(p for p in note if p),
            })
            if log:
                figures = ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items())
                log(f"[{spec.name}] {method}/{res.probe}: {figures} (n_train={res.n_train}, n_test={res.n_test})")
    return rows


def run_tasks(tasks: Iterable[TaskSpec], methods: Mapping[str, LoadedModel], data_root: str | Path, *,
              families: Iterable[str] | None = None, log: Log = None, probes: Sequence[str] = PROBES,
              knn_k: int = KNN_K, batch_size: int = 128) -> list[dict[str, Any]]:
    """Run the downstream tasks with frozen encoders and linear / kNN probes.

    Args:
        tasks: Task specifications (e.g. :func:`gair_model.eval.tasks.load_task_specs`).
        methods: Method name -> model (e.g. ``{"gair": trained, "random_init": random}``;
            :func:`default_methods`). ``raw_lonlat_rad`` and ``geoclip_pretrained`` are added for location tasks.
        data_root: Folder the task paths are relative to.
        families: Keep only these families (``location``, ``streetview``, ``remote_sensing``); ``None``: all.
        log: Progress callback.
        probes: Probes to run (``ridge``, ``knn``).
        knn_k: kNN neighbours.
        batch_size: Images per forward pass.

    Returns:
        Result rows (see the module docstring), task by task in registry order, then method, then probe.

    Raises:
        ValueError: An unknown family, a method name reserved for a baseline, or a malformed task (e.g. a
            configured column absent from the CSV header; all tasks are checked before any computation).
    """
    reserved = [m for m in methods if m in (RAW_LONLAT, GEOCLIP)]
    if reserved:
        raise ValueError(f"method name(s) {reserved} are reserved for the built-in location baselines")
    selected = select_tasks(tasks, families)
    root = Path(data_root)
    for spec in selected:  # fail fast on configuration errors, before hours of feature extraction
        check_task(spec, root)
    geoclip: dict[str, Any] = {}
    cache: dict[tuple, Any] = {}
    rows: list[dict[str, Any]] = []
    for spec in selected:
        t0 = time.perf_counter()
        if log:
            log(f"[{spec.name}] {spec.family} task ({spec.type}, encoder {spec.encoder})")
        task_rows = _run_one_task(spec, methods, root, probes=probes, knn_k=knn_k, batch_size=batch_size,
                                  geoclip=geoclip, cache=cache, log=log)
        rows += task_rows
        if log:
            skipped = [r["skipped"] for r in task_rows if "skipped" in r]
            log(f"[{spec.name}] done in {time.perf_counter() - t0:.1f}s" + (f"; skipped: {skipped}" if skipped else ""))
    return rows

