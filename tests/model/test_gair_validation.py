"""Validation during training: outputs, fixed batches, no effect on training, the test split held out."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gair_model.loader as loader_mod
from gair_model.losses import CoordinateQueue
from gair_model.models.gair import GAIRModel
from gair_model.train import SUMMARY_PREFIX, main, parse_config
from gair_model.validation import VAL_CSV_FIELDS, VAL_PREFIX, Validator, build_validator
from tests.synthetic_shards import write_synthetic_shards

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """80 samples on 20 tiles: 16 train tiles, 2 val tiles (8 samples), 2 test tiles (8 samples)."""
    out = tmp_path_factory.mktemp("gair_val_shards")
    write_synthetic_shards(out, 80, rs_size=32, sv_size=32, samples_per_shard=16, seed=0)
    return out


def _args(shards, out_dir, *extra):
    return [
        "--shards", str(shards), "--out-dir", str(out_dir),
        "--rs-img-size", "32", "--sv-img-size", "32", "--batch-size", "4", "--queue-size", "16",
        "--lr", "2e-4", "--warmup-steps", "1", "--threads", "1", "--shuffle-buffer", "32",
        "--save-every", "0", "--log-every", "100", "--device", "cpu",
        *extra,
    ]  # fmt: skip


def _prefixed(out: str, prefix: str) -> list[dict]:
    return [json.loads(ln[len(prefix):]) for ln in out.splitlines() if ln.startswith(prefix)]


def test_validation_outputs_and_training_unchanged(shards, tmp_path, capsys):
    plain = main(_args(shards, tmp_path / "plain", "--steps", "4", "--val-every", "0"))
    capsys.readouterr()
    run = tmp_path / "val"
    summary = main(_args(shards, run, "--steps", "4", "--val-every", "2", "--val-batches", "3"))
    out = capsys.readouterr().out

    # Validation changes nothing in training: same losses, same weights, bit for bit.
    assert summary["final_losses"] == plain["final_losses"]
    a, b = load_file(plain["checkpoint"]), load_file(summary["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa = torch.load(plain["train_state"], weights_only=True)["queue"]
    qb = torch.load(summary["train_state"], weights_only=True)["queue"]
    assert torch.equal(qa["queue"], qb["queue"]) and int(qa["ptr"]) == int(qb["ptr"])

    records = _prefixed(out, VAL_PREFIX)
    assert [r["step"] for r in records] == [2, 4]  # every 2 steps; the end (4) is not validated twice
    assert all(r["n_samples"] == 8 for r in records)  # the 8 val samples (2 batches of 4 < --val-batches 3)
    with open(run / "val_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == VAL_CSV_FIELDS and [int(r["step"]) for r in rows] == [2, 4]
    for r in records:
        assert r["val_loss"] == pytest.approx((r["val_sv_rs"] + r["val_rs_sv"] + r["val_sv_loc"] + r["val_rs_loc"]) / 2,
                                              abs=1e-5)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["final_val_loss"] == records[-1]["val_loss"] == summary["final_val_loss"]
    assert set(on_disk["final_val_losses"]) == {"loss", "sv_rs", "rs_sv", "sv_loc", "rs_loc"}
    best = min(records, key=lambda r: r["val_loss"])
    assert (on_disk["best_val_loss"], on_disk["best_val_step"]) == (best["val_loss"], best["step"])
    assert plain["final_val_loss"] is None and not (tmp_path / "plain" / "val_metrics.csv").exists()


def test_validator_uses_fixed_batches_and_leaves_state_alone(shards, tmp_path, capsys):
    cfg = parse_config(_args(shards, tmp_path, "--steps", "1", "--val-every", "1", "--val-batches", "2",
                             "--preset", "tiny"))
    torch.manual_seed(0)
    model = GAIRModel(cfg.gair_config())
    model.train()
    queue = CoordinateQueue(16)
    queue.enqueue(torch.tensor([[0.01, -0.02], [0.05, 0.0], [0.1, -0.05]], dtype=torch.float64), gather=False)
    before = {k: v.clone() for k, v in queue.state_dict().items()}
    from gair_model.loader import resolve_shards

    val = build_validator(cfg, model, queue, resolve_shards(str(shards)), rs_stats=None,
                          device=torch.device("cpu"), out_dir=tmp_path, is_main=True, world_size=1, start_step=0)
    rng = torch.get_rng_state()
    first, second = val.run(1), val.run(2)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(before[k], v) for k, v in queue.state_dict().items())
    assert {k: v for k, v in first.items() if k.startswith("val_")} == \
        {k: v for k, v in second.items() if k.startswith("val_")}
    assert first["n_samples"] == 8
    # Re-read from the shards (no cache): the same samples give the same values.
    val.batches._cache = None
    assert val.run(3)["val_loss"] == first["val_loss"]
    # Fewer batches are a prefix of the same pass; a different queue changes only the location terms.
    short = Validator(model, queue, val.batches.make_loader, every=1, batches=1, device=torch.device("cpu"))
    assert short.run(1)["n_samples"] == 4
    queue.enqueue(torch.rand(8, 2, dtype=torch.float64), gather=False)
    changed = val.run(4)
    assert changed["val_sv_rs"] == first["val_sv_rs"] and changed["val_sv_loc"] != first["val_sv_loc"]


def test_test_split_is_never_read(shards, tmp_path, monkeypatch):
    for bad in (["test"], ["val", "test"], ["none"]):
        with pytest.raises(ValueError, match="held out"):
            parse_config(_args(shards, tmp_path, "--steps", "1", "--val-every", "1", "--val-splits", *bad))
    cfg = parse_config(_args(shards, tmp_path, "--steps", "1", "--val-every", "1", "--val-splits", "test",
                             "--val-allow-test", "true"))
    assert cfg.val_splits == ["test"]
    off = parse_config(_args(shards, tmp_path, "--steps", "1", "--val-every", "0", "--val-splits", "test"))
    assert off.val_every == 0

    # Record the split of every sample the loader decodes during a run with validation.
    seen: list[str] = []
    original = loader_mod._make_decoder

    def spying_decoder(*args, **kwargs):
        stage = original(*args, **kwargs)

        def wrapped(src, rng):
            def tap(it):
                for s in it:
                    seen.append(s["meta"]["split"])
                    yield s

            return stage(tap(src), rng)

        return wrapped

    monkeypatch.setattr(loader_mod, "_make_decoder", spying_decoder)
    main(_args(shards, tmp_path / "run", "--steps", "3", "--val-every", "1", "--queue-init", "loader"))
    assert set(seen) == {"train", "val"}


def test_resume_keeps_earlier_validation_rows(shards, tmp_path):
    common = ("--steps", "4", "--val-every", "2", "--val-batches", "1")
    stopped = main(_args(shards, tmp_path, *common, "--max-minutes", "1e-9"))
    assert stopped["status"] == "time_budget" and stopped["steps"] == 1
    assert stopped["best_val_step"] == 1  # validated at the end of the interrupted run
    resumed = main(_args(shards, tmp_path, *common, "--resume", "auto"))
    with open(tmp_path / "val_metrics.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 4]
    assert resumed["best_val_step"] in (1, 2, 4) and resumed["final_val_loss"] is not None


@pytest.mark.slow
def test_validation_under_ddp(shards, tmp_path):
    """Two gloo ranks: one shard each, sums all-reduced; rank 0 alone writes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gair_model.train", *_args(shards, tmp_path, "--steps", "2", "--val-every", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = _prefixed(proc.stdout, VAL_PREFIX)
    assert [r["step"] for r in records] == [1, 2] and all(r["n_samples"] == 8 for r in records)
    summary = _prefixed(proc.stdout, SUMMARY_PREFIX)
    assert len(summary) == 1 and summary[0]["ranks_in_sync"] and summary[0]["final_val_loss"] == records[-1]["val_loss"]
    with open(tmp_path / "val_metrics.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2]
