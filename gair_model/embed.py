r"""Export GAIR embeddings to GeoParquet: every sample of a shard set, or the locations of a CSV of points.

Command line (``python -m gair_model.embed``)::

    python -m gair_model.embed shards --checkpoint RUN_OR_CKPT --shards PATH [PATH ...] --out OUT.parquet \
        [--splits test val | none] [--batch-size 64] [--max-samples N] [--device auto]
    python -m gair_model.embed points --checkpoint RUN_OR_CKPT --csv POINTS.csv --out OUT.parquet \
        [--lon-col lon] [--lat-col lat] [--batch-size 4096] [--device auto]

``--checkpoint`` is a training run folder, its ``checkpoints/`` folder, ``latest.json`` or a ``.safetensors`` file
(:func:`gair_model.eval.loading.load_trained`). The result summary is printed as one JSON line.

Output (GeoParquet 1.0, point geometry ``geometry`` as WKB in EPSG:4326, longitude/latitude order; readable by
``geopandas.read_parquet`` and by DuckDB with the spatial extension):

* shards: one row per sample, in shard order: ``key``, ``sv_id``, ``tile_id``, ``split``, ``lon``, ``lat``, ``x``,
  ``y`` (position in the tile from its top-left, in [0, 1]), ``sv_emb``, ``rs_local_emb`` (the RS embedding
  localised at the SV position), ``rs_global_emb`` (mean RS token) and ``loc_emb``, each a fixed-size list of
  float32 (``embed_dim`` wide, ``rs_global_emb`` the RS encoder width), then ``geometry``;
* points: ``csv_line`` (the row's line in the CSV file, the header being line 1), the CSV's other columns as
  strings (a name that clashes with an output column gets a ``src_`` prefix), ``lon``, ``lat``, ``loc_emb``,
  ``geometry``. Rows with a missing, non-numeric, non-finite or out-of-range coordinate are reported with their
  line number and skipped; when no row is valid the export fails.

Embeddings are not normalised (L2-normalise them for cosine similarity, as the losses do). The Parquet
key-value metadata ``gair`` records the checkpoint, step and model configuration. Both exports stream batch by
batch (a progress line every ``log_every`` batches, to :mod:`logging` and an optional callback) and write
atomically: a temporary file in the output folder, renamed into place when complete, so a failure never leaves a
partial file at the output path.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gair_dataset.atomic import atomic_write
from gair_model.eval.loading import LoadedModel, embed_batch, iter_eval_batches, load_trained

logger = logging.getLogger("gair_model.embed")

#: Output column -> key of :func:`gair_model.eval.loading.embed_batch`.
EMBEDDING_COLUMNS = {"sv_emb": "sv", "rs_local_emb": "rs_local", "rs_global_emb": "rs_global", "loc_emb": "loc"}
SHARD_SCALARS = (("key", pa.string()), ("sv_id", pa.string()), ("tile_id", pa.string()), ("split", pa.string()),
                 ("lon", pa.float64()), ("lat", pa.float64()), ("x", pa.float64()), ("y", pa.float64()))
POINT_COLUMNS = ("csv_line", "lon", "lat", "loc_emb", "geometry")
GEOMETRY = "geometry"
ROW_GROUP_ROWS = 16_384
MAX_REPORTED_BAD_ROWS = 1000

ProgressCallback = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------------------------
# GeoParquet plumbing
# ----------------------------------------------------------------------------------------------------------------
def geo_metadata() -> dict[str, Any]:
    """The GeoParquet 1.0 ``geo`` metadata of a WKB point column ``geometry`` in EPSG:4326."""
    from pyproj import CRS

    return {"version": "1.0.0", "primary_column": GEOMETRY,
            "columns": {GEOMETRY: {"encoding": "WKB", "geometry_types": ["Point"],
                                   "crs": CRS.from_epsg(4326).to_json_dict()}}}


def _model_metadata(loaded: LoadedModel) -> dict[str, Any]:
    return {"checkpoint": loaded.checkpoint, "step": loaded.step, "label": loaded.label,
            "model_config": loaded.config.to_dict()}


def _schema(fields: list[pa.Field], loaded: LoadedModel) -> pa.Schema:
    meta = {b"geo": json.dumps(geo_metadata()).encode(), b"gair": json.dumps(_model_metadata(loaded)).encode()}
    return pa.schema([*fields, pa.field(GEOMETRY, pa.binary())], metadata=meta)


def _vector_column(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)


def _wkb_points(lon: np.ndarray, lat: np.ndarray) -> pa.Array:
    """Little-endian WKB points (x = lon, y = lat)."""
    import shapely

    return pa.array(shapely.to_wkb(shapely.points(lon, lat), byte_order=1), type=pa.binary())


class _BufferedWriter:
    """A ParquetWriter that groups small batches into row groups of about ``ROW_GROUP_ROWS`` rows."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.schema = schema
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self._pending: list[pa.Table] = []
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._rows += table.num_rows
        if self._rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending))
            self._pending, self._rows = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()


class _Progress:
    """Progress lines every ``every`` batches to the logger and an optional callback."""

    def __init__(self, what: str, every: int, callback: ProgressCallback | None) -> None:
        self.what, self.every, self.callback = what, max(1, every), callback
        self.t0 = time.perf_counter()
        self.batches = self.rows = 0

    def step(self, rows: int, *, final: bool = False) -> None:
        if not final:
            self.batches += 1
            self.rows += rows
            if self.batches % self.every:
                return
        elapsed = time.perf_counter() - self.t0
        info = {"what": self.what, "batches": self.batches, "rows": self.rows, "elapsed_s": round(elapsed, 3),
                "samples_per_s": round(self.rows / max(elapsed, 1e-9), 2), "done": final}
        logger.info("%s: %d rows in %d batches, %.1f rows/s%s", self.what, self.rows, self.batches,
                 info["samples_per_s"], " (done)" if final else "")
        if self.callback is not None:
            self.callback(info)


# ----------------------------------------------------------------------------------------------------------------
# shard samples
# ----------------------------------------------------------------------------------------------------------------
def _float(meta: dict[str, Any], key: str) -> float:
    try:
        return float(meta[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def _shard_table(batch: dict[str, Any], emb: dict[str, torch.Tensor], schema: pa.Schema, n: int) -> pa.Table:
    metas = batch["meta"][:n]
    cols: dict[str, pa.Array] = {"key": pa.array(batch["key"][:n], type=pa.string())}
    for name in ("sv_id", "tile_id", "split"):
        cols[name] = pa.array([None if m.get(name) is None else str(m[name]) for m in metas], type=pa.string())
    for name in ("lon", "lat", "x", "y"):
        cols[name] = pa.array(np.array([_float(m, name) for m in metas], dtype=np.float64))
    for col, key in EMBEDDING_COLUMNS.items():
        cols[col] = _vector_column(emb[key][:n].numpy(), emb[key].shape[1])
    cols[GEOMETRY] = _wkb_points(cols["lon"].to_numpy(), cols["lat"].to_numpy())
    return pa.table(cols, schema=schema)


def export_shard_embeddings(loaded: LoadedModel, shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                            out: str | Path, *,
                            splits: Sequence[str] | None = None, batch_size: int = 64,
                            max_samples: int | None = None, log: ProgressCallback | None = None,
                            log_every: int = 10) -> dict[str, Any]:
    """Embed every sample of a shard set and write one GeoParquet row per sample.

    Args:
        loaded: The model (:func:`gair_model.eval.loading.load_trained` or ``random_model``).
        shards: Shard specification (folders, globs, brace patterns, paths).
        out: Output ``.parquet`` path (written atomically).
        splits: Keep only these splits (``None``: every sample).
        batch_size: Samples per forward pass.
        max_samples: Stop after this many samples.
        log: Optional callback receiving a progress dict (``batches``, ``rows``, ``elapsed_s``,
            ``samples_per_s``, ``done``) every ``log_every`` batches and at the end.
        log_every: Batches between progress reports.

    Returns:
        ``{"out", "n_rows", "n_batches", "splits" (rows per split), "dims" (width of each embedding column),
        "wall_s", "samples_per_s", "checkpoint", "step"}``.

    Raises:
        ValueError: If no sample matched (nothing is written).
    """
    if batch_size < 1 or (max_samples is not None and max_samples < 1):
        raise ValueError("batch_size and max_samples must be >= 1")
    spec: str | list[str] = (os.fspath(shards) if isinstance(shards, (str, os.PathLike))
                             else [os.fspath(s) for s in shards])
    e, d = loaded.config.embed_dim, loaded.model.rs_encoder.embed_dim
    dims = {"sv_emb": e, "rs_local_emb": e, "rs_global_emb": d, "loc_emb": e}
    schema = _schema([pa.field(n, t) for n, t in SHARD_SCALARS]
                     + [pa.field(c, pa.list_(pa.float32(), w)) for c, w in dims.items()], loaded)
    progress = _Progress(f"embed shards -> {Path(out).name}", log_every, log)
    per_split: dict[str, int] = {}

    def write(tmp: str) -> None:
        writer = _BufferedWriter(tmp, schema)
        try:
            for batch in iter_eval_batches(loaded, spec, splits=splits, batch_size=batch_size):
                n = len(batch["key"]) if max_samples is None else min(len(batch["key"]), max_samples - progress.rows)
                table = _shard_table(batch, embed_batch(loaded, batch), schema, n)
                writer.write(table)
                for m in batch["meta"][:n]:
                    per_split[str(m.get("split"))] = per_split.get(str(m.get("split")), 0) + 1
                progress.step(n)
                if max_samples is not None and progress.rows >= max_samples:
                    break
        finally:
            writer.close()
        if progress.rows == 0:
            raise ValueError(f"no sample in {spec!r} for splits {list(splits) if splits else 'all'}")

    t0 = time.perf_counter()
    atomic_write(out, write)
    wall = time.perf_counter() - t0
    progress.step(0, final=True)
    return {"out": str(Path(out).resolve()), "n_rows": progress.rows, "n_batches": progress.batches,
            "splits": per_split, "dims": dims, "wall_s": round(wall, 3),
            "samples_per_s": round(progress.rows / max(wall, 1e-9), 2), "checkpoint": loaded.checkpoint,
            "step": loaded.step}


# ----------------------------------------------------------------------------------------------------------------
# points of a CSV
# ----------------------------------------------------------------------------------------------------------------
def _parse_point(row: dict[str | None, Any], lon_col: str, lat_col: str) -> tuple[float, float] | str:
    """``(lon, lat)`` of a CSV row, or why it is unusable."""
    if None in row:
        return f"{len(row) - 1 + len(row[None])} fields, more than the header"
    values = []
    for col, lo, hi in ((lon_col, -180.0, 180.0), (lat_col, -90.0, 90.0)):
        raw = row.get(col)
        if raw is None or str(raw).strip() == "":
            return f"{col} is missing"
        try:
            v = float(raw)
        except ValueError:
            return f"{col} {raw!r} is not a number"
        if not math.isfinite(v) or not lo <= v <= hi:
            return f"{col} {raw!r} is outside [{lo:g}, {hi:g}]"
        values.append(v)
    return values[0], values[1]


def _csv_chunks(reader: csv.DictReader, fh: Any, lon_col: str, lat_col: str, size: int,
                bad: list[dict[str, Any]]) -> Iterator[tuple[list[int], list[dict[str, Any]], np.ndarray]]:
    """``(line numbers, rows, lon/lat array)`` chunks of valid rows; bad rows go to ``bad``."""
    lines: list[int] = []
    rows: list[dict[str, Any]] = []
    coords: list[tuple[float, float]] = []
    line = reader.line_num
    for row in reader:
        line = reader.line_num  # the row's last physical line (a quoted field can span lines)
        parsed = _parse_point(row, lon_col, lat_col)
        if isinstance(parsed, str):
            bad.append({"line": line, "reason": parsed})
            if len(bad) <= 20:
                logger.warning("%s line %d skipped: %s", getattr(fh, "name", "csv"), line, parsed)
            continue
        lines.append(line)
        rows.append(row)
        coords.append(parsed)
        if len(rows) >= size:
            yield lines, rows, np.asarray(coords, dtype=np.float64)
            lines, rows, coords = [], [], []
    if rows:
        yield lines, rows, np.asarray(coords, dtype=np.float64)


@torch.no_grad()
def encode_points(loaded: LoadedModel, lonlat: np.ndarray) -> np.ndarray:
    """Location embeddings (``N x embed_dim`` float32) of ``N x 2`` (lon, lat) degrees."""
    x = torch.from_numpy(np.ascontiguousarray(lonlat, dtype=np.float64)).to(loaded.device)
    return loaded.model.encode_location(x).float().cpu().numpy()


def export_point_embeddings(loaded: LoadedModel, csv_path: str | Path, out: str | Path, *, lon_col: str = "lon",
                            lat_col: str = "lat", batch_size: int = 4096, log: ProgressCallback | None = None,
                            log_every: int = 10) -> dict[str, Any]:
    """Embed the locations of a CSV of points and write one GeoParquet row per valid point.

    Args:
        loaded: The model.
        csv_path: CSV file with a header row.
        out: Output ``.parquet`` path (written atomically).
        lon_col: Longitude column (degrees, [-180, 180]).
        lat_col: Latitude column (degrees, [-90, 90]).
        batch_size: Points per forward pass.
        log: Optional progress callback (see :func:`export_shard_embeddings`).
        log_every: Batches between progress reports.

    Returns:
        ``{"out", "n_rows", "n_bad", "bad_rows" (the first 1000 as ``{"line", "reason"}``), "dims", "wall_s",
        "samples_per_s", "checkpoint", "step"}``.

    Raises:
        ValueError: If a coordinate column is missing or no row is valid (nothing is written).
    """
    csv_path = Path(csv_path)
    e = loaded.config.embed_dim
    bad: list[dict[str, Any]] = []
    progress = _Progress(f"embed points -> {Path(out).name}", log_every, log)

    def write(tmp: str) -> None:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            missing = [c for c in (lon_col, lat_col) if c not in header]
            if missing:
                raise ValueError(f"{csv_path}: no column {missing} (columns: {header})")
            extra = [c for c in header if c not in (lon_col, lat_col)]
            names = {c: (f"src_{c}" if c in POINT_COLUMNS else c) for c in extra}
            schema = _schema([pa.field("csv_line", pa.int64())]
                             + [pa.field(names[c], pa.string()) for c in extra]
                             + [pa.field("lon", pa.float64()), pa.field("lat", pa.float64()),
                                pa.field("loc_emb", pa.list_(pa.float32(), e))], loaded)
            writer = _BufferedWriter(tmp, schema)
            try:
                for lines, rows, lonlat in _csv_chunks(reader, fh, lon_col, lat_col, batch_size, bad):
                    cols: dict[str, pa.Array] = {"csv_line": pa.array(lines, type=pa.int64())}
                    for c in extra:
                        cols[names[c]] = pa.array([r.get(c) for r in rows], type=pa.string())
                    cols["lon"], cols["lat"] = pa.array(lonlat[:, 0]), pa.array(lonlat[:, 1])
                    cols["loc_emb"] = _vector_column(encode_points(loaded, lonlat), e)
                    cols[GEOMETRY] = _wkb_points(lonlat[:, 0], lonlat[:, 1])
                    writer.write(pa.table(cols, schema=schema))
                    progress.step(len(rows))
            finally:
                writer.close()
        if len(bad) > 20:
            logger.warning("%s: %d bad rows skipped in all (first 20 listed above)", csv_path, len(bad))
        if progress.rows == 0:
            detail = "; ".join(f"line {b['line']}: {b['reason']}" for b in bad[:5])
            raise ValueError(f"{csv_path}: no valid point ({len(bad)} bad rows{': ' + detail if detail else ''})")

    t0 = time.perf_counter()
    atomic_write(out, write)
    wall = time.perf_counter() - t0
    progress.step(0, final=True)
    return {"out": str(Path(out).resolve()), "n_rows": progress.rows, "n_bad": len(bad),
            "bad_rows": bad[:MAX_REPORTED_BAD_ROWS], "dims": {"loc_emb": e}, "wall_s": round(wall, 3),
            "samples_per_s": round(progress.rows / max(wall, 1e-9), 2), "checkpoint": loaded.checkpoint,
            "step": loaded.step}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m gair_model.embed`` argument parser (sub-commands ``shards`` and ``points``)."""
    parser = argparse.ArgumentParser(prog="python -m gair_model.embed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True,
                        help="training run folder, checkpoints/ folder, latest.json or .safetensors file")
    common.add_argument("--out", required=True, help="output GeoParquet file")
    common.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    common.add_argument("--log-every", type=int, default=10, help="batches between progress lines")
    sh = sub.add_parser("shards", parents=[common], help="embed every sample of shard sets")
    sh.add_argument("--shards", nargs="+", required=True, help="shard-set folders, globs, brace patterns or files")
    sh.add_argument("--splits", nargs="+", default=None, help="keep only these splits ('none' or absent: all)")
    sh.add_argument("--batch-size", type=int, default=64)
    sh.add_argument("--max-samples", type=int, default=None)
    pt = sub.add_parser("points", parents=[common], help="embed the locations of a CSV of points")
    pt.add_argument("--csv", required=True, help="CSV file with a header row")
    pt.add_argument("--lon-col", default="lon")
    pt.add_argument("--lat-col", default="lat")
    pt.add_argument("--batch-size", type=int, default=4096)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point (also callable in-process); prints and returns the export summary."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_trained(args.checkpoint, device=device)
    if args.command == "shards":
        splits = None if not args.splits or [s.lower() for s in args.splits] == ["none"] else args.splits
        result = export_shard_embeddings(loaded, args.shards, args.out, splits=splits, batch_size=args.batch_size,
                                         max_samples=args.max_samples, log_every=args.log_every)
    else:
        result = export_point_embeddings(loaded, args.csv, args.out, lon_col=args.lon_col, lat_col=args.lat_col,
                                         batch_size=args.batch_size, log_every=args.log_every)
    print(json.dumps(result, default=str), flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exn:
        logger.error("%s", exn)
        sys.exit(2)
