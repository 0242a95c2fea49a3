"""Task registry: bundled tasks load on the real data; malformed entries fail naming the task; absent data skips."""

import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from gair_model.eval.downstream import run_tasks
from gair_model.eval.tasks import (
    TaskConfigError,
    TaskDataMissing,
    check_task,
    default_tasks_path,
    load_task_data,
    load_task_specs,
)
from tests.conftest import shared_path

BUNDLED = {
    "air_temperature": ("location", "regression", 3076, None),
    "california_housing": ("location", "regression", 20640, None),
    "place_pulse_city": ("streetview", "classification", 2164, 4),
    "place_pulse_safety": ("streetview", "regression", 2164, None),
    "rsscn7": ("remote_sensing", "classification", 420, 7),
}


def _write(tmp_path: Path, entries: list[dict], name: str = "tasks.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"tasks": entries}))
    return path


def test_bundled_registry_parses():
    specs = {s.name: s for s in load_task_specs(default_tasks_path())}
    assert set(specs) == set(BUNDLED)
    for name, (family, task_type, _, _) in BUNDLED.items():
        assert (specs[name].family, specs[name].type) == (family, task_type)
    assert specs["air_temperature"].columns == {"lon": "Lon", "lat": "Lat", "target": "meanT"}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_task_loads_on_real_data(name):
    root = shared_path("eval")
    spec = next(s for s in load_task_specs() if s.name == name)
    assert check_task(spec, root) is None
    data = load_task_data(spec, root)
    _family, _task_type, n_rows, n_classes = BUNDLED[name]
    assert data.n_rows == n_rows and len(data) == n_rows and data.n_skipped_inputs == 0
    if n_classes:
        assert len(np.unique(data.targets)) == n_classes
    else:
        assert data.targets.dtype == np.float64 and np.isfinite(data.targets).all()
    if spec.kind == "location":
        assert data.lonlat.shape == (n_rows, 2) and np.abs(data.lonlat[:, 1]).max() <= 90
    else:
        assert all(p.is_file() for p in data.image_paths[:20]) and len(data.image_paths) == n_rows


GOOD = {"name": "bad_task", "kind": "location", "encoder": "location", "type": "regression", "path": "pts.csv",
        "columns": {"lon": "x", "lat": "y", "target": "t"}}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": None}, "missing key"),
        ({"kind": "video"}, "unknown kind 'video'"),
        ({"encoder": "radar"}, "unknown encoder 'radar'"),
        ({"type": "ranking"}, "unknown type 'ranking'"),
        ({"encoder": "sv"}, "does not apply to kind 'location'"),
        ({"colums": {"lon": "x"}}, "unknown key"),
        ({"columns": {"lon": "x", "lat": "y"}}, "missing role"),
        ({"columns": {"lon": "x", "lat": "y", "target": "t", "image": "f"}}, "unknown column role"),
        ({"max_samples": -3}, "max_samples"),
        ({"path": "/abs/pts.csv"}, "relative"),
        ({"image_dir": "imgs"}, "image_table' only"),
    ],
)
def test_malformed_entries_fail_naming_the_task(tmp_path, change, match):
    entry = {**GOOD, **change}
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(ValueError, match=match) as info:
        load_task_specs(_write(tmp_path, [entry]))
    assert isinstance(info.value, TaskConfigError) and "'bad_task'" in str(info.value)


def test_duplicate_names_and_bad_yaml(tmp_path):
    with pytest.raises(TaskConfigError, match="duplicate"):
        load_task_specs(_write(tmp_path, [GOOD, GOOD]))
    (tmp_path / "x.yaml").write_text("tasks: {not: a list}")
    with pytest.raises(TaskConfigError, match="'tasks' list"):
        load_task_specs(tmp_path / "x.yaml")


def test_bad_column_name_fails_naming_task_and_column(tmp_path):
    (tmp_path / "pts.csv").write_text("x,y,temp\n1,2,3\n")
    spec = load_task_specs(_write(tmp_path, [GOOD]))[0]
    with pytest.raises(TaskConfigError, match=r"'bad_task'.*'t'"):
        check_task(spec, tmp_path)
    with pytest.raises(TaskConfigError, match="'bad_task'"):
        load_task_data(spec, tmp_path)
    with pytest.raises(ValueError, match="'bad_task'"):  # the runner checks every task before computing
        run_tasks([spec], {}, tmp_path)


def test_absent_data_is_a_skipped_row_naming_the_path(tmp_path):
    spec = load_task_specs(_write(tmp_path, [GOOD]))[0]
    assert check_task(spec, tmp_path) == tmp_path / "pts.csv"
    with pytest.raises(TaskDataMissing):
        load_task_data(spec, tmp_path)
    rows = run_tasks([spec], {}, tmp_path)
    assert rows == [{"task": "bad_task", "family": "location", "skipped": rows[0]["skipped"]}]
    assert str(tmp_path / "pts.csv") in rows[0]["skipped"]


def test_table_options_sep_bom_missing_targets_and_subsample(tmp_path):
    rows = ["lon;lat;t"] + [f"{i % 360 - 179};{i % 170 - 85};{'NULL' if i < 4 else i}" for i in range(50)]
    rows.append("500;10;1")  # invalid longitude
    (tmp_path / "pts.csv").write_bytes(("\n".join(rows) + "\n").encode("utf-8-sig"))
    entry = {**GOOD, "sep": ";", "columns": {"lon": "lon", "lat": "lat", "target": "t"}, "max_samples": 20}
    spec = load_task_specs(_write(tmp_path, [entry]))[0]
    data = load_task_data(spec, tmp_path)
    assert (data.n_rows, data.n_skipped_inputs, data.n_missing_target, len(data)) == (51, 1, 4, 20)
    again = load_task_data(spec, tmp_path)
    np.testing.assert_array_equal(data.targets, again.targets)  # deterministic subsample
    assert any("subsampled 20 of 46" in n for n in data.notes)


def test_image_table_counts_missing_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"img{i}.jpg").write_bytes(b"x")
    (tmp_path / "t.csv").write_text("Filename,City\n" + "".join(f"img{i}.jpg,c{i % 2}\n" for i in range(5)))
    text = textwrap.dedent("""\
        tasks:
          - {name: tbl, kind: image_table, encoder: sv, type: classification, path: t.csv, image_dir: imgs,
             columns: {image: Filename, target: City}}
        """)
    (tmp_path / "tasks.yaml").write_text(text)
    data = load_task_data(load_task_specs(tmp_path / "tasks.yaml")[0], tmp_path)
    assert len(data) == 3 and data.n_skipped_inputs == 2 and "missing image file" in data.notes[0]
