"""The trainer, in-process (single process, CPU): outputs, config parsing, time budget and exact resume."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from gair_model.train import METRICS_PREFIX, SUMMARY_PREFIX, main, parse_config
from tests.synthetic_shards import write_synthetic_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("gair_shards")
    write_synthetic_shards(out, 16, rs_size=32, sv_size=32, samples_per_shard=8, seed=0)
    return out


def _args(shards, out_dir, *extra):
    return [
        "--shards", str(shards),
        "--out-dir", str(out_dir),
        "--rs-img-size", "32", "--sv-img-size", "32",
        "--batch-size", "4",
        "--queue-size", "16",
        "--lr", "2e-4",
        "--warmup-steps", "1",
        "--threads", "1",
        "--shuffle-buffer", "32",
        "--save-every", "0",
        "--val-every", "0",
        *extra,
    ]  # fmt: skip


def test_train_outputs(shards, tmp_path, capsys):
    out = tmp_path / "run"
    summary = main(_args(shards, out, "--steps", "4", "--log-every", "2", "--splits", "none",
                                  "--allow-test-split", "true"))
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["world_size"] == 1 and summary["effective_batch"] == 4 and summary["ranks_in_sync"]
    assert summary["steps_per_epoch"] == 4  # 16 samples in shards.json / 4 per step
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(METRICS_PREFIX)]
    metrics = [json.loads(ln[len(METRICS_PREFIX) :]) for ln in lines]
    assert [m["step"] for m in metrics] == [1, 2, 4]
    for m in metrics:
        assert {"loss", "sv_rs", "rs_sv", "sv_loc", "rs_loc", "lr", "samples_per_s", "queue_filled"} <= set(m)
        assert m["queue_filled"] == 16  # pre-filled with real coordinates before step 1
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["final_loss"] == pytest.approx(summary["final_loss"])
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert (out / "config.json").exists()
    weights = load_file(summary["checkpoint"])
    assert "localizer.decoder.weight" in weights and "location_encoder.rff.0.freqs" in weights
    state = torch.load(summary["train_state"], weights_only=True)
    assert state["step"] == 4 and state["queue"]["count"].item() == 16
    _assert_real_coords(state["queue"]["queue"])
    assert not list(out.rglob("*.tmp"))


def _assert_real_coords(queue: torch.Tensor) -> None:
    """Synthetic shards lie in lon [0, 0.16], lat [-0.1, 0.01]; an unfilled slot would be (0, 0)."""
    lon, lat = queue[:, 0], queue[:, 1]
    assert (lon > 0).all() and (lon < 0.17).all() and (lat > -0.11).all() and (lat < 0.011).all()
    assert not ((lon == 0) & (lat == 0)).any()


@pytest.mark.parametrize("mode", ["loader", "manifest", "csv"])
def test_queue_prefill_modes(shards, tmp_path, mode):
    if mode == "csv":
        path = tmp_path / "coords.csv"
        path.write_text("lon,lat\n0.01,-0.02\n0.05,0.005\n")
        mode = str(path)
    summary = main(_args(shards, tmp_path / "run", "--steps", "1", "--queue-init", mode, "--log-every", "100"))
    queue = torch.load(summary["train_state"], weights_only=True)["queue"]
    assert queue["count"].item() == 16
    _assert_real_coords(queue["queue"])


def test_parse_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"shards": "x/*.tar", "batch-size": 8, "steps": 100, "localizer": "bilinear"}))
    cfg = parse_config(["--config", str(cfg_file), "--steps", "5", "--loc-hidden", "8", "8"])
    assert cfg.shards == ["x/*.tar"] and cfg.batch_size == 8 and cfg.steps == 5
    assert cfg.gair_config().localizer == "bilinear" and cfg.gair_config().loc_hidden == [8, 8]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("shards: [a.tar, b.tar]\npreset: base\nsv_aug: false\n")
    cfg = parse_config(["--config", str(yaml_file), "--rs-img-size", "48"])
    assert cfg.shards == ["a.tar", "b.tar"] and not cfg.sv_aug
    mc = cfg.gair_config()
    assert (mc.rs_arch, mc.rs_img_size, mc.sv_img_size) == ("base", 48, 224)
    with pytest.raises(ValueError):
        parse_config(["--config", str(cfg_file), "--resume-data", "rewind"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"shards": "a", "batchsize": 3}))
    with pytest.raises(ValueError, match="unknown"):
        parse_config(["--config", str(bad)])


def test_time_budget_stop_then_resume_matches_uninterrupted(shards, tmp_path, capsys):
    # skip: the resumed run replays the data stream, so it must end exactly where the uninterrupted one does.
    common = ("--steps", "6", "--accum-steps", "2", "--batch-size", "2", "--log-every", "100", "--resume-data", "skip")
    full = main(_args(shards, tmp_path / "full", *common))
    stopped = main(_args(shards, tmp_path / "split", *common, "--max-minutes", "1e-9"))
    assert stopped["status"] == "time_budget" and stopped["steps"] == 1
    resumed = main(_args(shards, tmp_path / "split", *common, "--resume", "auto"))
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 1 and resumed["steps"] == 6
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5, abs=1e-6)
    a, b = load_file(full["checkpoint"]), load_file(resumed["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    with open(tmp_path / "split" / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5, 6]
    summaries = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(SUMMARY_PREFIX)]
    assert len(summaries) == 3


def test_refuses_to_overwrite_checkpoints_without_resume(shards, tmp_path):
    out = tmp_path / "run"
    main(_args(shards, out, "--steps", "1", "--log-every", "100"))
    with pytest.raises(FileExistsError, match="--resume auto"):
        main(_args(shards, out, "--steps", "2", "--log-every", "100"))
    summary = main(_args(shards, out, "--steps", "2", "--log-every", "100", "--resume", "auto"))
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    summary = main(_args(shards, out, "--steps", "1", "--log-every", "100", "--overwrite", "true"))
    assert summary["resumed_from_step"] is None and summary["steps"] == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000001.safetensors",
        "step_00000001.state.pt",
    ]


def test_several_shard_sets(shards, tmp_path):
    other = tmp_path / "other_set"
    write_synthetic_shards(other, 8, rs_size=32, sv_size=32, samples_per_shard=4, seed=1, name="other")
    summary = main(
        _args(shards, tmp_path / "run", "--steps", "2", "--log-every", "100", "--shards", str(shards), str(other))
    )
    assert summary["steps"] == 2 and summary["steps_per_epoch"] == 6  # (16 + 8) samples / 4 per step
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["n_shards"] == 4 and config["epoch_samples"] == 24


def test_training_refuses_the_test_split(shards, tmp_path):
    for splits in (["none"], ["train", "test"]):
        with pytest.raises(ValueError, match="held out for evaluation"):
            parse_config(_args(shards, tmp_path / "o", "--steps", "1", "--splits", *splits))
    cfg = parse_config(_args(shards, tmp_path / "o", "--steps", "1", "--splits", "none", "--allow-test-split", "true"))
    assert cfg.splits is None and cfg.allow_test_split
    assert parse_config(_args(shards, tmp_path / "o", "--steps", "1")).splits == ["train"]
