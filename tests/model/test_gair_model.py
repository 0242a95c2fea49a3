"""Encoders, GAIRModel wiring, local weights, optimiser groups, LR schedule and checkpoints."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gair_model import checkpoint as ckpt
from gair_model.models.encoders import RSEncoder, SVEncoder, load_local_weights
from gair_model.models.gair import GAIRConfig, GAIRModel, preset
from gair_model.optim import build_optimizer, build_scheduler, param_groups, scaled_lr, warmup_cosine

torch.set_num_threads(1)


def _tiny(**kw) -> GAIRConfig:
    return preset("tiny", rs_img_size=32, sv_img_size=32, **kw)


def _batch(b: int = 4, rs: int = 32, sv: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "rs": torch.rand(b, 10, rs, rs, generator=g),
        "sv": torch.randn(b, 3, sv, sv, generator=g),
        "lonlat": torch.rand(b, 2, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0])
        - torch.tensor([180.0, 90.0]),
        "rel_xy": torch.rand(b, 2, generator=g),
    }


def test_rs_encoder_token_grid_and_global():
    enc = RSEncoder("tiny", img_size=64, patch_size=8, in_chans=10)
    assert enc.vit.cls_token is None and enc.vit.num_prefix_tokens == 0
    x = torch.rand(2, 10, 64, 64)
    grid = enc.forward_tokens(x)
    assert grid.shape == (2, 192, 8, 8) and enc.grid_size == (8, 8)
    torch.testing.assert_close(enc.forward_global(x), grid.mean(dim=(2, 3)))


def test_rs_encoder_paper_geometry():
    enc = RSEncoder("tiny", img_size=96, patch_size=8, in_chans=10)
    assert enc.grid_size == (12, 12)


def test_rs_token_grid_orientation():
    """Token (row i, col j) comes from patch (row i, col j): no transposition in the reshape."""
    enc = RSEncoder("tiny", img_size=32, patch_size=8, in_chans=10).eval()
    enc.vit.blocks = nn.Sequential()  # no token mixing: each token only sees its own patch
    x = torch.rand(1, 10, 32, 32)
    y = x.clone()
    y[:, :, 0:8, 16:24] += 1.0  # patch at row 0, column 2 (top, east of centre)
    with torch.no_grad():
        diff = (enc.forward_tokens(y) - enc.forward_tokens(x)).abs().sum(1)[0]
    changed = (diff > 1e-6).nonzero().tolist()
    assert changed == [[0, 2]]


def test_sv_encoder_cls_pooler_projection():
    enc = SVEncoder("tiny", img_size=32, patch_size=16, out_dim=48)
    x = torch.randn(3, 3, 32, 32)
    cls = enc.forward_cls(x)
    pooled = enc.forward_pooled(x)
    assert cls.shape == (3, 192) and pooled.shape == (3, 192)
    assert pooled.abs().max() <= 1.0  # tanh
    assert enc(x).shape == (3, 48)
    torch.testing.assert_close(enc(x), enc.proj(torch.tanh(enc.pooler[0](cls))))


def test_local_weights_roundtrip_with_prefix_and_pos_embed_resize(tmp_path):
    torch.manual_seed(0)
    src = RSEncoder("tiny", img_size=32, patch_size=8, in_chans=10)
    path = tmp_path / "croma_like.safetensors"
    save_file({f"encoder.{k}": v.contiguous() for k, v in src.vit.state_dict().items()}, str(path))
    torch.manual_seed(1)
    dst = RSEncoder("tiny", img_size=32, patch_size=8, in_chans=10, weights=path, weights_prefix="encoder.")
    x = torch.rand(1, 10, 32, 32)
    torch.testing.assert_close(dst.forward_tokens(x), src.forward_tokens(x))
    # Different input size: the position embedding is resampled (4x4 -> 8x8 tokens).
    big = RSEncoder("tiny", img_size=64, patch_size=8, in_chans=10, weights=path, weights_prefix="encoder.")
    torch.testing.assert_close(big.vit.blocks[0].attn.qkv.weight, src.vit.blocks[0].attn.qkv.weight)
    assert big.vit.pos_embed.shape == (1, 64, 192)


def test_local_weights_torch_file_and_missing(tmp_path):
    src = SVEncoder("tiny", img_size=32, patch_size=16)
    path = tmp_path / "sv.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.vit.state_dict().items()}}, path)
    dst = SVEncoder("tiny", img_size=32, patch_size=16)
    missing, unexpected = load_local_weights(dst.vit, path)
    assert not missing and not unexpected
    torch.testing.assert_close(dst.vit.cls_token, src.vit.cls_token)
    with pytest.raises(FileNotFoundError):
        load_local_weights(dst.vit, tmp_path / "nope.safetensors")


@pytest.mark.parametrize("localizer", ["nili", "mean", "centre", "bilinear", "bicubic"])
@pytest.mark.parametrize("location_encoder", ["geoclip", "sh", "mlp"])
def test_gair_model_forward_backward_all_params_used(localizer, location_encoder):
    torch.manual_seed(0)
    model = GAIRModel(_tiny(localizer=localizer, location_encoder=location_encoder, loc_hidden=[32, 32]))
    b = _batch()
    queue = torch.tensor([[5.0, 5.0], [6.0, -7.0], [100.0, 45.0]], dtype=torch.float64)
    out = model(b["rs"], b["sv"], b["lonlat"], b["rel_xy"], queue_lonlat=queue)
    emb, losses = out["embeddings"], out["losses"]
    assert emb["sv"].shape == emb["rs_local"].shape == emb["loc"].shape == (4, 128)
    assert emb["rs_global"].shape == (4, 192)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused  # DDP runs with find_unused_parameters=False


def test_gair_model_embeddings_only_and_query_effect():
    torch.manual_seed(0)
    model = GAIRModel(_tiny()).eval()
    b = _batch()
    with torch.no_grad():
        out = model(b["rs"], b["sv"], b["lonlat"], b["rel_xy"], return_loss=False)
        moved = model(b["rs"], b["sv"], b["lonlat"], 1.0 - b["rel_xy"], return_loss=False)
    assert out["losses"] == {}
    assert not torch.allclose(out["embeddings"]["rs_local"], moved["embeddings"]["rs_local"])
    torch.testing.assert_close(out["embeddings"]["sv"], moved["embeddings"]["sv"])


def test_gair_model_distillation_teachers_not_parameters():
    torch.manual_seed(0)
    cfg = _tiny()
    teacher_rs = RSEncoder("tiny", img_size=32, patch_size=8, in_chans=10)

    class T(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            return self.enc.forward_global(x)

    model = GAIRModel(cfg, rs_teacher=T(teacher_rs))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in GAIRModel(cfg).parameters())
    b = _batch()
    out = model(b["rs"], b["sv"], b["lonlat"], b["rel_xy"], distill_weight=0.5)
    assert "distill" in out["losses"] and out["losses"]["distill"].item() > 0
    out["losses"]["loss"].backward()
    assert all(p.grad is None for p in teacher_rs.parameters())


def test_presets():
    base = preset("base")
    assert (base.rs_img_size, base.rs_patch_size, base.rs_bands, base.sv_img_size, base.sv_patch_size) == (
        96,
        8,
        10,
        224,
        16,
    )
    assert base.temperature == 0.07 and base.localizer == "nili" and base.location_encoder == "geoclip"
    assert GAIRConfig.from_dict({**base.to_dict(), "unknown": 1}) == base
    with pytest.raises(ValueError):
        preset("huge")


def test_param_groups_no_decay_on_norms_biases_pos_embed():
    model = GAIRModel(_tiny())
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = set(no_decay["names"])
    assert "rs_encoder.vit.pos_embed" in nd and "sv_encoder.vit.cls_token" in nd
    assert "sv_encoder.vit.norm.weight" in nd and "localizer.decoder.bias" in nd
    assert "localizer.decoder.weight" in set(decay["names"])
    assert all(p.ndim >= 2 for p in decay["params"])
    opt = build_optimizer(model, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_lr_scaling_and_schedule():
    assert scaled_lr(1.5e-6, 256 * 96) == pytest.approx(1.44e-4)
    assert warmup_cosine(0, warmup_steps=10, total_steps=100) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup_steps=10, total_steps=100) == pytest.approx(1.0)
    assert warmup_cosine(55, warmup_steps=10, total_steps=100) == pytest.approx(0.5)
    assert warmup_cosine(100, warmup_steps=10, total_steps=100, min_ratio=0.1) == pytest.approx(0.1)
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [1.0, 2.0] and lrs[2] == pytest.approx(2.0) and lrs[-1] < 0.3
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert math.isfinite(lrs[-1])


def test_checkpoint_roundtrip_latest_and_pruning(tmp_path):
    torch.manual_seed(0)
    model = GAIRModel(_tiny())
    opt = build_optimizer(model, 1e-3)
    rng = ckpt.rng_state()
    for step in (1, 2, 3):
        rec = ckpt.save_checkpoint(tmp_path, step, model, {"optimizer": opt.state_dict(), "rng": [rng]}, keep=2)
    assert ckpt.list_checkpoints(tmp_path) == [2, 3]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 3
    assert ckpt.find_latest(tmp_path)["model"] == rec["model"]
    assert not list(tmp_path.glob("*.tmp"))
    other = GAIRModel(_tiny())
    ckpt.load_model(other, rec["model"])
    for (k, v), (k2, v2) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    state = ckpt.load_train_state(rec["state"])
    assert state["step"] == 3
    ckpt.set_rng_state(state["rng"][0])
    a, pa = torch.rand(3), random.random()
    ckpt.set_rng_state(state["rng"][0])
    assert torch.equal(torch.rand(3), a) and random.random() == pa


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "f.txt"

    def bad(tmp):
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, bad)
    assert not target.exists() and not list(tmp_path.iterdir())
