"""Checkpoints: model weights as safetensors plus a separate training-state file, both written atomically.

Layout under ``<out_dir>/checkpoints/``::

    step_00000100.safetensors     # model state dict (weights and buffers), loadable without pickle
    step_00000100.state.pt        # optimizer, scheduler, step, RNG states, coordinate queue, config
    latest.json                   # {"step": 100, "model": "...safetensors", "state": "...state.pt"}

Every file is written to a temporary name in the same folder and ``os.replace``-d into place; ``latest.json`` is
written last, so it only ever points at a complete pair. The state file holds only tensors and plain Python
containers and is read back with ``torch.load(weights_only=True)``.

Object storage: :func:`publish_checkpoint` uploads a checkpoint's weights with the run's ``config.json`` and
``summary.json`` under a URL prefix and ``checkpoint.json`` (names, sizes, sha256) last, the commit marker
(:func:`gair_dataset.object_store.publish_files`); :func:`fetch_checkpoint` downloads and verifies them into a
local cache laid out as a run folder (``config.json``, ``checkpoints/step_XXXXXXXX.safetensors``).

Training state on object storage (a pod whose disk does not outlive it): :func:`publish_train_state` uploads each
checkpoint's weights, training state and ``metrics.csv`` to ``<prefix>/state/step_XXXXXXXX/`` with ``state.json``
last, then removes older steps; :func:`fetch_train_state` downloads the newest complete one into a run's
``checkpoints/`` folder, so that ``--resume auto`` continues there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gair_dataset import atomic, object_store

log = logging.getLogger(__name__)

LATEST = "latest.json"
PUBLISHED_MARKER = "checkpoint.json"
"""Commit marker of a published checkpoint (written last; without it the prefix holds no checkpoint)."""
PUBLISHED_RUN_FILES = ("config.json", "summary.json")
"""Run files published with the weights when present (evaluation reads the train configuration)."""
_STEP_RE = re.compile(r"^step_(\d{8})\.safetensors$")
STATE_FOLDER = "state"
"""Sub-prefix of a ``--publish-to`` URL that holds the published training states, one folder per step."""
STATE_MARKER = "state.json"
"""Commit marker of a published training state (written last)."""
STATE_RUN_FILES = ("metrics.csv", "val_metrics.csv")
"""Run files published with a training state (a resumed run keeps the metrics of the steps before it)."""
_STATE_DIR_RE = re.compile(r"^step_(\d{8})$")


def atomic_write(path: str | Path, writer: Callable[[str], None]) -> Path:
    """Write a file atomically and durably: :func:`gair_dataset.atomic.atomic_write` with ``fsync=True``."""
    return atomic.atomic_write(path, writer, fsync=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically (and durably) write a text file."""
    return atomic.atomic_write_text(path, text, fsync=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP / compiled wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = cast(nn.Module, getattr(model, "module", None) or model._orig_mod)
    return model


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically save a model's state dict (parameters and buffers) as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata or {}))


def load_model(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a safetensors state dict saved by :func:`save_model` into ``model``."""
    state = load_file(str(path), device="cpu")
    unwrap(model).load_state_dict(state, strict=strict)
    return model


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when available) RNG states as tensors / plain containers."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # only a non-MT19937 global generator gives a dict
        raise TypeError(f"unexpected NumPy global RNG state: {type(np_state).__name__}")
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(ckpt_dir: str | Path, step: int) -> tuple[Path, Path]:
    """``(model_path, state_path)`` of the checkpoint at ``step``."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir / f"step_{step:08d}.safetensors", ckpt_dir / f"step_{step:08d}.state.pt"


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: nn.Module,
    train_state: dict[str, Any],
    *,
    keep: int = 2,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write model + training state for ``step`` atomically, update ``latest.json``, prune old checkpoints.

    Args:
        ckpt_dir: Checkpoint folder.
        step: Optimiser step count.
        model: Model (DDP wrapper fine).
        train_state: Optimizer/scheduler/RNG/queue/... state (tensors and plain containers only).
        keep: Number of most recent checkpoints to keep (0 or less keeps all).
        metadata: String metadata stored in the safetensors header.

    Returns:
        The ``latest.json`` record ``{"step", "model", "state"}`` (absolute paths).
    """
    ckpt_dir = Path(ckpt_dir)
    model_path, state_path = checkpoint_paths(ckpt_dir, step)
    save_model(model, model_path, metadata)
    atomic_write(state_path, lambda tmp: torch.save({**train_state, "step": step}, tmp))
    record = _record(ckpt_dir, step)
    atomic_write_text(ckpt_dir / LATEST, json.dumps(record, indent=2))
    for old in _to_prune(sorted(s for s in list_checkpoints(ckpt_dir) if s != step), keep):
        for p in checkpoint_paths(ckpt_dir, old):
            p.unlink(missing_ok=True)
    return record


def _record(ckpt_dir: Path, step: int) -> dict[str, Any]:
    """The ``latest.json`` record of the checkpoint at ``step`` (absolute paths)."""
    model_path, state_path = checkpoint_paths(ckpt_dir, step)
    return {"step": step, "model": str(model_path.resolve()), "state": str(state_path.resolve())}


def _to_prune(others: list[int], keep: int) -> list[int]:
    """Of the ascending ``others`` (steps besides the one just saved), those beyond the newest ``keep - 1``."""
    return others[: max(0, len(others) - (keep - 1))] if keep > 0 else []


def list_checkpoints(ckpt_dir: str | Path) -> list[int]:
    """Steps that have both a model and a state file, ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and checkpoint_paths(ckpt_dir, int(m.group(1)))[1].exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def remove_checkpoints(ckpt_dir: str | Path) -> int:
    """Delete every checkpoint pair and ``latest.json`` in ``ckpt_dir``; returns the number of steps removed."""
    ckpt_dir = Path(ckpt_dir)
    steps = list_checkpoints(ckpt_dir)
    (ckpt_dir / LATEST).unlink(missing_ok=True)
    for step in steps:
        for p in checkpoint_paths(ckpt_dir, step):
            p.unlink(missing_ok=True)
    return len(steps)


def find_latest(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The newest complete checkpoint record (from ``latest.json``, else by scanning), or ``None``."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if latest.exists():
        try:
            rec = json.loads(latest.read_text())
            if Path(rec["model"]).exists() and Path(rec["state"]).exists():
                return rec
        except (ValueError, KeyError):
            pass
    steps = list_checkpoints(ckpt_dir)
    return _record(ckpt_dir, steps[-1]) if steps else None


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read a training-state file (``torch.load(weights_only=True)``, never unpickles arbitrary objects)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish_checkpoint(model_path: str | Path, url: str, *,
                       run_dir: str | Path | None = None) -> object_store.PublishResult:
    """Publish a checkpoint's weights (and the run's ``config.json``/``summary.json``) to ``url``, marker last.

    Args:
        model_path: The ``step_XXXXXXXX.safetensors`` file (its header carries the model configuration).
        url: Destination prefix (``s3://bucket/runs/<name>/``, any fsspec URL); credentials from the environment.
        run_dir: The training run folder whose run files are published too (default: the checkpoint's run).

    Returns:
        What was uploaded; weights of an earlier publish to the same prefix are removed after the marker.
    """
    model_path = Path(model_path)
    if run_dir is None and model_path.parent.name == "checkpoints":
        run_dir = model_path.parent.parent
    files = {model_path.name: model_path}
    if run_dir is not None:
        files.update({name: Path(run_dir) / name for name in PUBLISHED_RUN_FILES if (Path(run_dir) / name).is_file()})
    m = _STEP_RE.match(model_path.name)
    doc = {"format_version": 1, "model": model_path.name, "step": int(m.group(1)) if m else None,
           "files": {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()}}
    marker = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    return object_store.publish_files(files, url, marker=PUBLISHED_MARKER, marker_bytes=marker,
                                      stale_suffix=".safetensors")


def default_cache_dir() -> Path:
    """Where :func:`fetch_checkpoint` keeps downloads: ``$XDG_CACHE_HOME/gair/checkpoints`` (``~/.cache`` default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gair" / "checkpoints"


def fetch_checkpoint(url: str, cache_dir: str | Path | None = None) -> Path:
    """Download the checkpoint published at ``url`` (:func:`publish_checkpoint`) and return its local weights.

    The files land in ``<cache_dir>/<marker digest>/`` as a run folder (``config.json``, ``summary.json``,
    ``checkpoints/<weights>``); files already there with the published sha256 are not downloaded again.

    Raises:
        FileNotFoundError: No ``checkpoint.json`` at ``url`` (nothing published, or the publish did not finish).
        gair_dataset.object_store.ObjectStoreError: A download failed or does not match its sha256.
    """
    try:
        marker = object_store.read_bytes(object_store.join(url, PUBLISHED_MARKER))
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint published at {object_store.public_url(url)}: no "
                                f"{PUBLISHED_MARKER}") from None
    doc = json.loads(marker)
    dest = Path(cache_dir or default_cache_dir()) / hashlib.sha256(marker).hexdigest()[:16]
    model_name = str(doc["model"])
    for name, info in doc["files"].items():
        local = dest / "checkpoints" / name if name == model_name else dest / name
        _download_verified(url, name, str(info["sha256"]), local, PUBLISHED_MARKER)
    return dest / "checkpoints" / model_name


def _download_verified(url: str, name: str, sha256: str, local: Path, marker: str) -> None:
    """Download object ``name`` of the prefix ``url`` to ``local`` unless it is there already with ``sha256``."""
    if name != Path(name).name or name in ("", ".", ".."):
        raise object_store.ObjectStoreError(f"{object_store.public_url(url)}: bad file name {name!r} in {marker}")
    if local.is_file() and _sha256(local) == sha256:
        return
    object_store.download_file(object_store.join(url, name), local)
    if _sha256(local) != sha256:
        local.unlink(missing_ok=True)
        raise object_store.ObjectStoreError(f"{object_store.public_url(object_store.join(url, name))}: sha256 "
                                            f"differs from {marker} (republished meanwhile?)")


def state_url(url: str, step: int) -> str:
    """The prefix of the training state of ``step`` published under the run prefix ``url``."""
    return object_store.join(object_store.join(url, STATE_FOLDER), f"step_{step:08d}")


def published_state_steps(url: str) -> list[int]:
    """Steps with a training-state folder under the run prefix ``url`` (complete or not), ascending."""
    names = object_store.list_names(object_store.join(url, STATE_FOLDER))
    return sorted(int(m.group(1)) for m in map(_STATE_DIR_RE.match, names) if m)


def publish_train_state(record: dict[str, Any], url: str, *, run_dir: str | Path | None = None,
                        keep: int = 2) -> object_store.PublishResult:
    """Publish a checkpoint's weights and training state to ``<url>/state/step_XXXXXXXX/``, ``state.json`` last.

    Once the new state is complete, the other step folders go (each its ``state.json`` first, so that an interrupted
    removal never leaves a marker without its files), but the newest ``keep - 1`` complete ones below this step:
    a reader always finds a complete state, and never one of a later step that this run did not reach (a state cut
    short, or one of an abandoned run that got further).

    Args:
        record: A :func:`save_checkpoint` record (``step``, ``model``, ``state``).
        url: The run's prefix (``--publish-to``); credentials from the environment.
        run_dir: The run folder whose :data:`STATE_RUN_FILES` go along (those present).
        keep: Published states kept, this one included (0 or less keeps every earlier complete one).

    Returns:
        What was uploaded for this step.

    Raises:
        gair_dataset.object_store.ObjectStoreError: The upload failed (this step is then left without a marker).
    """
    step = int(record["step"])
    model_path, state_path = Path(record["model"]), Path(record["state"])
    files = {model_path.name: model_path, state_path.name: state_path}
    if run_dir is not None:
        files.update({n: Path(run_dir) / n for n in STATE_RUN_FILES if (Path(run_dir) / n).is_file()})
    doc = {"format_version": 1, "step": step, "model": model_path.name, "state": state_path.name,
           "files": {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()}}
    result = object_store.publish_files(files, state_url(url, step), marker=STATE_MARKER,
                                        marker_bytes=(json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    others = [s for s in published_state_steps(url) if s != step]
    complete_below = [s for s in others
                      if s < step and object_store.exists(object_store.join(state_url(url, s), STATE_MARKER))]
    kept = set(complete_below) - set(_to_prune(complete_below, keep))
    for other in others:
        if other not in kept:
            remove_published_state(url, other)
    return result


def remove_published_state(url: str, step: int) -> None:
    """Delete the training state of ``step`` published under ``url``: its ``state.json`` first, then the rest."""
    object_store.remove_prefix(state_url(url, step), marker=STATE_MARKER)


def remove_published_states(url: str) -> None:
    """Delete every training state published under the run prefix ``url`` (a run started over)."""
    for step in published_state_steps(url):
        remove_published_state(url, step)


def fetch_train_state(url: str, ckpt_dir: str | Path, *, run_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Download the newest complete training state published under ``url`` into ``ckpt_dir``.

    A step whose ``state.json`` is missing (a publish cut short), unreadable, or names files that are missing is
    passed over, with a warning, for the one before it. ``state.json`` may name only the step's own weights and
    state and :data:`STATE_RUN_FILES`; the run files go to ``run_dir`` (when given) unless one is there already.
    ``latest.json`` is written last.

    Returns:
        The ``latest.json`` record (``step``, ``model``, ``state``), or ``None`` when nothing complete is published.

    Raises:
        gair_dataset.object_store.ObjectStoreError: ``state.json`` names another file, a download failed, or a file
            does not match its sha256.
    """
    ckpt_dir = Path(ckpt_dir)
    for step in reversed(published_state_steps(url)):
        prefix = state_url(url, step)
        model_path, state_path = checkpoint_paths(ckpt_dir, step)
        try:
            doc = json.loads(object_store.read_bytes(object_store.join(prefix, STATE_MARKER)))
            files = {str(name): str(info["sha256"]) for name, info in doc["files"].items()}
            names = (str(doc["model"]), str(doc["state"]), int(doc["step"]))
        except FileNotFoundError:
            continue  # no marker: the publish did not finish
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s: unreadable %s (%s): passed over", object_store.public_url(prefix), STATE_MARKER, exc)
            continue
        allowed = {model_path.name, state_path.name, *STATE_RUN_FILES}
        if names != (model_path.name, state_path.name, step) or not set(names[:2]) <= set(files) <= allowed:
            raise object_store.ObjectStoreError(
                f"{object_store.public_url(prefix)}: bad file name(s) in {STATE_MARKER}: it must name "
                f"{model_path.name} and {state_path.name} of step {step}, besides only {list(STATE_RUN_FILES)}; "
                f"it names {sorted(files)} (step {names[2]})")
        targets = {model_path.name: model_path, state_path.name: state_path}
        try:
            for name, sha256 in files.items():
                local = targets.get(name) or (Path(run_dir) / name if run_dir is not None else None)
                if local is None or (name in STATE_RUN_FILES and local.exists()):
                    continue  # the run's own metrics win over the published ones
                _download_verified(prefix, name, sha256, local, STATE_MARKER)
        except FileNotFoundError as exc:
            log.warning("%s: %s: passed over", object_store.public_url(prefix), exc)
            continue
        record = _record(ckpt_dir, step)
        atomic_write_text(ckpt_dir / LATEST, json.dumps(record, indent=2))
        return record
    return None
