"""Localising the RS token grid at the street-view position.

Coordinates: the data contract gives the SV position inside the tile as ``rel_xy = (x, y)`` in [0, 1], measured
from the tile's top-left corner (``x`` east / column, ``y`` down / row), in the tile's own pixel grid. The query is
``q = 2 * (x, y) - 1`` in [-1, 1] (``q[..., 0]`` indexes the width W, ``q[..., 1]`` the height H, the
``grid_sample`` convention with ``align_corners=False``: cell ``i`` of ``N`` has its centre at
``-1 + (2i + 1) / N``).

* :class:`NILI`: Neural Implicit Local Interpolation (LIIF-style local implicit function, DESIGN.md section 2).
* :class:`GridSampleLocalizer`: baselines ``mean`` (mean-pool, no alignment), ``centre`` (centre token),
  ``bilinear`` and ``bicubic`` sampling of the token grid, followed by a Linear to the embedding dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LOCALIZERS = ("nili", "mean", "centre", "bilinear", "bicubic")


def rel_xy_to_query(rel_xy: torch.Tensor) -> torch.Tensor:
    """Map the contract's relative position ``(x, y)`` in [0, 1] (from the top-left) to ``q`` in [-1, 1]."""
    if not rel_xy.is_floating_point():
        rel_xy = rel_xy.float()
    return 2.0 * rel_xy - 1.0


def cell_index(q: torch.Tensor, n: int) -> torch.Tensor:
    """Index of the cell (of ``n``, ``align_corners=False``) containing coordinate ``q`` in [-1, 1]."""
    return torch.floor((q + 1.0) * 0.5 * n).long().clamp_(0, n - 1)


def cell_centre(idx: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centre ``-1 + (2i + 1) / n`` of cell ``i`` in [-1, 1] coordinates."""
    return -1.0 + (2.0 * idx.to(dtype) + 1.0) / n


class NILI(nn.Module):
    """Neural Implicit Local Interpolation over a ``B x D x H x W`` token grid.

    For a query ``q`` and each of the 4 neighbours ``(vx, vy) in {-1, +1}^2``: shift ``q`` by half a cell
    (``vx / W``, ``vy / H``) plus ``1e-6``, clamp inside (-1, 1), take the cell containing the shifted point, its
    zero-padded 3x3-unfolded feature ``z`` (``9 * D``) and centre ``c``; the offset is ``d = (q - c) * (W, H)``
    (one cell spans 2 units); the prediction is ``Linear([z ; d])``. The 4 predictions are blended with weights
    ``|d_x * d_y|`` of the diagonally opposite neighbour (LIIF's swap), normalised to sum to 1.

    Args:
        in_dim: Token dimension ``D``.
        out_dim: Output embedding dimension.
        local_ensemble: Blend the 4 neighbours (True, the reference) or use only the nearest cell.
        eps_shift: The ``1e-6`` added to the shift (LIIF).
    """

    def __init__(self, in_dim: int, out_dim: int, *, local_ensemble: bool = True, eps_shift: float = 1e-6) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.local_ensemble = local_ensemble
        self.eps_shift = eps_shift
        self.decoder = nn.Linear(9 * in_dim + 2, out_dim)

    @staticmethod
    def unfold(grid: torch.Tensor) -> torch.Tensor:
        """Zero-padded 3x3 unfold: ``B x D x H x W`` -> ``B x 9D x H x W``."""
        b, d, h, w = grid.shape
        return F.unfold(grid, kernel_size=3, padding=1).view(b, d * 9, h, w)

    def neighbours(self, q: torch.Tensor, h: int, w: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The 4 (or 1) neighbour cells of each query.

        Args:
            q: ``B x 2`` queries ``(x, y)`` in [-1, 1].
            h: Grid height.
            w: Grid width.

        Returns:
            A list of ``(col, row, d)`` per neighbour: ``B`` long column/row indices and ``B x 2`` offsets
            ``d = (q - c) * (W, H)``. Order: ``(vx, vy) = (-1,-1), (-1,+1), (+1,-1), (+1,+1)``.
        """
        shifts = [(-1, -1), (-1, 1), (1, -1), (1, 1)] if self.local_ensemble else [(0, 0)]
        rx, ry = 1.0 / w, 1.0 / h  # half a cell in [-1, 1] units
        lim = 1.0 - 1e-6
        out = []
        for vx, vy in shifts:
            qx = q[:, 0]
            qy = q[:, 1]
            if self.local_ensemble:
                qx = (qx + vx * rx + self.eps_shift).clamp(-lim, lim)
                qy = (qy + vy * ry + self.eps_shift).clamp(-lim, lim)
            col = cell_index(qx, w)
            row = cell_index(qy, h)
            centre = torch.stack([cell_centre(col, w, q.dtype), cell_centre(row, h, q.dtype)], dim=-1)
            # Scaled column by column: a (W, H) tensor built here would be a host-to-device copy every step.
            d = q - centre
            out.append((col, row, torch.stack([d[:, 0] * w, d[:, 1] * h], dim=-1)))
        return out

    def forward(self, grid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Localised embedding at ``q``.

        Args:
            grid: ``B x D x H x W`` token grid.
            q: ``B x 2`` queries ``(x, y)`` in [-1, 1] (see :func:`rel_xy_to_query`).

        Returns:
            ``B x out_dim`` localised RS embedding.
        """
        b, _, h, w = grid.shape
        feat = self.unfold(grid).flatten(2)  # B x 9D x (H*W)
        q = q.to(feat.dtype)
        neighbours = self.neighbours(q, h, w)
        preds = []
        for col, row, d in neighbours:
            flat = (row * w + col).view(b, 1, 1).expand(b, feat.shape[1], 1)
            z = feat.gather(2, flat).squeeze(2)  # B x 9D
            preds.append(self.decoder(torch.cat([z, d.to(z.dtype)], dim=-1)))
        if not self.local_ensemble:
            return preds[0]
        weights = self.blend_weights([d for _, _, d in neighbours]).to(preds[0].dtype)
        return sum(pred * weights[:, i : i + 1] for i, pred in enumerate(preds))

    @staticmethod
    def blend_weights(offsets: list[torch.Tensor]) -> torch.Tensor:
        """LIIF weights of the 4 neighbours: ``|d_x * d_y|`` of the diagonally opposite one, normalised to 1.

        The area ``|d_x * d_y|`` factorises into an x part (set by ``vx``) and a y part (set by ``vy``), so the
        normalised weights are computed per axis: ``w(vx, vy) = |d_x(-vx)| / sum_x * |d_y(-vy)| / sum_y``. This
        equals LIIF's ``area / total`` wherever ``total > 0``; where one axis degenerates (a query on the centre
        line of an outer cell, where both x (or y) neighbours are the same cell with ``d = 0``) that axis gets
        ``1/2, 1/2`` (the same cell twice) instead of LIIF's ``0/0`` regularised into uniform weights over all 4,
        which would mix in the wrong row (column).

        Args:
            offsets: The 4 ``B x 2`` offsets in the order ``(-1,-1), (-1,+1), (+1,-1), (+1,+1)``.

        Returns:
            ``B x 4`` weights (same order), non-negative, summing to 1.
        """
        ax = {-1: offsets[0][:, 0].abs(), 1: offsets[2][:, 0].abs()}  # |d_x| for vx = -1, +1
        ay = {-1: offsets[0][:, 1].abs(), 1: offsets[1][:, 1].abs()}  # |d_y| for vy = -1, +1

        def axis(a: dict[int, torch.Tensor], v: int) -> torch.Tensor:
            total = a[-1] + a[1]
            return torch.where(total > 0, a[-v] / total.clamp_min(1e-12), torch.full_like(total, 0.5))

        order = [(-1, -1), (-1, 1), (1, -1), (1, 1)]
        return torch.stack([axis(ax, vx) * axis(ay, vy) for vx, vy in order], dim=-1)

    def weights(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Blending weights (``B x 4``, sum 1) for queries ``q`` on an ``h x w`` grid (for inspection/tests)."""
        if not self.local_ensemble:
            return torch.ones(q.shape[0], 1, dtype=q.dtype)
        return self.blend_weights([d for _, _, d in self.neighbours(q, h, w)])


class GridSampleLocalizer(nn.Module):
    """Baselines: pool/sample the token grid, then a Linear to the embedding dim.

    Args:
        in_dim: Token dimension.
        out_dim: Output embedding dimension.
        mode: ``mean`` (mean of all tokens, ignores the position), ``centre`` (the centre of the grid, ignores the
            position; the mean of the central 2x2 tokens for an even grid), ``bilinear`` or ``bicubic``
            (``grid_sample`` at ``q``, ``align_corners=False``, border padding).
    """

    def __init__(self, in_dim: int, out_dim: int, mode: str = "bilinear") -> None:
        super().__init__()
        if mode not in ("mean", "centre", "center", "bilinear", "bicubic"):
            raise ValueError(f"unknown localizer mode {mode!r}")
        self.mode = "centre" if mode == "center" else mode
        self.proj = nn.Linear(in_dim, out_dim)

    def sample(self, grid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Pooled or sampled token feature (``B x D``) before the projection."""
        if self.mode == "mean":
            return grid.mean(dim=(2, 3))
        if self.mode == "centre":
            q = torch.zeros(grid.shape[0], 2, dtype=grid.dtype, device=grid.device)
            mode = "bilinear"
        else:
            mode = self.mode
        out = F.grid_sample(
            grid, q.to(grid.dtype).view(-1, 1, 1, 2), mode=mode, padding_mode="border", align_corners=False
        )
        return out[:, :, 0, 0]

    def forward(self, grid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Localised (or pooled) embedding, ``B x out_dim``."""
        return self.proj(self.sample(grid, q))


def build_localizer(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build the RS localiser by name.

    Args:
        kind: ``nili`` (default), ``nili_nearest`` (no local ensemble), or a baseline: ``mean``, ``centre``,
            ``bilinear``, ``bicubic``.
        in_dim: Token dimension.
        out_dim: Embedding dimension.

    Returns:
        A module mapping ``(grid B x D x H x W, q B x 2)`` to ``B x out_dim``.
    """
    if kind == "nili":
        return NILI(in_dim, out_dim)
    if kind == "nili_nearest":
        return NILI(in_dim, out_dim, local_ensemble=False)
    return GridSampleLocalizer(in_dim, out_dim, mode=kind)
