"""A training-state file carrying a pickled object is refused on load, and the object's payload never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gair_model.checkpoint import load_train_state


class _Evil:
    """Unpickling this would create ``target`` (a stand-in for arbitrary code execution)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.target, "pwned"))


def test_pickled_object_in_state_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    state = tmp_path / "step_00000001.state.pt"
    torch.save({"step": 1, "opt": _Evil(target)}, state)
    assert not target.exists()
    with pytest.raises(pickle.UnpicklingError):
        load_train_state(state)
    assert not target.exists()


def test_plain_state_file_still_loads(tmp_path: Path) -> None:
    state = tmp_path / "ok.state.pt"
    torch.save({"step": 3, "w": torch.ones(2), "rng": np.random.default_rng(0).bit_generator.state["state"]}, state)
    got = load_train_state(state)
    assert got["step"] == 3 and torch.equal(got["w"], torch.ones(2))
