"""The one training configuration (presets, flags, --print-config), the shared train step and the resume default."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import gair_model.benchmark as bench
from gair_model.train import main, parse_config
from gair_model.training.config import TRAIN_PRESETS, resolve_config, to_flags
from tests.synthetic_shards import write_synthetic_shards

torch.set_num_threads(1)
README = Path(__file__).resolve().parents[2] / "README.md"

#: The authors' training (DESIGN.md section 2 and their released code), as the `paper` preset must resolve it.
AUTHORS = {"embed_dim": 768, "location_negatives": "queue", "distill_weight": 0.2, "sv_distill_feature": "pooled",
           "rs_resize": "bicubic", "rs_jitter": "three_bands", "rs_jitter_p": 0.7, "sv_resize": "full",
           "wd_rule": "timm", "weight_decay": 0.05, "blr": 1.5e-6, "batch_size": 256, "accum_steps": 96,
           "temperature": 0.07, "queue_size": 4096, "rs_img_size": 96, "rs_patch_size": 8, "sv_img_size": 224,
           "sv_patch_size": 16, "localizer": "nili", "location_encoder": "geoclip"}


def test_print_config_shows_the_authors_values(capsys):
    printed = main(["--preset", "paper", "--print-config"])
    shown = json.loads(capsys.readouterr().out)
    assert shown == printed
    assert {k: shown[k] for k in AUTHORS} == AUTHORS


def test_readme_table_matches_the_paper_preset():
    """Every row of the README's preset table names a field; its `paper` column is what the preset resolves."""
    text = README.read_text()
    section = text[text.index("### The `paper` preset"):]
    section = section[:section.index("\n## ")]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    paper, base = resolve_config({"preset": "paper"}), resolve_config({"preset": "base"})
    fields = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        field = re.fullmatch(r"`(\w+)`", cells[0])
        assert field, row
        name = field.group(1)
        fields.add(name)
        for cell, cfg in ((cells[2], paper), (cells[3], base)):
            assert cell.strip("`") == json.dumps(getattr(cfg, name)), (name, cell, getattr(cfg, name))
    assert set(AUTHORS) - {"temperature", "queue_size", "rs_img_size", "rs_patch_size", "sv_img_size",
                           "sv_patch_size", "localizer", "location_encoder", "weight_decay"} <= fields


def test_layers_resolve_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("preset: paper\nbatch_size: 64\nsteps: 9\n")
    cfg = resolve_config({"steps": 3}, config_file=cfg_file)
    assert (cfg.preset, cfg.embed_dim, cfg.batch_size, cfg.steps) == ("paper", 768, 64, 3)  # preset < file < flag
    assert resolve_config({"preset": "tiny"}).steps == TRAIN_PRESETS["tiny"]["steps"]
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config({"preset": "huge"})
    with pytest.raises(ValueError, match="rs-jitter"):
        resolve_config({"rs_jitter": "sometimes"})


def test_flags_round_trip():
    values = {"preset": "paper", "lr": None, "steps": 7, "splits": ["train", "val"], "sv_aug": False,
              "loc_sigmas": [1.0, 2.0], "shards": ["a.tar"], "rs_jitter_p": 0.5}
    assert parse_config(to_flags(values)) == resolve_config(values)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg_shards")
    write_synthetic_shards(out, 16, rs_size=32, sv_size=32, samples_per_shard=8, seed=0)
    return out


def _small(**extra):
    return {"preset": "tiny", "rs_img_size": 32, "sv_img_size": 32, "batch_size": 4, "queue_size": 16, **extra}


def test_benchmark_times_the_trainers_step(monkeypatch):
    calls = []
    real = bench.train_step

    def counting(state, next_batch):
        calls.append(state.accum_steps)
        return real(state, next_batch)

    monkeypatch.setattr(bench, "train_step", counting)
    result = bench.run_benchmark(resolve_config(_small(accum_steps=2)), device="cpu", warmup_steps=1,
                                 window_steps=2, windows=1, count_flops=True)
    assert len(calls) == 1 + 1 + 2 and set(calls) == {2}  # FLOP count + warm-up + one window, 2 micro-batches
    assert result["samples_per_s"] > 0 and result["flops_per_sample_counted"] > 0
    assert result["accum_steps"] == 2 and result["train_config"]["rs_img_size"] == 32


def test_resume_draws_a_fresh_stream_by_default(shards, tmp_path):
    args = to_flags({**_small(steps=4, lr=2e-4, warmup_steps=1, val_every=0, log_every=100, save_every=0,
                              threads=1, shuffle_buffer=32), "shards": [str(shards)], "out_dir": str(tmp_path)})
    stopped = main([*args, "--max-minutes", "1e-9"])
    assert stopped["status"] == "time_budget" and stopped["steps"] == 1
    resumed = main([*args, "--resume", "auto"])
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 1
    assert json.loads((tmp_path / "config.json").read_text())["train"]["resume_data"] == "reseed"
    with open(tmp_path / "metrics.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]


def test_user_settings_are_not_beaten_by_the_preset():
    """tiny sets steps/lr/warm-up; a user's epochs, blr or new length must win over them, not be ignored."""
    cfg = resolve_config({"epochs": 3})
    assert (cfg.epochs, cfg.steps, cfg.warmup_steps) == (3, None, None)
    assert resolve_config({"blr": 1e-3}).lr is None
    assert resolve_config({"steps": 1000}).warmup_steps is None  # 5% of the new length, not the preset's 5
    assert resolve_config({"steps": 1000, "warmup_steps": 7}).warmup_steps == 7
    with pytest.raises(ValueError, match="not both"):
        resolve_config({"steps": 3, "epochs": 1})
    with pytest.raises(ValueError, match="localizer"):
        resolve_config({"localizer": "nearest"})
    assert parse_config(["--shards", "s", "--loc-hidden", "none"]).loc_hidden is None
    with pytest.raises(ValueError, match="empty list"):
        to_flags({"splits": []})


def test_evaluation_reads_inputs_as_training_did(shards, tmp_path):
    from gair_model.eval.loading import iter_eval_batches, load_trained

    args = to_flags({**_small(steps=1, lr=2e-4, val_every=0, log_every=100, threads=1, sv_resize="full",
                              rs_resize="bicubic"), "shards": [str(shards)], "out_dir": str(tmp_path)})
    summary = main(args)
    loaded = load_trained(summary["checkpoint"])  # the bare .safetensors: the header alone says it
    assert loaded.preprocessing == {"rs_resize": "bicubic", "sv_resize": "full"}
    batch = next(iter_eval_batches(loaded, str(shards), splits=None, batch_size=2))
    assert batch["sv"].shape[-1] == 32 and batch["rs"].shape[-1] == 32
