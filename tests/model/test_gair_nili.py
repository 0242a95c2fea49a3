"""Geometry of NILI and the sampling baselines (x east/column, y down/row, align_corners=False)."""

import pytest
import torch
from torch.nn import functional as F

from gair_model.models.nili import NILI, GridSampleLocalizer, build_localizer, cell_centre, rel_xy_to_query

torch.set_num_threads(1)

H, W, D = 3, 5, 4  # non-square on purpose: a swapped x/y would index out of the grid or change results


def _nili(seed: int = 0, out_dim: int = 6, **kw) -> NILI:
    torch.manual_seed(seed)
    m = NILI(D, out_dim, **kw)
    torch.nn.init.normal_(m.decoder.weight, std=1.0 / (9 * D + 2) ** 0.5)
    torch.nn.init.normal_(m.decoder.bias, std=0.1)
    return m.double()


def _grid(b: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, H, W, generator=g, dtype=torch.float64)


def _cell_prediction(m: NILI, grid: torch.Tensor, row: int, col: int, d=(0.0, 0.0)) -> torch.Tensor:
    z = NILI.unfold(grid)[:, :, row, col]
    dd = torch.tensor([d], dtype=grid.dtype).expand(grid.shape[0], 2)
    return m.decoder(torch.cat([z, dd], dim=-1))


def _pass_token_decoder(m: NILI) -> NILI:
    """Decoder that outputs the centre element of the 3x3 unfold (the token itself) for D=1."""
    with torch.no_grad():
        m.decoder.weight.zero_()
        m.decoder.bias.zero_()
        m.decoder.weight[0, 4] = 1.0  # unfold channel index d*9 + k, centre k = 4
    return m


def test_rel_xy_to_query():
    q = rel_xy_to_query(torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.25]]))
    assert torch.allclose(q, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, -0.5]]))


def test_cell_centres_align_corners_false():
    assert torch.allclose(cell_centre(torch.arange(4), 4), torch.tensor([-0.75, -0.25, 0.25, 0.75]))


@pytest.mark.parametrize("row", range(H))
@pytest.mark.parametrize("col", range(W))
def test_query_at_cell_centre_gives_that_cells_prediction(row, col):
    m, grid = _nili(), _grid(b=2)
    rel = torch.tensor([[(col + 0.5) / W, (row + 0.5) / H]] * 2, dtype=torch.float64)
    out = m(grid, rel_xy_to_query(rel))
    expected = _cell_prediction(m, grid, row, col)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_weights_sum_to_one_and_are_bilinear():
    m = _nili()
    q = torch.rand(500, 2, dtype=torch.float64) * 2 - 1
    w = m.weights(q, H, W)
    assert w.shape == (500, 4)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(500, dtype=torch.float64))
    # Interior query between 4 centres: weights are the bilinear ones.
    qx = cell_centre(torch.tensor(1), W) + 0.3 * 2 / W
    qy = cell_centre(torch.tensor(0), H) + 0.6 * 2 / H
    w = m.weights(torch.tensor([[qx, qy]], dtype=torch.float64), H, W)[0]
    # order (vx, vy): (-1,-1) -> cell (col 1,row 0); (-1,+1) -> (1,1); (+1,-1) -> (2,0); (+1,+1) -> (2,1)
    expected = torch.tensor([0.7 * 0.4, 0.7 * 0.6, 0.3 * 0.4, 0.3 * 0.6], dtype=torch.float64)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-4)


def test_equals_bilinear_grid_sample_with_token_decoder():
    """With a decoder passing the token through, NILI is bilinear sampling (border padding) of the grid."""
    torch.manual_seed(0)
    m = _pass_token_decoder(NILI(1, 1).double())
    grid = torch.randn(1, 1, H, W, dtype=torch.float64)
    q = torch.rand(300, 2, dtype=torch.float64) * 2 - 1
    out = m(grid.expand(300, -1, -1, -1), q)[:, 0]
    ref = F.grid_sample(
        grid.expand(300, -1, -1, -1), q.view(300, 1, 1, 2), mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0, 0, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_x_is_east_column_and_y_is_down_row():
    m = _pass_token_decoder(NILI(1, 1).double())
    cols = torch.arange(W, dtype=torch.float64).view(1, 1, 1, W).expand(1, 1, H, W)
    rows = torch.arange(H, dtype=torch.float64).view(1, 1, H, 1).expand(1, 1, H, W)

    def at(grid, x, y):
        return m(grid, rel_xy_to_query(torch.tensor([[x, y]], dtype=torch.float64)))[0, 0].item()

    # moving east (x up) changes the column, not the row
    assert at(cols, 0.9, 0.5) > at(cols, 0.1, 0.5) + 2.0
    assert at(rows, 0.9, 0.5) == pytest.approx(at(rows, 0.1, 0.5))
    # moving down (y up) changes the row, not the column
    assert at(rows, 0.5, 0.9) > at(rows, 0.5, 0.1) + 1.0
    assert at(cols, 0.5, 0.9) == pytest.approx(at(cols, 0.5, 0.1))
    # top-left query reads the top-left token, bottom-right the bottom-right one
    assert at(cols, 0.0, 0.0) == pytest.approx(0.0) and at(rows, 0.0, 0.0) == pytest.approx(0.0)
    assert at(cols, 1.0, 1.0) == pytest.approx(W - 1) and at(rows, 1.0, 1.0) == pytest.approx(H - 1)


@pytest.mark.parametrize("x,y", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_corners(x, y):
    m, grid = _nili(), _grid()
    out = m(grid, rel_xy_to_query(torch.tensor([[x, y]], dtype=torch.float64)))
    row, col = (H - 1 if y else 0), (W - 1 if x else 0)
    d = (1.0 if x else -1.0, 1.0 if y else -1.0)  # (q - c) * (W, H): half a cell = 1 unit
    torch.testing.assert_close(out, _cell_prediction(m, grid, row, col, d), atol=1e-5, rtol=1e-5)


def test_edges_finite_and_in_range():
    m, grid = _nili(), _grid()
    t = torch.linspace(0, 1, 41, dtype=torch.float64)
    edges = torch.cat(
        [
            torch.stack([t, torch.zeros_like(t)], 1),
            torch.stack([t, torch.ones_like(t)], 1),
            torch.stack([torch.zeros_like(t), t], 1),
            torch.stack([torch.ones_like(t), t], 1),
        ]
    )
    out = m(grid.expand(len(edges), -1, -1, -1), rel_xy_to_query(edges))
    assert torch.isfinite(out).all()


def _max_jump(m: NILI, grid: torch.Tensor, axis: int, fixed: float, delta: float = 1e-5) -> float:
    """Largest output change across every cell border and centre line along ``axis``."""
    n = W if axis == 0 else H
    lines = torch.arange(1, 2 * n, dtype=torch.float64) / (2 * n)  # borders and centres, interior
    jumps = []
    for sign in (-1, 1):
        pts = lines + sign * delta
        rel = torch.stack([pts, torch.full_like(pts, fixed)], 1)
        if axis == 1:
            rel = rel.flip(1)
        jumps.append(m(grid.expand(len(rel), -1, -1, -1), rel_xy_to_query(rel)))
    return (jumps[0] - jumps[1]).abs().max().item()


@pytest.mark.parametrize("axis", [0, 1])
def test_continuous_across_cell_borders(axis):
    m, grid = _nili(), _grid()
    for fixed in (0.13, 0.5, 0.77):
        assert _max_jump(m, grid, axis, fixed) < 5e-3
    # sanity check of the test: the nearest-cell variant (no local ensemble) jumps at cell borders
    nearest = _nili(local_ensemble=False)
    assert _max_jump(nearest, grid, axis, 0.5) > 5e-2


def test_gradients_reach_grid_and_decoder():
    m = _nili()
    grid = _grid(b=3).requires_grad_(True)
    out = m(grid, torch.rand(3, 2, dtype=torch.float64) * 2 - 1)
    out.sum().backward()
    assert grid.grad.abs().sum() > 0 and m.decoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_sampling_baselines_hit_tokens_at_cell_centres(mode):
    loc = GridSampleLocalizer(D, 2, mode=mode).double()
    grid = _grid(b=1)
    for row in range(H):
        for col in range(W):
            rel = torch.tensor([[(col + 0.5) / W, (row + 0.5) / H]], dtype=torch.float64)
            torch.testing.assert_close(loc.sample(grid, rel_xy_to_query(rel))[0], grid[0, :, row, col])


def test_mean_and_centre_baselines_ignore_position():
    grid = _grid(b=1)
    q1, q2 = torch.tensor([[-0.9, -0.9]], dtype=torch.float64), torch.tensor([[0.8, 0.4]], dtype=torch.float64)
    mean = GridSampleLocalizer(D, 2, mode="mean").double()
    torch.testing.assert_close(mean.sample(grid, q1), grid.mean((2, 3)))
    torch.testing.assert_close(mean.sample(grid, q1), mean.sample(grid, q2))
    centre = GridSampleLocalizer(D, 2, mode="centre").double()
    torch.testing.assert_close(centre.sample(grid, q1), grid[:, :, H // 2, W // 2])  # odd grid: the centre token
    torch.testing.assert_close(centre.sample(grid, q1), centre.sample(grid, q2))


@pytest.mark.parametrize("kind", ["nili", "mean", "centre", "bilinear", "bicubic"])
def test_build_localizer(kind):
    m = build_localizer(kind, D, 7)
    out = m(torch.randn(2, D, H, W), torch.rand(2, 2) * 2 - 1)
    assert out.shape == (2, 7)
    with pytest.raises(ValueError):
        build_localizer("nearest-neighbour-please", D, 7)


def test_blend_weights_equal_liif_area_swap():
    """Away from the degenerate outer centre lines the weights are LIIF's swapped areas / total."""
    m = _nili()
    q = torch.rand(400, 2, dtype=torch.float64) * 1.6 - 0.8
    ds = [d for _, _, d in m.neighbours(q, H, W)]
    areas = [(d[:, 0] * d[:, 1]).abs() + 1e-9 for d in ds]
    areas[0], areas[3] = areas[3], areas[0]
    areas[1], areas[2] = areas[2], areas[1]
    ref = torch.stack(areas, -1)
    ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(NILI.blend_weights(ds), ref, atol=1e-6, rtol=1e-5)
