"""GAIR losses and the coordinate queue."""

import math

import pytest
import torch

from gair_model.losses import (
    TEMPERATURE,
    CoordinateQueue,
    cosine_distillation,
    gair_loss,
    info_nce,
    symmetric_info_nce,
)

torch.set_num_threads(1)


def test_logits_are_cosines_over_the_fixed_temperature():
    """Closed-form losses: cross-entropy of cosine / 0.07, whatever the embeddings' scale."""
    assert TEMPERATURE == 0.07
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # cosine 0.6 with the positive (row 0), 1.0 with the negative
    expected = math.log1p(math.exp((1.0 - 0.6) / 0.07))
    assert info_nce(q, keys).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(5 * q, 3 * keys).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(q, keys, temperature=1.0).item() == pytest.approx(math.log1p(math.exp(0.4)), rel=1e-5)
    # A mismatched target: the "negative" row becomes the positive.
    assert info_nce(q, keys, targets=torch.tensor([1])).item() == pytest.approx(
        math.log1p(math.exp(-0.4 / 0.07)), rel=1e-4)

    # Each row of a/b has cosine 0.6 with its positive and 0.8 with the other row, in both directions.
    a = torch.eye(2)
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    term = math.log1p(math.exp((0.8 - 0.6) / 0.07))
    a_b, b_a = symmetric_info_nce(a, b)
    assert a_b.item() == pytest.approx(term, rel=1e-5) and b_a.item() == pytest.approx(term, rel=1e-5)
    out = gair_loss(a, b, b)  # rs -> loc: cosine 1 with itself, 0.96 with the other row
    rs_loc = math.log1p(math.exp((0.96 - 1.0) / 0.07))
    assert out["sv_loc"].item() == pytest.approx(term, rel=1e-5)
    assert out["rs_loc"].item() == pytest.approx(rs_loc, rel=1e-5)
    assert out["loss"].item() == pytest.approx((3 * term + rs_loc) / 2, rel=1e-5)


def test_perfect_alignment_is_near_zero():
    b, k = 8, 16
    eye = torch.eye(64)
    emb = eye[:b] * 3.0  # scale is irrelevant: embeddings are L2-normalised
    queue = eye[b : b + k]
    out = gair_loss(emb, emb.clone(), emb.clone(), queue)
    assert set(out) == {"loss", "sv_rs", "rs_sv", "sv_loc", "rs_loc"}
    for v in out.values():
        assert v.item() < 1e-4


def test_uninformative_embeddings_give_log_batch():
    torch.manual_seed(0)
    b, k, e = 32, 64, 8192
    sv, rs, loc, queue = (torch.randn(n, e) for n in (b, b, b, k))
    out = gair_loss(sv, rs, loc, queue)
    assert out["sv_rs"].item() == pytest.approx(math.log(b), abs=0.15)
    assert out["rs_sv"].item() == pytest.approx(math.log(b), abs=0.15)
    assert out["sv_loc"].item() == pytest.approx(math.log(b + k), abs=0.15)
    assert out["rs_loc"].item() == pytest.approx(math.log(b + k), abs=0.15)
    total = (out["sv_rs"] + out["rs_sv"] + out["sv_loc"] + out["rs_loc"]) / 2
    assert out["loss"].item() == pytest.approx(total.item())


def test_shuffled_pairs_are_penalised():
    b = 8
    emb = torch.eye(32)[:b]
    aligned = symmetric_info_nce(emb, emb)[0]
    shuffled = symmetric_info_nce(emb, emb[torch.roll(torch.arange(b), 1)])[0]
    assert aligned.item() < 1e-4 and shuffled.item() > math.log(b)


def test_info_nce_queue_adds_negatives():
    torch.manual_seed(0)
    q, keys, extra = torch.randn(8, 16), torch.randn(8, 16), torch.randn(100, 16)
    assert info_nce(q, torch.cat([keys, extra])).item() > info_nce(q, keys).item()


def test_gair_loss_without_queue():
    emb = torch.eye(16)[:4]
    out = gair_loss(emb, emb, emb, None)
    assert out["loss"].item() < 1e-4
    out = gair_loss(emb, emb, emb, torch.empty(0, 16))
    assert out["loss"].item() < 1e-4


def test_cosine_distillation():
    a = torch.randn(4, 8, requires_grad=True)
    assert cosine_distillation(a, a.detach() * 2).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distillation(a, -a.detach()).item() == pytest.approx(2.0, abs=1e-6)
    cosine_distillation(a, torch.randn(4, 8)).backward()
    assert a.grad is not None


def test_queue_fifo_fill_and_wrap():
    q = CoordinateQueue(5)
    assert q.filled == 0 and q.coords().shape == (0, 2)
    q.enqueue(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert q.filled == 2 and not q.is_full
    # only real coordinates are handed out, never the zero-initialised slots
    assert q.coords().tolist() == [[1.0, 1.0], [2.0, 2.0]]
    q.enqueue(torch.tensor([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0], [6.0, 6.0]]))
    assert q.is_full and q.filled == 5
    assert sorted(v[0] for v in q.coords().tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]  # 1 was the oldest
    q.enqueue(torch.arange(14, dtype=torch.float64).view(7, 2))  # more than the capacity: keep the newest
    assert sorted(v[0] for v in q.coords().tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    assert q.coords().dtype == torch.float64


def test_queue_state_roundtrip():
    q = CoordinateQueue(4)
    q.enqueue(torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]))
    r = CoordinateQueue(4)
    r.load_state(q.state())
    assert r.filled == 3 and torch.equal(r.coords(), q.coords())
    r.enqueue(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert r.is_full and int(r.ptr) == 1
