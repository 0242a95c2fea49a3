"""Credentials come from the environment only and never reach a log line, an error message or a traceback."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest

from gair_dataset import object_store
from gair_model.loader import build_dataset
from gair_model.training.config import resolve_config
from tests.storage.conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY
from tests.synthetic_shards import write_synthetic_shards

SECRETS = (ACCESS_KEY_ID, SECRET_ACCESS_KEY)


def _assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def _full_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc.args)


def test_credentials_never_in_logs_or_errors(s3, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # every logger, ours and the libraries', at the level a run logs at
    bucket = s3.new_bucket()
    write_synthetic_shards(tmp_path, 8, rs_size=16, sv_size=24, samples_per_shard=4, seed=0, name="region-s")
    url = f"{bucket}/region-s/"
    result = object_store.publish_shard_set(tmp_path, url)
    assert result.url == url and "published 3 files" in caplog.text
    assert object_store.list_shard_sets(bucket)[0].n_samples == 8

    # A shard that vanished: the loader skips it with a warning naming the URL.
    fs, root = object_store.filesystem(url)
    fs.rm_file(f"{root}/region-s-000001.tar")
    keys = [k for b in build_dataset(url, batch_size=4, rs_size=16, sv_size=24, resampled=False, shuffle_buffer=0,
                                     split_by_node=False) for k in b["key"]]
    assert len(keys) == 4 and "region-s-000001.tar" in caplog.text

    # A bucket that does not exist (never created by a publish): the error names the URL and chains nothing.
    with pytest.raises(FileNotFoundError) as info:
        object_store.publish_shard_set(tmp_path, "s3://gair-no-such-bucket/region-s/")
    assert "s3://gair-no-such-bucket/region-s/: not found" in str(info.value) and info.value.__cause__ is None
    assert info.value.__suppress_context__ and not fs.exists("gair-no-such-bucket")
    _assert_clean(_full_error(info.value))

    with pytest.raises(FileNotFoundError) as missing:
        object_store.read_shards_json(f"{bucket}/nothing-here")
    _assert_clean(_full_error(missing.value))
    _assert_clean(caplog.text)


def test_an_error_message_that_quotes_a_credential_is_masked(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, _ = object_store.filesystem("s3://any-bucket/x")

    def leaky(*args, **kwargs):  # some client errors echo the request, signature parameters included
        raise RuntimeError(f"bad request key={SECRET_ACCESS_KEY} X-Amz-Signature=abc123 id={ACCESS_KEY_ID}")

    monkeypatch.setattr(fs, "cat_file", leaky)
    with pytest.raises(object_store.ObjectStoreError) as info:
        object_store.read_bytes("s3://any-bucket/x")
    text = _full_error(info.value)
    _assert_clean(text)
    assert "X-Amz-Signature=***" in text and "abc123" not in text


def test_credentials_in_a_url_are_refused(s3, tmp_path: Path) -> None:
    url = f"s3://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@bucket/prefix/"
    with pytest.raises(ValueError, match="through the environment") as info:
        object_store.publish_files({}, url, marker="m.json", marker_bytes=b"{}")
    _assert_clean(str(info.value))
    assert object_store.public_url(url) == "s3://bucket/prefix/"
    with pytest.raises(ValueError, match="through the environment") as cfg_error:
        resolve_config({"shards": ["x"], "publish_to": "s3://bucket/runs/x/?X-Amz-Credential=abc"})
    assert "abc" not in str(cfg_error.value)
