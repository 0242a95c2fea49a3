"""Training from shards streamed off a loopback S3, publishing the final checkpoint there, and loading it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gair_dataset import object_store
from gair_model import checkpoint as ckpt
from gair_model.eval.loading import load_trained
from gair_model.train import main
from tests.storage.conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY
from tests.synthetic_shards import write_synthetic_shards

torch.set_num_threads(1)


def test_train_on_s3_shards_publish_and_load_back(s3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    local = tmp_path / "shards"
    write_synthetic_shards(local, 16, rs_size=32, sv_size=32, samples_per_shard=8, seed=0, name="region-t")
    shards_url = f"{bucket}/shards/region-t/"
    object_store.publish_shard_set(local, shards_url)
    run_url = f"{bucket}/runs/tiny/"
    out = tmp_path / "run"
    summary = main([
        "--shards", shards_url, "--out-dir", str(out), "--publish-to", run_url,
        "--rs-img-size", "32", "--sv-img-size", "32", "--batch-size", "4", "--queue-size", "16", "--lr", "2e-4",
        "--warmup-steps", "1", "--threads", "1", "--shuffle-buffer", "8", "--save-every", "0", "--val-every", "0",
        "--steps", "2", "--splits", "none", "--allow-test-split", "true", "--log-every", "100",
    ])  # fmt: skip
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert json.loads((out / "config.json").read_text())["train"]["shards"] == [shards_url]

    model_name = Path(summary["checkpoint"]).name
    fs, root = object_store.filesystem(run_url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == sorted(
        [model_name, "config.json", "summary.json", ckpt.PUBLISHED_MARKER, ckpt.STATE_FOLDER])
    assert ckpt.published_state_steps(run_url) == [2]  # the training state of the (final) checkpoint
    marker = json.loads(object_store.read_bytes(object_store.join(run_url, ckpt.PUBLISHED_MARKER)))
    assert marker["model"] == model_name and marker["step"] == 2
    assert object_store.read_bytes(object_store.join(run_url, "summary.json")) == (out / "summary.json").read_bytes()
    for name in marker["files"]:
        data = object_store.read_bytes(object_store.join(run_url, name))
        assert ACCESS_KEY_ID.encode() not in data and SECRET_ACCESS_KEY.encode() not in data

    cache = tmp_path / "cache"
    remote = load_trained(run_url, cache_dir=cache)
    local_model = load_trained(out)
    assert Path(remote.checkpoint).is_relative_to(cache) and remote.step == 2
    assert remote.run_dir is not None and remote.train_config == local_model.train_config
    assert remote.rs_stats == local_model.rs_stats and remote.preprocessing == local_model.preprocessing
    got, want = remote.model.state_dict(), local_model.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert load_file(remote.checkpoint).keys() == load_file(summary["checkpoint"]).keys()

    # Publishing the same checkpoint again uploads nothing; a cached download is reused, a damaged one replaced.
    assert ckpt.publish_checkpoint(summary["checkpoint"], run_url).unchanged
    Path(remote.checkpoint).write_bytes(b"damaged")
    again = ckpt.fetch_checkpoint(run_url, cache)
    assert again == Path(remote.checkpoint) and again.read_bytes() == Path(summary["checkpoint"]).read_bytes()


def test_no_published_checkpoint(s3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    with pytest.raises(FileNotFoundError, match="no checkpoint published at"):
        load_trained(f"{bucket}/runs/none/", cache_dir=tmp_path)


def test_a_run_on_a_fresh_disk_resumes_from_the_published_state(s3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, 16, rs_size=32, sv_size=32, samples_per_shard=8, seed=0, name="region-t")

    def train(out: Path, url: str, *extra: str) -> dict:
        return main([
            "--shards", str(shards), "--out-dir", str(out), "--publish-to", url,
            "--rs-img-size", "32", "--sv-img-size", "32", "--batch-size", "4", "--queue-size", "16", "--lr", "2e-4",
            "--warmup-steps", "1", "--threads", "1", "--shuffle-buffer", "8", "--save-every", "2", "--val-every",
            "0", "--steps", "6", "--splits", "none", "--allow-test-split", "true", "--log-every", "100",
            "--resume-data", "skip", *extra,
        ])  # fmt: skip

    full = train(tmp_path / "full", f"{bucket}/runs/full/")
    run_url = f"{bucket}/runs/lost-pod/"
    # A pod lost early: a time budget that is always exceeded stops the run at its first check (step 1, logged),
    # where it checkpoints and publishes the state.
    first = train(tmp_path / "pod1", run_url, "--max-minutes", "1e-9")
    assert first["status"] == "time_budget" and first["steps"] == 1
    assert ckpt.published_state_steps(run_url) == [1]
    marker = json.loads(object_store.read_bytes(object_store.join(ckpt.state_url(run_url, 1), ckpt.STATE_MARKER)))
    assert set(marker["files"]) == {"step_00000001.safetensors", "step_00000001.state.pt", "metrics.csv"}

    # A half-published later step (no state.json: the upload was cut) is passed over.
    fs, root = object_store.filesystem(ckpt.state_url(run_url, 4))
    fs.pipe_file(root + "/step_00000004.safetensors", b"cut short")
    second = train(tmp_path / "pod2", run_url, "--resume", "auto")  # a fresh disk: nothing local
    assert second["status"] == "completed" and second["resumed_from_step"] == 1 and second["steps"] == 6
    a, b = load_file(full["checkpoint"]), load_file(second["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:  # the optimiser, queue, RNG and data stream continued exactly (one process, one thread)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    rows = (tmp_path / "pod2" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]  # step 1 came with the state
    # Each checkpoint published its state, the two newest are kept (--keep-checkpoints 2), the cut one replaced.
    assert ckpt.published_state_steps(run_url) == [4, 6]
    scratch = ckpt.fetch_train_state(run_url, tmp_path / "scratch")
    assert scratch is not None and scratch["step"] == 6
    assert Path(scratch["model"]).read_bytes() == Path(second["checkpoint"]).read_bytes()

    # Nothing published under a prefix: --resume auto starts afresh.
    fresh = train(tmp_path / "pod3", f"{bucket}/runs/new/", "--resume", "auto", "--steps", "2")
    assert fresh["status"] == "completed" and fresh["resumed_from_step"] is None

    # A fresh run must not mix its states with another run's: refused, unless told to start over.
    with pytest.raises(FileExistsError, match="already holds the training states of a run"):
        train(tmp_path / "pod4", run_url, "--steps", "2")
    over = train(tmp_path / "pod4", run_url, "--steps", "2", "--overwrite", "true")
    assert over["status"] == "completed" and ckpt.published_state_steps(run_url) == [2]


def _fake_checkpoint(ckpt_dir: Path, step: int) -> dict:
    model, state = ckpt.checkpoint_paths(ckpt_dir, step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"weights %d" % step)
    state.write_bytes(b"state %d" % step)
    return {"step": step, "model": str(model), "state": str(state)}


@pytest.mark.parametrize(("keep", "left"), [(2, [6, 8]), (3, [4, 6, 8]), (1, [8]), (0, [2, 4, 6, 8])])
def test_published_states_keep_the_newest_and_drop_later_steps_of_another_timeline(tmp_path, keep, left):
    url = str(tmp_path / "bucket" / "run")  # a local folder is a prefix too
    run = tmp_path / "run"
    for step in (2, 4, 6, 30):
        ckpt.publish_train_state(_fake_checkpoint(run / "checkpoints", step), url, keep=0)
    assert ckpt.published_state_steps(url) == [2, 4, 6, 30]
    # A run resumed from step 6 reaches 8: step 30 (beyond where this run went) is dropped, older ones per keep.
    (run / "metrics.csv").write_text("step\n1\n")
    ckpt.publish_train_state(_fake_checkpoint(run / "checkpoints", 8), url, run_dir=run, keep=keep)
    assert ckpt.published_state_steps(url) == left
    pod = tmp_path / "pod"
    rec = ckpt.fetch_train_state(url, pod / "checkpoints", run_dir=pod)
    assert rec is not None and rec["step"] == 8 and Path(rec["model"]).read_bytes() == b"weights 8"
    assert (pod / "metrics.csv").read_text() == "step\n1\n"
    assert json.loads((pod / "checkpoints" / ckpt.LATEST).read_text()) == rec


@pytest.mark.parametrize("edit", ["outside", "extra", "no_model", "other_step"])
def test_a_state_json_naming_other_files_is_refused(tmp_path, edit):
    url = str(tmp_path / "bucket" / "run")
    ckpt.publish_train_state(_fake_checkpoint(tmp_path / "run" / "checkpoints", 2), url)
    marker = Path(ckpt.state_url(url, 2)) / ckpt.STATE_MARKER
    doc = json.loads(marker.read_text())
    if edit == "outside":
        doc["files"]["../../escape.txt"] = doc["files"].pop("step_00000002.state.pt")
        doc["state"] = "../../escape.txt"
    elif edit == "extra":  # a plain name, but not one a training state holds
        doc["files"]["evil.sh"] = doc["files"]["step_00000002.state.pt"]
    elif edit == "no_model":
        del doc["files"]["step_00000002.safetensors"]
    else:
        doc["step"] = 7
    marker.write_text(json.dumps(doc))
    pod = tmp_path / "pod"
    with pytest.raises(object_store.ObjectStoreError, match="bad file name"):
        ckpt.fetch_train_state(url, pod / "checkpoints", run_dir=pod)
    assert not (tmp_path / "escape.txt").exists() and not (pod / "evil.sh").exists()
    assert not (pod / "checkpoints" / ckpt.LATEST).exists()


def test_a_state_with_a_missing_file_is_passed_over_for_the_one_before(tmp_path, caplog):
    url = str(tmp_path / "bucket" / "run")
    for step in (2, 4):
        ckpt.publish_train_state(_fake_checkpoint(tmp_path / "run" / "checkpoints", step), url)
    (Path(ckpt.state_url(url, 4)) / "step_00000004.state.pt").unlink()  # a removal cut short, say
    rec = ckpt.fetch_train_state(url, tmp_path / "pod" / "checkpoints")
    assert rec is not None and rec["step"] == 2
    assert "step_00000004" in caplog.text and "passed over" in caplog.text
    # Removing a state takes its marker first: a removal cut after that leaves no marker without files.
    ckpt.remove_published_state(url, 2)
    assert ckpt.published_state_steps(url) == [4]


def test_a_failed_state_upload_is_a_warning_and_training_goes_on(tmp_path, monkeypatch, caplog):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, 8, rs_size=32, sv_size=32, samples_per_shard=8, seed=0, name="region-t")

    def refuse(*args, **kwargs):
        raise object_store.ObjectStoreError("publish to s3://b/run/state/step_00000001 failed: ConnectTimeout")

    monkeypatch.setattr(ckpt, "publish_train_state", refuse)
    summary = main([
        "--shards", str(shards), "--out-dir", str(tmp_path / "run"), "--publish-to", str(tmp_path / "bucket"),
        "--rs-img-size", "32", "--sv-img-size", "32", "--batch-size", "4", "--queue-size", "16", "--lr", "2e-4",
        "--warmup-steps", "1", "--threads", "1", "--shuffle-buffer", "8", "--save-every", "1", "--val-every",
        "0", "--steps", "2", "--splits", "none", "--allow-test-split", "true", "--log-every", "100",
    ])  # fmt: skip
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert caplog.text.count("training state not published") == 2 and "ConnectTimeout" in caplog.text
    assert json.loads((tmp_path / "bucket" / ckpt.PUBLISHED_MARKER).read_text())["step"] == 2  # the final one
