"""The Dagster training config, the trainer's command line and the presets resolve to one configuration."""

from pathlib import Path

import pytest

from gair_model.train import parse_config
from gair_model.training.config import TrainConfig, resolve_config
from pipelines.defs.training.assets import TRAINER_FIELDS, TrainingConfig, resolved_config, trainer_args


@pytest.mark.parametrize("preset", ["tiny", "base", "paper"])
def test_cli_preset_and_dagster_config_agree(preset, tmp_path):
    shards, out = [str(tmp_path / "shards")], tmp_path / "run"
    dagster_cfg = TrainingConfig(preset=preset)
    from_preset = resolve_config({"preset": preset, "shards": shards, "out_dir": str(out), "overwrite": True})
    from_cli = parse_config(trainer_args(dagster_cfg, shards, out))
    assert from_cli == from_preset == resolved_config(dagster_cfg, shards, out)
    # What a Dagster user sets wins, exactly as a flag would. (In Python an explicit None is a value too; in run
    # config Dagster drops nulls, so a preset value is cleared with extra_args, e.g. ["--lr", "none"].)
    custom = TrainingConfig(preset=preset, steps=3, lr=None, rs_jitter="three_bands", splits=["train", "val"],
                            val_splits=["val"])
    from_cli = parse_config(trainer_args(custom, shards, out))
    assert from_cli == resolve_config({"preset": preset, "shards": shards, "out_dir": str(out), "overwrite": True,
                                       "steps": 3, "lr": None, "rs_jitter": "three_bands",
                                       "splits": ["train", "val"], "val_splits": ["val"]})
    assert (from_cli.steps, from_cli.lr, from_cli.rs_jitter) == (3, None, "three_bands")


def test_every_trainer_setting_is_a_dagster_field():
    assert set(TRAINER_FIELDS) == set(TrainConfig.model_fields) - {"preset", "shards", "out_dir", "overwrite"}
    assert set(TRAINER_FIELDS) <= set(TrainingConfig.model_fields)


def test_bad_value_fails_before_a_process_starts(tmp_path):
    with pytest.raises(ValueError, match="rs-resize"):
        trainer_args(TrainingConfig(rs_resize="nearest"), ["s"], Path(tmp_path))
    resume = trainer_args(TrainingConfig(resume="auto"), ["s"], Path(tmp_path))
    assert "--overwrite" not in resume and resume[resume.index("--resume") + 1] == "auto"
