"""The authors' choices behind the ``paper`` preset, each against a hand-computed value, and our alternatives."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from gair_model.loader import (
    LoaderConfigError,
    _color_jitter_rs,
    build_loader,
    decode_sv,
    resize_rs,
)
from gair_model.losses import gair_loss, location_info_nce
from gair_model.models.encoders import FrozenTeacher, RSEncoder, SVEncoder, build_teachers
from gair_model.models.gair import PRESETS, GAIRConfig, GAIRModel, preset
from gair_model.optim import build_optimizer, param_groups
from tests.synthetic_shards import write_synthetic_shards

torch.set_num_threads(1)
T = 0.07


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ce(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean cross-entropy, computed in float64 by hand."""
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(target)), target]))


def _tiny(**kw) -> GAIRConfig:
    return preset("tiny", rs_img_size=32, sv_img_size=32, **kw)


def _batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "rs": torch.rand(b, 10, 32, 32, generator=g),
        "sv": torch.randn(b, 3, 32, 32, generator=g),
        "lonlat": torch.rand(b, 2, generator=g) * 10,
        "rel_xy": torch.rand(b, 2, generator=g),
    }


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------
def test_paper_preset_is_the_authors_model_and_base_is_ours():
    paper, base, tiny = preset("paper"), preset("base"), preset("tiny")
    assert PRESETS["paper"] is not PRESETS["base"]
    assert (paper.embed_dim, paper.location_negatives, paper.sv_distill_feature) == (768, "queue", "pooled")
    assert (base.embed_dim, base.location_negatives, base.sv_distill_feature) == (512, "batch+queue", "cls")
    assert (tiny.location_negatives, tiny.sv_distill_feature) == ("batch+queue", "cls")
    assert GAIRConfig() == paper  # the dataclass defaults are the authors'
    # Same geometry for paper and base.
    geometry = ("rs_arch", "rs_img_size", "rs_patch_size", "rs_bands", "sv_arch", "sv_img_size", "sv_patch_size")
    assert all(getattr(paper, k) == getattr(base, k) for k in geometry)
    with pytest.raises(ValueError, match="location_negatives"):
        GAIRConfig(location_negatives="batch")
    with pytest.raises(ValueError, match="sv_distill_feature"):
        GAIRConfig(sv_distill_feature="mean")


# ------------------------------------------------------------------------------------------------
# location negatives
# ------------------------------------------------------------------------------------------------
def _fixed_embeddings() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(42)
    sv, rs, loc = (rng.normal(size=(4, 5)) for _ in range(3))
    queue = rng.normal(size=(8, 5))
    return sv, rs, loc, queue


def test_queue_only_location_logits_by_hand():
    """Batch 4, queue 8: row i's logits are [cos(q_i, loc_i), cos(q_i, queue_0..7)] / T, target 0."""
    sv, rs, loc, queue = _fixed_embeddings()
    t = [torch.tensor(a, dtype=torch.float32) for a in (sv, rs, loc, queue)]
    out = gair_loss(*t, location_negatives="queue")
    for name, q in (("sv_loc", sv), ("rs_loc", rs)):
        qn, ln, kn = _unit(q), _unit(loc), _unit(queue)
        logits = np.concatenate([(qn * ln).sum(1, keepdims=True), qn @ kn.T], axis=1) / T  # 4 x 9
        assert logits.shape == (4, 9)
        assert out[name].item() == pytest.approx(_ce(logits, np.zeros(4, dtype=int)), rel=1e-5)
    # SV <-> RS is unchanged (in-batch, symmetric).
    sr = _unit(sv) @ _unit(rs).T / T
    assert out["sv_rs"].item() == pytest.approx(_ce(sr, np.arange(4)), rel=1e-5)
    assert out["rs_sv"].item() == pytest.approx(_ce(sr.T, np.arange(4)), rel=1e-5)
    total = (out["sv_rs"] + out["rs_sv"] + out["sv_loc"] + out["rs_loc"]) / 2
    assert out["loss"].item() == pytest.approx(total.item())


def test_batch_plus_queue_location_logits_by_hand_and_fallback():
    sv, rs, loc, queue = _fixed_embeddings()
    t = [torch.tensor(a, dtype=torch.float32) for a in (sv, rs, loc, queue)]
    out = gair_loss(*t, location_negatives="batch+queue")
    keys = _unit(np.concatenate([loc, queue]))
    logits = _unit(sv) @ keys.T / T  # 4 x 12, target i
    assert out["sv_loc"].item() == pytest.approx(_ce(logits, np.arange(4)), rel=1e-5)
    # Without a queue, "queue" falls back to in-batch negatives (the documented behaviour).
    for empty in (None, torch.empty(0, 5)):
        a = location_info_nce(t[0], t[2], empty, negatives="queue")
        b = location_info_nce(t[0], t[2], None, negatives="batch+queue")
        assert a.item() == pytest.approx(b.item()) == pytest.approx(_ce(_unit(sv) @ _unit(loc).T / T, np.arange(4)),
                                                                    rel=1e-5)
    with pytest.raises(ValueError):
        location_info_nce(t[0], t[2], t[3], negatives="batch")


def test_queue_only_ignores_repeated_coordinates_in_the_batch():
    """A batch that repeats a coordinate gives a false negative with batch+queue, none with queue only."""
    loc = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the same location twice
    q = loc.clone()
    queue = torch.tensor([[0.6, 0.8]])  # cosine 0.6 with both rows
    only_queue = location_info_nce(q, loc, queue, negatives="queue")
    with_batch = location_info_nce(q, loc, queue, negatives="batch+queue")
    assert only_queue.item() == pytest.approx(math.log1p(math.exp((0.6 - 1) / T)), rel=1e-4)
    assert with_batch.item() > math.log(2) - 1e-6


def test_model_reads_location_negatives_from_config():
    torch.manual_seed(0)
    b = _batch()
    queue = torch.rand(8, 2, dtype=torch.float64) * 10
    losses = {}
    for mode in ("queue", "batch+queue"):
        torch.manual_seed(0)
        model = GAIRModel(_tiny(location_negatives=mode)).eval()
        out = model(b["rs"], b["sv"], b["lonlat"], b["rel_xy"], queue_lonlat=queue)
        emb = out["embeddings"]
        loc_q = model.encode_location(queue)
        expected = location_info_nce(emb["sv"], emb["loc"], loc_q, negatives=mode)
        assert out["losses"]["sv_loc"].item() == pytest.approx(expected.item(), rel=1e-5)
        losses[mode] = out["losses"]["sv_loc"].item()
    assert losses["queue"] != pytest.approx(losses["batch+queue"])


# ------------------------------------------------------------------------------------------------
# distillation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feature", ["pooled", "cls"])
def test_distillation_is_one_minus_cosine_by_hand(feature):
    torch.manual_seed(0)
    cfg = _tiny(sv_distill_feature=feature)
    student = GAIRModel(cfg)
    b = _batch()
    # A teacher that is a copy of the student: distillation 0.
    model = GAIRModel(cfg, rs_teacher=FrozenTeacher(copy.deepcopy(student.rs_encoder)),
                      sv_teacher=FrozenTeacher(copy.deepcopy(student.sv_encoder), feature=feature))
    model.load_state_dict(student.state_dict())
    out = model(b["rs"], b["sv"], b["lonlat"], b["rel_xy"], distill_weight=0.2)
    assert out["losses"]["distill"].item() == pytest.approx(0.0, abs=1e-5)

    # A perturbed teacher: 1 - cos computed by hand from the student's and the teacher's features.
    rs_t, sv_t = copy.deepcopy(student.rs_encoder), copy.deepcopy(student.sv_encoder)
    with torch.no_grad():
        for p in list(rs_t.parameters()) + list(sv_t.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    model = GAIRModel(cfg, rs_teacher=FrozenTeacher(rs_t), sv_teacher=FrozenTeacher(sv_t, feature=feature))
    model.load_state_dict(student.state_dict())
    out = model(b["rs"], b["sv"], b["lonlat"], b["rel_xy"], distill_weight=0.2)
    plain = GAIRModel(cfg)
    plain.load_state_dict(student.state_dict())
    base = plain(b["rs"], b["sv"], b["lonlat"], b["rel_xy"])["losses"]["loss"]
    with torch.no_grad():
        enc = student.sv_encoder
        s_sv = enc.forward_pooled(b["sv"]) if feature == "pooled" else enc.forward_cls(b["sv"])
        t_sv = sv_t.forward_pooled(b["sv"]) if feature == "pooled" else sv_t.forward_cls(b["sv"])
        s_rs, t_rs = student.rs_encoder.forward_global(b["rs"]), rs_t.forward_global(b["rs"])

    def one_minus_cos(a: torch.Tensor, c: torch.Tensor) -> float:
        a64, c64 = a.double().numpy(), c.double().numpy()
        cos = (a64 * c64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(c64, axis=1)
        return float(np.mean(1 - cos))

    expected = one_minus_cos(s_rs, t_rs) + one_minus_cos(s_sv, t_sv)
    assert expected > 1e-4
    assert out["losses"]["distill"].item() == pytest.approx(expected, rel=1e-4)
    assert out["losses"]["loss"].item() == pytest.approx(base.item() + 0.2 * expected, rel=1e-5)
    # The teachers stay frozen and in eval mode, outside the parameter tree.
    out["losses"]["loss"].backward()
    assert all(p.grad is None for p in sv_t.parameters())
    model.train()
    assert not model._teachers["sv"].training and not model._teachers["sv"].encoder.training


def test_teacher_feature_must_match_the_config():
    cfg = _tiny(sv_distill_feature="pooled")
    enc = SVEncoder("tiny", img_size=32, patch_size=16)
    with pytest.raises(ValueError, match="distils"):
        GAIRModel(cfg, sv_teacher=FrozenTeacher(enc, feature="cls"))


def test_build_teachers_from_local_files(tmp_path: Path):
    torch.manual_seed(1)
    cfg = _tiny(sv_distill_feature="pooled")
    rs = RSEncoder("tiny", img_size=32, patch_size=8, in_chans=10)
    sv = SVEncoder("tiny", img_size=32, patch_size=16)
    rs_file, sv_file, sv_no_pooler = tmp_path / "rs.safetensors", tmp_path / "sv.pth", tmp_path / "svnp.pth"
    save_file({k: v.contiguous() for k, v in rs.vit.state_dict().items()}, str(rs_file))
    # An SV file in the HuggingFace pooler naming (pooler.dense.*) next to timm backbone keys.
    linear = sv.pooler[0]
    torch.save({**sv.vit.state_dict(), "pooler.dense.weight": linear.weight.detach().clone(),
                "pooler.dense.bias": linear.bias.detach().clone()}, sv_file)
    torch.save(sv.vit.state_dict(), sv_no_pooler)

    rs_t, sv_t = build_teachers(cfg, str(rs_file), str(sv_file))
    assert isinstance(rs_t, FrozenTeacher) and isinstance(sv_t, FrozenTeacher)
    x_rs, x_sv = torch.rand(2, 10, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rs_t(x_rs), rs.eval().forward_global(x_rs))
        torch.testing.assert_close(sv_t(x_sv), sv.eval().forward_pooled(x_sv))
    assert build_teachers(cfg, None, None) == (None, None)
    # The student loads the pooler from its weights file too.
    assert SVEncoder("tiny", img_size=32, patch_size=16, weights=str(sv_file)).pooler_loaded

    with pytest.raises(FileNotFoundError, match="RS teacher"):
        build_teachers(cfg, str(tmp_path / "missing.pth"), None)
    with pytest.raises(ValueError, match="pooler"):
        build_teachers(cfg, None, str(sv_no_pooler))
    _, cls_t = build_teachers(_tiny(sv_distill_feature="cls"), None, str(sv_no_pooler))
    with torch.no_grad():
        torch.testing.assert_close(cls_t(x_sv), sv.forward_cls(x_sv))
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in rs.vit.state_dict().items() if "blocks.0." not in k}, partial)
    with pytest.raises(ValueError, match="lack"):
        build_teachers(cfg, str(partial), None)


# ------------------------------------------------------------------------------------------------
# preprocessing
# ------------------------------------------------------------------------------------------------
def test_bicubic_rs_resize_equals_torch_interpolate():
    x = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    got = resize_rs(x, 8, "bicubic")
    ref = F.interpolate(torch.from_numpy(x)[None], size=(8, 8), mode="bicubic", align_corners=False)[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert not np.allclose(got, resize_rs(x, 8))  # bilinear (the default) differs
    with pytest.raises(LoaderConfigError):
        resize_rs(x, 8, "nearest")


def test_three_band_jitter_touches_only_rgb_with_probability_p():
    names = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    x = np.random.default_rng(1).uniform(0.2, 0.8, size=(10, 6, 6)).astype(np.float32)
    rng = np.random.default_rng(123)
    applied = 0
    for _ in range(500):
        y = _color_jitter_rs(x, rng, mode="three_bands", bands=names, p=0.7)
        np.testing.assert_array_equal(y[3:], x[3:])  # every non-RGB band untouched
        applied += int(not np.array_equal(y[:3], x[:3]))
    np.testing.assert_array_equal(x, np.random.default_rng(1).uniform(0.2, 0.8, size=(10, 6, 6)).astype(np.float32))
    assert 0.6 <= applied / 500 <= 0.8
    # Bands found by name wherever they are (common names too).
    moved = ["nir", "red", "x", "green", "blue"]
    z = np.random.default_rng(2).uniform(0.2, 0.8, size=(5, 4, 4)).astype(np.float32)
    y = _color_jitter_rs(z, np.random.default_rng(0), mode="three_bands", bands=moved, p=1.0)
    np.testing.assert_array_equal(y[[0, 2]], z[[0, 2]])
    assert not np.array_equal(y[[1, 3, 4]], z[[1, 3, 4]])
    # p=0 never applies; "all_bands" keeps the old brightness/contrast formula.
    assert np.array_equal(_color_jitter_rs(z, np.random.default_rng(0), mode="three_bands", p=0.0), z)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    bright, contrast = r2.uniform(0.8, 1.2), r2.uniform(0.8, 1.2)
    m = z.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(_color_jitter_rs(z.copy(), r1), np.clip((z - m) * contrast + m * bright, 0, 1),
                               rtol=1e-6)


def test_three_band_jitter_brightness_by_hand():
    """With only brightness possible, the RGB bands are scaled by one factor in [0.6, 1.4] and clipped."""
    import gair_model.loader as loader_mod

    z = np.full((4, 2, 2), 0.5, dtype=np.float32)
    old = loader_mod.RS_JITTER_STRENGTHS
    try:
        loader_mod.RS_JITTER_STRENGTHS = (0.4, 0.0, 0.0)
        y = _color_jitter_rs(z, np.random.default_rng(3), mode="three_bands", bands=None, p=1.0)
    finally:
        loader_mod.RS_JITTER_STRENGTHS = old
    f = y[0, 0, 0] / 0.5
    assert 0.6 <= f <= 1.4
    np.testing.assert_allclose(y[:3], np.full((3, 2, 2), 0.5 * f), rtol=1e-6)
    np.testing.assert_array_equal(y[3], z[3])


def test_sv_full_resize_equals_pil_resize_of_the_whole_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, size=(30, 48, 3), dtype=np.uint8))  # 48 wide, 30 high
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    got = decode_sv(data, 20, mode="full")
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((20, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got, decode_sv(data, 20))  # the default crops the sides
    np.testing.assert_array_equal(decode_sv(data, 20, mode="full", flip=True), ref[:, ::-1])
    with pytest.raises(LoaderConfigError):
        decode_sv(data, 20, mode="pad")


def test_loader_accepts_the_paper_preprocessing(tmp_path: Path):
    shards = write_synthetic_shards(tmp_path, 8, rs_size=24, sv_size=40, samples_per_shard=8, seed=1)
    common = {"batch_size": 4, "rs_size": 16, "sv_size": 20, "resampled": False, "shuffle_buffer": 0}
    paper = next(iter(build_loader(shards, rs_resize="bicubic", rs_jitter="three_bands", rs_jitter_p=1.0,
                                   sv_resize="full", rs_train_aug=True, **common)))
    ours = next(iter(build_loader(shards, **common)))
    assert paper["rs"].shape == ours["rs"].shape == (4, 10, 16, 16)
    assert paper["sv"].shape == ours["sv"].shape == (4, 3, 20, 20)
    assert paper["key"] == ours["key"]
    assert not torch.allclose(paper["rs"], ours["rs"])
    torch.testing.assert_close(paper["sv"], ours["sv"])  # square synthetic SV images: full == crop
    with pytest.raises(LoaderConfigError):
        build_loader(shards, rs_jitter="some", **common)
    with pytest.raises(LoaderConfigError):
        build_loader(shards, rs_jitter_p=1.5, **common)


# ------------------------------------------------------------------------------------------------
# weight decay
# ------------------------------------------------------------------------------------------------
def test_weight_decay_groups_by_name():
    model = GAIRModel(_tiny())
    timm_decay, timm_no = (set(g["names"]) for g in param_groups(model, 0.05, "timm"))
    ours_decay, ours_no = (set(g["names"]) for g in param_groups(model, 0.05, "exempt_embeddings"))
    for name in ("rs_encoder.vit.pos_embed", "sv_encoder.vit.pos_embed", "sv_encoder.vit.cls_token"):
        assert name in timm_decay and name in ours_no
    for name in ("sv_encoder.vit.norm.weight", "sv_encoder.vit.norm.bias", "localizer.decoder.bias",
                 "rs_encoder.vit.blocks.0.norm1.weight", "sv_encoder.pooler.0.bias"):
        assert name in timm_no and name in ours_no
    for name in ("localizer.decoder.weight", "sv_encoder.vit.patch_embed.proj.weight", "sv_encoder.proj.weight"):
        assert name in timm_decay and name in ours_decay
    assert timm_decay - ours_decay == {"rs_encoder.vit.pos_embed", "sv_encoder.vit.pos_embed",
                                       "sv_encoder.vit.cls_token"}
    # Exactly timm's own rule (param_groups_weight_decay without a no_weight_decay_list).
    from timm.optim import param_groups_weight_decay

    ref = param_groups_weight_decay(model, 0.05)
    ids = {id(p): n for n, p in model.named_parameters()}
    ref_decay = {ids[id(p)] for g in ref if g["weight_decay"] > 0 for p in g["params"]}
    assert ref_decay == timm_decay
    opt = build_optimizer(model, 1e-3, wd_rule="timm")
    assert set(opt.param_groups[0]["names"]) == timm_decay
    with pytest.raises(ValueError):
        param_groups(model, 0.05, "none")


def test_weight_decay_timm_rule_on_a_hand_built_module():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.scale = nn.Parameter(torch.ones(()))
            self.frozen = nn.Parameter(torch.zeros(8, 8), requires_grad=False)

    decay, no = param_groups(M(), 0.1, "timm")
    assert set(decay["names"]) == {"pos_embed", "cls_token", "fc.weight"} and decay["weight_decay"] == 0.1
    assert set(no["names"]) == {"fc.bias", "norm.weight", "norm.bias", "scale"} and no["weight_decay"] == 0.0
    decay, no = param_groups(M(), 0.1)
    assert decay["names"] == ["fc.weight"]


# ------------------------------------------------------------------------------------------------
# gather with gradients (2 gloo processes)
# ------------------------------------------------------------------------------------------------
B, D_IN, E = 3, 6, 5


def _ddp_data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    x_sv, x_rs, x_loc = (torch.randn(2 * B, D_IN, generator=g) for _ in range(3))
    queue = torch.randn(4, E, generator=g)
    w = torch.randn(D_IN, E, generator=g)
    return x_sv, x_rs, x_loc, queue, w


def _loss_and_grad(x_sv, x_rs, x_loc, queue, w0, gather: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    w = w0.clone().requires_grad_(True)
    out = gair_loss(x_sv @ w, x_rs @ w.flip(0), x_loc @ w, queue, location_negatives="queue",
                    gather_with_grad=gather)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, w.grad


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x_sv, x_rs, x_loc, queue, w = _ddp_data()
        rows = slice(rank * B, (rank + 1) * B)
        losses, grad = _loss_and_grad(x_sv[rows], x_rs[rows], x_loc[rows], queue, w, gather=True)
        dist.all_reduce(grad)
        grad /= 2  # DDP's gradient averaging
        mean_loss = losses["loss"].clone()
        dist.all_reduce(mean_loss)
        torch.save({"losses": losses, "grad": grad, "mean_loss": mean_loss / 2}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_matches_the_single_process_global_batch(tmp_path: Path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x_sv, x_rs, x_loc, queue, w = _ddp_data()
    single, grad = _loss_and_grad(x_sv, x_rs, x_loc, queue, w, gather=False)
    # Local rows against the 2B keys, by hand.
    wd = w.double()
    sv, rs = F.normalize(x_sv.double() @ wd, dim=-1), F.normalize(x_rs.double() @ wd.flip(0), dim=-1)
    logits = (sv @ rs.t() / T).numpy()
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = np.arange(rank * B, (rank + 1) * B)
        assert res["losses"]["sv_rs"].item() == pytest.approx(_ce(logits[rows], rows), rel=1e-5)
        assert res["losses"]["rs_sv"].item() == pytest.approx(_ce(logits.T[rows], rows), rel=1e-5)
        assert res["mean_loss"].item() == pytest.approx(single["loss"].item(), rel=1e-5)
        torch.testing.assert_close(res["grad"], grad, rtol=1e-4, atol=1e-6)
    # In a single process the option is a no-op.
    again, grad_again = _loss_and_grad(x_sv, x_rs, x_loc, queue, w, gather=True)
    assert again["loss"].item() == single["loss"].item()
    torch.testing.assert_close(grad_again, grad)
