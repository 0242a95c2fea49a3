"""Downstream-task registry: tasks are declared in a YAML file, so a task is added without code changes.

The bundled registry is ``config/eval_tasks.yaml`` (:func:`default_tasks_path`); any other YAML file with the
same schema can be passed to :func:`load_task_specs`. Paths in the file are relative to an *eval data root*
chosen by the caller. Schema (one entry of the top-level ``tasks`` list)::

    - name: air_temperature          # unique identifier (letters, digits, _ . -)
      kind: location                 # location | image_table | image_folder
      encoder: location              # location | sv | rs   (location kind -> location; image kinds -> sv or rs)
      type: regression               # regression | classification
      path: location/air_temperature_stations.csv   # CSV (location, image_table) or folder (image_folder)
      columns: {lon: Lon, lat: Lat, target: meanT}  # location: lon, lat, target (all required)
                                                   # image_table: image, target (required), lon, lat (optional)
                                                   # image_folder: no columns (class = sub-folder name)
      image_dir: streetview/place_pulse_1/images320  # image_table only, optional (default: the CSV's folder)
      sep: ","                       # optional CSV separator (default ",")
      max_samples: 5000              # optional: deterministic subsample (seed 42) when the set is larger
      description: free text         # optional

A malformed entry (missing or unknown key, unknown kind / encoder / type, a column absent from the CSV header)
raises :class:`TaskConfigError` (a ``ValueError``) naming the task. Absent data is *not* malformed:
:func:`load_task_data` raises :class:`TaskDataMissing` naming the missing path, which the runner reports as a
skipped task.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

KINDS = ("location", "image_table", "image_folder")
ENCODERS = ("location", "sv", "rs")
TASK_TYPES = ("regression", "classification")
#: Family of each encoder: tasks are grouped (and selected) by family.
ENCODER_FAMILY = {"location": "location", "sv": "streetview", "rs": "remote_sensing"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
SUBSAMPLE_SEED = 42

_REQUIRED = ("name", "kind", "encoder", "type", "path")
_OPTIONAL = ("columns", "image_dir", "sep", "max_samples", "description")
_COLUMNS = {
    "location": ({"lon", "lat", "target"}, set()),
    "image_table": ({"image", "target"}, {"lon", "lat"}),
    "image_folder": (set(), set()),
}
_KIND_ENCODERS = {"location": ("location",), "image_table": ("sv", "rs"), "image_folder": ("sv", "rs")}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class TaskConfigError(ValueError):
    """A task entry is malformed (the message names the task and the problem)."""


class TaskDataMissing(FileNotFoundError):
    """A task's data file or folder is absent under the data root (the message names the path)."""

    def __init__(self, task: str, path: Path) -> None:
        super().__init__(f"task {task!r}: data not found: {path}")
        self.task = task
        self.path = path


@dataclass(frozen=True)
class TaskSpec:
    """One validated task entry.

    Attributes:
        name: Unique task name.
        kind: ``location``, ``image_table`` or ``image_folder``.
        encoder: ``location``, ``sv`` or ``rs``.
        type: ``regression`` or ``classification``.
        path: CSV file or image folder, relative to the data root.
        columns: Role (``lon``, ``lat``, ``target``, ``image``) -> CSV column name.
        image_dir: Image folder of an ``image_table``, relative to the data root (``None``: the CSV's folder).
        sep: CSV separator.
        max_samples: Subsample size (deterministic, seed 42) or ``None``.
        description: Free text.
    """

    name: str
    kind: str
    encoder: str
    type: str
    path: str
    columns: dict[str, str] = field(default_factory=dict)
    image_dir: str | None = None
    sep: str = ","
    max_samples: int | None = None
    description: str = ""

    @property
    def family(self) -> str:
        """``location``, ``streetview`` or ``remote_sensing``."""
        return ENCODER_FAMILY[self.encoder]

    @property
    def target_name(self) -> str:
        """What is predicted: the target column, or ``class (sub-folder)`` for an image folder."""
        return self.columns.get("target", "class (sub-folder)")


@dataclass
class TaskData:
    """The rows of a task that can be used, with their targets.

    Attributes:
        spec: The task.
        targets: ``N`` targets (float64 for regression, ``str`` labels for classification).
        lonlat: ``N x 2`` (lon, lat) degrees, or ``None``.
        image_paths: ``N`` image files, or ``None`` for a location task.
        n_rows: Rows (or image files) found before any filtering.
        n_skipped_inputs: Rows dropped because an input is unusable (image file missing, coordinates missing or
            out of range); unreadable images are counted later, at decoding.
        n_missing_target: Rows dropped because the target is missing.
        notes: Human-readable remarks (what was skipped, subsampling).
    """

    spec: TaskSpec
    targets: np.ndarray
    lonlat: np.ndarray | None
    image_paths: list[Path] | None
    n_rows: int
    n_skipped_inputs: int = 0
    n_missing_target: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)


def default_tasks_path() -> Path:
    """The bundled registry: ``config/eval_tasks.yaml`` of the checkout, package data in an installed wheel.

    A wheel carries it as ``gair_model/eval/config/eval_tasks.yaml`` (``[tool.setuptools.package-dir]`` in
    ``pyproject.toml``), found with :mod:`importlib.resources`; a checkout (editable install) has no such folder
    and reads the top-level ``config/`` beside the package.
    """
    packaged = Path(str(resources.files("gair_model.eval"))) / "config" / "eval_tasks.yaml"
    return packaged if packaged.is_file() else Path(__file__).resolve().parents[2] / "config" / "eval_tasks.yaml"


def _fail(task: str, problem: str) -> TaskConfigError:
    return TaskConfigError(f"eval task {task!r}: {problem}")


def _choice(name: str, entry: dict[str, Any], key: str, allowed: Iterable[str]) -> str:
    value = entry[key]
    if value not in allowed:
        raise _fail(name, f"unknown {key} {value!r}; choose from {tuple(allowed)}")
    return value


def _relative_path(name: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(name, f"{key!r} must be a non-empty path string, got {value!r}")
    if Path(value).is_absolute():
        raise _fail(name, f"{key!r} must be relative to the eval data root, got {value!r}")
    return value


def parse_task(entry: Any, index: int = 0) -> TaskSpec:
    """Validate one registry entry.

    Args:
        entry: The mapping read from YAML.
        index: Position in the ``tasks`` list (named in errors when the entry has no name).

    Returns:
        The task.

    Raises:
        TaskConfigError: The entry is malformed (the message names the task).
    """
    if not isinstance(entry, dict):
        raise _fail(f"#{index}", f"entry must be a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _fail(f"#{index}" if name is None else str(name), "'name' must be a string of letters, digits, _ . -")
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise _fail(name, f"missing key(s) {missing}")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _fail(name, f"unknown key(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}")
    kind = _choice(name, entry, "kind", KINDS)
    encoder = _choice(name, entry, "encoder", ENCODERS)
    task_type = _choice(name, entry, "type", TASK_TYPES)
    if encoder not in _KIND_ENCODERS[kind]:
        raise _fail(name, f"encoder {encoder!r} does not apply to kind {kind!r}; use one of {_KIND_ENCODERS[kind]}")
    path = _relative_path(name, "path", entry["path"])
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) and v for v in columns.values()):
        raise _fail(name, f"'columns' must map roles to column names, got {columns!r}")
    required, optional = _COLUMNS[kind]
    if required - set(columns):
        raise _fail(name, f"columns missing role(s) {sorted(required - set(columns))} for kind {kind!r}")
    if set(columns) - required - optional:
        raise _fail(name, f"unknown column role(s) {sorted(set(columns) - required - optional)} for kind {kind!r}; "
                          f"allowed: {sorted(required | optional)}")
    if kind == "image_table" and ("lon" in columns) != ("lat" in columns):
        raise _fail(name, "give both 'lon' and 'lat' columns or neither")
    image_dir = entry.get("image_dir")
    if image_dir is not None:
        if kind != "image_table":
            raise _fail(name, f"'image_dir' applies to kind 'image_table' only, not {kind!r}")
        image_dir = _relative_path(name, "image_dir", image_dir)
    sep = entry.get("sep", ",")
    if not isinstance(sep, str) or not sep:
        raise _fail(name, f"'sep' must be a non-empty string, got {sep!r}")
    max_samples = entry.get("max_samples")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise _fail(name, f"'max_samples' must be a positive integer, got {max_samples!r}")
    description = entry.get("description", "")
    return TaskSpec(name, kind, encoder, task_type, path, dict(columns), image_dir, sep, max_samples,
                    str(description))


def load_task_specs(path: str | Path | None = None) -> list[TaskSpec]:
    """Read and validate a task registry.

    Args:
        path: YAML file (default: :func:`default_tasks_path`). A caller can honour an environment override
            such as ``GAIR_EVAL_TASKS`` by passing its value.

    Returns:
        The tasks, in file order.

    Raises:
        FileNotFoundError: The YAML file does not exist.
        TaskConfigError: The file or an entry is malformed, or two tasks share a name.
    """
    path = Path(path) if path is not None else default_tasks_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exn:
        raise TaskConfigError(f"{path}: not valid YAML ({exn})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise TaskConfigError(f"{path}: expected a mapping with a 'tasks' list")
    specs = [parse_task(entry, i) for i, entry in enumerate(doc["tasks"])]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise _fail(spec.name, f"duplicate task name in {path}")
        seen.add(spec.name)
    return specs


def missing_data(spec: TaskSpec, data_root: str | Path) -> Path | None:
    """The first absent data path of a task (CSV, image folder), or ``None`` when everything is there."""
    root = Path(data_root)
    main = root / spec.path
    if spec.kind == "image_folder":
        return None if main.is_dir() else main
    if not main.is_file():
        return main
    if spec.kind == "image_table":
        image_dir = root / spec.image_dir if spec.image_dir else main.parent
        if not image_dir.is_dir():
            return image_dir
    return None


def _read_table(spec: TaskSpec, csv_path: Path) -> pd.DataFrame:
    """Read the CSV (BOM tolerated) and check that every configured column exists."""
    try:
        df = pd.read_csv(csv_path, sep=spec.sep, encoding="utf-8-sig", low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exn:
        raise _fail(spec.name, f"cannot read {csv_path} with sep={spec.sep!r}: {exn}") from None
    absent = {role: col for role, col in spec.columns.items() if col not in df.columns}
    if absent:
        raise _fail(spec.name, f"column(s) {absent} not in {csv_path.name} (columns: {list(df.columns)})")
    return df


def check_task(spec: TaskSpec, data_root: str | Path) -> Path | None:
    """Pre-flight check: the absent path (task to skip), or ``None``; a bad column raises at once.

    Reads only the CSV header, so a whole registry can be checked before any long computation.

    Raises:
        TaskConfigError: A configured column is not in the CSV header.
    """
    absent = missing_data(spec, data_root)
    if absent is not None or spec.kind == "image_folder":
        return absent
    csv_path = Path(data_root) / spec.path
    try:
        header = pd.read_csv(csv_path, sep=spec.sep, encoding="utf-8-sig", nrows=0).columns
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exn:
        raise _fail(spec.name, f"cannot read {csv_path} with sep={spec.sep!r}: {exn}") from None
    absent_cols = {role: col for role, col in spec.columns.items() if col not in header}
    if absent_cols:
        raise _fail(spec.name, f"column(s) {absent_cols} not in {csv_path.name} (columns: {list(header)})")
    return None


def _targets(spec: TaskSpec, values: pd.Series) -> np.ndarray:
    if spec.type == "regression":
        numeric = pd.to_numeric(values, errors="coerce")
        bad = numeric.isna() & values.notna()
        if bad.any():
            raise _fail(spec.name, f"regression target {spec.target_name!r} has non-numeric values, "
                                   f"e.g. {values[bad].iloc[0]!r}")
        return numeric.to_numpy(np.float64)
    return values.astype(object).where(values.notna(), None).to_numpy()


def _lonlat(spec: TaskSpec, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``N x 2`` (lon, lat) and a mask of valid rows (finite, |lon| <= 180, |lat| <= 90)."""
    lon = pd.to_numeric(df[spec.columns["lon"]], errors="coerce").to_numpy(np.float64)
    lat = pd.to_numeric(df[spec.columns["lat"]], errors="coerce").to_numpy(np.float64)
    lonlat = np.stack([lon, lat], axis=1)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(lonlat).all(axis=1) & (np.abs(lon) <= 180) & (np.abs(lat) <= 90)
    return lonlat, ok


def _subsample(n: int, max_samples: int | None) -> np.ndarray:
    """Indices of a deterministic (seed 42) subsample in original order, or all rows."""
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    rng = np.random.default_rng(SUBSAMPLE_SEED)
    return np.sort(rng.choice(n, size=max_samples, replace=False))


def _image_folder(spec: TaskSpec, folder: Path) -> tuple[list[Path], list[str], list[str]]:
    paths: list[Path] = []
    labels: list[str] = []
    notes: list[str] = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            notes.append(f"class folder {class_dir.name!r} has no images")
        paths += files
        labels += [class_dir.name] * len(files)
    return paths, labels, notes


def load_task_data(spec: TaskSpec, data_root: str | Path, *,
                   log: Callable[[str], None] | None = None) -> TaskData:
    """Read a task's rows: targets, coordinates and image paths, without decoding any image.

    Rows with a missing target, unusable coordinates (location tasks) or a missing image file are dropped and
    counted; then ``max_samples`` applies.

    Args:
        spec: The task.
        data_root: Folder the task's paths are relative to.
        log: Progress callback.

    Returns:
        The usable rows.

    Raises:
        TaskDataMissing: The CSV or image folder is absent.
        TaskConfigError: A configured column is not in the CSV, or a regression target is not numeric.
    """
    root = Path(data_root)
    absent = missing_data(spec, root)
    if absent is not None:
        raise TaskDataMissing(spec.name, absent)
    notes: list[str] = []
    lonlat: np.ndarray | None = None
    paths: list[Path] | None = None
    n_skipped = 0
    if spec.kind == "image_folder":
        paths, labels, notes = _image_folder(spec, root / spec.path)
        targets = np.asarray(labels, dtype=object)
        n_rows = len(paths)
        keep = np.ones(n_rows, dtype=bool)
    else:
        df = _read_table(spec, root / spec.path)
        n_rows = len(df)
        targets = _targets(spec, df[spec.columns["target"]])
        keep = np.ones(n_rows, dtype=bool)
        if "lon" in spec.columns:
            lonlat, ok = _lonlat(spec, df)
            if spec.kind == "location":
                if (~ok).any():
                    notes.append(f"{int((~ok).sum())} row(s) without valid lon/lat skipped")
                n_skipped += int((~ok).sum())
                keep &= ok
        if spec.kind == "image_table":
            image_dir = root / spec.image_dir if spec.image_dir else (root / spec.path).parent
            names = df[spec.columns["image"]]
            paths = [image_dir / str(v) if pd.notna(v) else image_dir / "" for v in names]
            exists = np.array([pd.notna(v) and p.is_file() for v, p in zip(names, paths, strict=True)], dtype=bool)
            n_missing = int((keep & ~exists).sum())
            if n_missing:
                first = next(p for p, e, k in zip(paths, exists, keep, strict=True) if k and not e)
                notes.append(f"{n_missing} row(s) reference a missing image file (e.g. {first}) and were skipped")
            n_skipped += n_missing
            keep &= exists
    has_target = ~np.asarray(pd.isna(pd.Series(targets, dtype=object)), dtype=bool)
    n_missing_target = int((keep & ~has_target).sum())
    if n_missing_target:
        notes.append(f"{n_missing_target} row(s) without a target dropped")
    keep &= has_target
    idx = np.flatnonzero(keep)
    sub = _subsample(len(idx), spec.max_samples)
    if len(sub) < len(idx):
        notes.append(f"subsampled {len(sub)} of {len(idx)} rows (seed {SUBSAMPLE_SEED})")
    idx = idx[sub]
    targets = targets[idx]
    if spec.type == "classification":
        targets = targets.astype(str)
    data = TaskData(
        spec=spec,
        targets=targets,
        lonlat=lonlat[idx] if lonlat is not None else None,
        image_paths=[paths[i] for i in idx] if paths is not None else None,
        n_rows=n_rows,
        n_skipped_inputs=n_skipped,
        n_missing_target=n_missing_target,
        notes=notes,
    )
    if log:
        log(f"[{spec.name}] {len(data)} usable of {n_rows} rows" + (f" ({'; '.join(notes)})" if notes else ""))
    return data
