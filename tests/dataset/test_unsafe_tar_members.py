"""Hand-made malicious shards through every tar reader: nothing is extracted, every bad member is reported.

Readers: :func:`gair_dataset.shards.iter_raw_samples` (checks, previews), the training/evaluation loader
(:func:`gair_model.loader.build_loader`, :func:`compute_rs_stats`) and the ``shards_readable_and_complete`` check.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from gair_dataset.bands import S2_L2A_BANDS
from gair_dataset.contract import UnsafeMemberError, check_member_name
from gair_dataset.shards import iter_raw_samples
from gair_model.loader import build_loader, compute_rs_stats


def _good(key: str) -> list[tuple[str, bytes]]:
    npy = io.BytesIO()
    np.save(npy, np.full((10, 4, 4), 1000, np.uint16))
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpg, "JPEG")
    meta = {"lon": 1.0, "lat": 2.0, "x": 0.1, "y": 0.2, "bands": list(S2_L2A_BANDS), "split": "train",
            "tile_id": "t", "sv_id": key}
    return [(f"{key}.rs.npy", npy.getvalue()), (f"{key}.sv.jpg", jpg.getvalue()),
            (f"{key}.json", json.dumps(meta).encode())]


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti


def _evil_tar(path: Path, outside: Path, evil: str) -> None:
    """A shard with one good sample, then sample ``bad_b`` whose ``rs.npy`` member is replaced by ``evil``."""
    bad = [m for m in _good("bad_b") if not m[0].endswith(".rs.npy")]
    payload = _good("x")[0][1]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in _good("ok_a"):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        if evil in ("absolute", "traversal", "folder", "bad_key"):
            name = {"absolute": str(outside / "bad_b.rs.npy"), "traversal": "../../bad_b.rs.npy",
                    "folder": "sub/bad_b.rs.npy", "bad_key": "bad b!.rs.npy"}[evil]
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
        else:
            kind, link = {"symlink": (tarfile.SYMTYPE, str(outside / "target")),
                          "hardlink": (tarfile.LNKTYPE, "../../outside_target"),
                          "device": (tarfile.CHRTYPE, ""), "fifo": (tarfile.FIFOTYPE, "")}[evil]
            tf.addfile(_special("bad_b.rs.npy", kind, link))
        for name, data in bad:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


EVIL = ["absolute", "traversal", "folder", "bad_key", "symlink", "hardlink", "device", "fifo"]
REASON = {"absolute": "absolute path", "traversal": "'..' path component", "folder": "not a bare",
          "bad_key": "not <key>.<suffix>", "symlink": "symbolic link", "hardlink": "hard link",
          "device": "character device", "fifo": "FIFO"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory nested two levels down, so ``../../x`` would still land inside ``tmp_path``."""
    wd = tmp_path / "a" / "b"
    wd.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    monkeypatch.chdir(wd)
    return wd


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("evil", EVIL)
def test_iter_raw_samples_refuses_and_reports(tmp_path: Path, workdir: Path, evil: str) -> None:
    shard = tmp_path / "evil.tar"
    _evil_tar(shard, tmp_path / "outside", evil)
    before = _files_under(tmp_path)
    with pytest.raises(UnsafeMemberError, match=REASON[evil]):
        list(iter_raw_samples(shard))
    problems: list[str] = []
    got = dict(iter_raw_samples(shard, on_bad_member=problems.append))
    assert len(problems) == 1 and REASON[evil] in problems[0] and "bad" in problems[0], problems
    assert sorted(got["ok_a"]) == ["json", "rs.npy", "sv.jpg"]
    assert sorted(got["bad_b"]) == ["json", "sv.jpg"]  # the refused member is not there
    assert _files_under(tmp_path) == before  # nothing extracted anywhere


@pytest.mark.parametrize("evil", EVIL)
def test_loader_skips_bad_members_and_their_sample(tmp_path: Path, workdir: Path, evil: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    shard = tmp_path / "evil.tar"
    _evil_tar(shard, tmp_path / "outside", evil)
    before = _files_under(tmp_path)
    caplog.set_level(logging.WARNING, logger="gair_model.loader")
    batches = list(build_loader([str(shard)], batch_size=4, rs_size=4, sv_size=8, resampled=False,
                                shuffle_buffer=0))
    assert [k for b in batches for k in b["key"]] == ["ok_a"]
    text = caplog.text
    assert "bad_b: missing members ['rs.npy']" in text, text
    if evil in ("absolute", "traversal", "folder", "bad_key"):
        assert "skipping bad tar member" in text and REASON[evil] in text
    stats = compute_rs_stats([str(shard)], splits=None)
    assert stats["mean"] == [1000.0] * 10  # only ok_a's chip counted
    assert _files_under(tmp_path) == before


@pytest.mark.parametrize("name", ["/etc/passwd.json", "../x.json", "a/../../x.json", "a/b.json", "a\\b.json",
                                  "C:x.json", "k", "k.", ".json", "k.j son", "k..json", ""])
def test_member_names_refused(name: str) -> None:
    with pytest.raises(UnsafeMemberError):
        check_member_name(name)


def test_member_names_accepted() -> None:
    assert check_member_name("t_1-a.rs.npy") == ("t_1-a", "rs.npy")
    assert check_member_name("k.json") == ("k", "json")
    assert check_member_name("k.pyd") == ("k", "pyd")  # unknown suffixes: valid names, ignored by the readers


@pytest.mark.parametrize("evil", ["traversal", "symlink", "device"])
def test_shards_check_reports_bad_members(tmp_path: Path, workdir: Path, evil: str) -> None:
    import dagster as dg

    from pipelines.common.storage import DataRoot
    from pipelines.defs.shards.assets import shards_readable_and_complete

    region = "sample-lund"
    data_root = DataRoot(root=str(tmp_path / "data"))
    out = data_root.stage_dir("shards", region)
    _evil_tar(out / "evil-000000.tar", tmp_path / "outside", evil)
    (out / "shards.json").write_text(json.dumps({"shards": [{"path": "evil-000000.tar", "n_samples": 2}]}))
    # the check's body, with the partition key it reads from its context (build_asset_check_context has none)
    check_fn = shards_readable_and_complete.op.compute_fn.decorated_fn
    res = check_fn(SimpleNamespace(partition_key=region, log=logging.getLogger("test")), data_root)
    assert isinstance(res, dg.AssetCheckResult)
    assert not res.passed
    problems = res.metadata["problems"].value
    assert any(p.startswith("evil-000000.tar: bad member: ") and REASON[evil] in p for p in problems), problems
    assert "evil-000000.tar: bad_b has ['json', 'sv.jpg']" in problems
    assert not list((tmp_path / "outside").iterdir()) and not list(workdir.iterdir())
    assert not [p for p in tmp_path.rglob("*") if p.name in ("bad_b.rs.npy", "target", "outside_target")]
