"""Location encoders: (lon, lat) in degrees -> embedding.

* :class:`GeoCLIPLocationEncoder` (default): Equal Earth projection -> scale -> three random-Fourier-feature
  branches (sigma 2^0, 2^4, 2^8; 256 fixed Gaussian frequencies each) -> MLP 512->1024->1024->1024 (ReLU) ->
  Linear to the embedding dim; the branch outputs are summed (GeoCLIP).
* :class:`SphericalHarmonicsLocationEncoder`: real spherical harmonics up to degree ``L`` (SatCLIP-like) -> MLP.
* :class:`MLPLocationEncoder`: plain MLP on (lon/180, lat/90).

All encoders take ``B x 2`` tensors ordered **(lon, lat)** in degrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Equal Earth polynomial coefficients (Savric, Patterson & Jenny 2018).
EE_A1 = 1.340264
EE_A2 = -0.081106
EE_A3 = 0.000893
EE_A4 = 0.003796
#: GeoCLIP's scale: ``x * SF / 180`` maps the Equal Earth plane (unit sphere) to roughly [-1, 1].
GEOCLIP_SF = 66.50336


def equal_earth_projection(lonlat: torch.Tensor) -> torch.Tensor:
    """Equal Earth projection on the unit sphere (EPSG:8857 formulas with R = 1).

    Args:
        lonlat: ``... x 2`` tensor of (lon, lat) in degrees.

    Returns:
        ``... x 2`` tensor of (x, y) on the unit sphere; x in about [-2.7066, 2.7066], y in about
        [-1.3173, 1.3173].
    """
    lonlat = lonlat.to(torch.float64) if lonlat.dtype == torch.float64 else lonlat.float()
    lon = torch.deg2rad(lonlat[..., 0])
    lat = torch.deg2rad(lonlat[..., 1])
    theta = torch.asin(math.sqrt(3.0) / 2.0 * torch.sin(lat))
    t2 = theta * theta
    t6 = t2 * t2 * t2
    denom = 3.0 * (9.0 * EE_A4 * t6 * t2 + 7.0 * EE_A3 * t6 + 3.0 * EE_A2 * t2 + EE_A1)
    x = 2.0 * math.sqrt(3.0) * lon * torch.cos(theta) / denom
    y = theta * (EE_A1 + EE_A2 * t2 + t6 * (EE_A3 + EE_A4 * t2))
    return torch.stack([x, y], dim=-1)


def geoclip_normalise(lonlat: torch.Tensor) -> torch.Tensor:
    """GeoCLIP input scaling: Equal Earth (unit sphere) times ``66.50336 / 180`` (roughly [-1, 1])."""
    return equal_earth_projection(lonlat) * (GEOCLIP_SF / 180.0)


class GaussianFourierFeatures(nn.Module):
    """Fixed Gaussian random Fourier features ``[cos(2 pi B v), sin(2 pi B v)]``.

    Args:
        in_dim: Input dimension.
        n_freqs: Number of frequencies (output has ``2 * n_freqs`` features).
        sigma: Standard deviation of the frequencies.
        seed: Seed of the frequency draw (fixed, reproducible, saved as a buffer).
    """

    freqs: torch.Tensor

    def __init__(self, in_dim: int = 2, n_freqs: int = 256, sigma: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.sigma = float(sigma)
        self.register_buffer("freqs", torch.randn(n_freqs, in_dim, generator=gen) * sigma)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Encode ``... x in_dim`` to ``... x 2*n_freqs``.

        Always computed in (at least) float32 with autocast off: with sigma 2^8 the phases reach ~10^3 rad, which
        bf16 cannot resolve.
        """
        dtype = torch.float64 if self.freqs.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=v.device.type, enabled=False):
            proj = 2.0 * math.pi * (v.to(dtype) @ self.freqs.to(dtype).t())
            return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)


def _mlp(in_dim: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
        in_dim = width
    return nn.Sequential(*layers)


class GeoCLIPLocationEncoder(nn.Module):
    """GeoCLIP-style multi-scale RFF location encoder.

    Args:
        embed_dim: Output embedding dimension.
        sigmas: Standard deviations of the RFF branches (``2^0, 2^4, 2^8``).
        n_freqs: Frequencies per branch (256, giving 512 features).
        hidden: Hidden widths of each branch MLP (``1024, 1024, 1024``).
        seed: Base seed of the fixed frequencies (branch ``i`` uses ``seed + i``).
    """

    def __init__(
        self,
        embed_dim: int = 512,
        *,
        sigmas: Sequence[float] = (2.0**0, 2.0**4, 2.0**8),
        n_freqs: int = 256,
        hidden: Sequence[int] = (1024, 1024, 1024),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.rff = nn.ModuleList(GaussianFourierFeatures(2, n_freqs, s, seed=seed + i) for i, s in enumerate(sigmas))
        self.branches = nn.ModuleList(_mlp(2 * n_freqs, hidden) for _ in sigmas)
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], embed_dim) for _ in sigmas)

    def forward(self, lonlat: torch.Tensor) -> torch.Tensor:
        """Encode ``B x 2`` (lon, lat) degrees to ``B x embed_dim``."""
        v = geoclip_normalise(lonlat.float())
        out: torch.Tensor | None = None
        for rff, mlp, head in zip(self.rff, self.branches, self.heads, strict=True):
            branch = head(mlp(rff(v)))
            out = branch if out is None else out + branch
        if out is None:
            raise ValueError("GeoCLIPLocationEncoder has no RFF branch (empty sigmas)")
        return out


def real_spherical_harmonics(lonlat: torch.Tensor, degree: int) -> torch.Tensor:
    """Orthonormal real spherical harmonics ``Y_l^m`` for ``l < degree`` (``degree**2`` features).

    Computed in float64 with the standard associated-Legendre recurrences (no Condon-Shortley phase).
    Ordering: for each ``l``, ``m = -l..l``.

    Args:
        lonlat: ``B x 2`` (lon, lat) in degrees.
        degree: Number of degrees ``L`` (``l = 0..L-1``).

    Returns:
        ``B x degree**2`` float64 tensor.
    """
    lon = torch.deg2rad(lonlat[..., 0].double())
    colat = torch.deg2rad(90.0 - lonlat[..., 1].double())
    x = torch.cos(colat)
    s = torch.sin(colat).clamp_min(0.0)
    # p[l][m] = P_l^m(x) without the Condon-Shortley phase.
    p: dict[tuple[int, int], torch.Tensor] = {(0, 0): torch.ones_like(x)}
    for m in range(1, degree):
        p[(m, m)] = p[(m - 1, m - 1)] * (2 * m - 1) * s
    for m in range(degree):
        if m + 1 < degree:
            p[(m + 1, m)] = x * (2 * m + 1) * p[(m, m)]
        for ell in range(m + 2, degree):
            p[(ell, m)] = ((2 * ell - 1) * x * p[(ell - 1, m)] - (ell + m - 1) * p[(ell - 2, m)]) / (ell - m)
    feats = []
    for ell in range(degree):
        for m in range(-ell, ell + 1):
            am = abs(m)
            k = math.sqrt((2 * ell + 1) / (4 * math.pi) * math.factorial(ell - am) / math.factorial(ell + am))
            if m == 0:
                feats.append(k * p[(ell, 0)])
            elif m > 0:
                feats.append(math.sqrt(2.0) * k * p[(ell, am)] * torch.cos(am * lon))
            else:
                feats.append(math.sqrt(2.0) * k * p[(ell, am)] * torch.sin(am * lon))
    return torch.stack(feats, dim=-1)


class SphericalHarmonicsLocationEncoder(nn.Module):
    """SatCLIP-like baseline: real spherical harmonics (``degree**2`` features) -> MLP -> Linear.

    Args:
        embed_dim: Output dimension.
        degree: Number of SH degrees ``L`` (SatCLIP uses 10 or 40; low degree is fine here).
        hidden: Hidden widths of the MLP.
    """

    def __init__(self, embed_dim: int = 512, *, degree: int = 10, hidden: Sequence[int] = (512, 512)) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.degree = degree
        self.mlp = _mlp(degree * degree, hidden)
        self.head = nn.Linear(hidden[-1] if hidden else degree * degree, embed_dim)

    def forward(self, lonlat: torch.Tensor) -> torch.Tensor:
        """Encode ``B x 2`` (lon, lat) degrees to ``B x embed_dim``."""
        feats = real_spherical_harmonics(lonlat, self.degree).to(self.head.weight.dtype)
        return self.head(self.mlp(feats))


class MLPLocationEncoder(nn.Module):
    """Plain MLP on normalised coordinates ``(lon / 180, lat / 90)``.

    Args:
        embed_dim: Output dimension.
        hidden: Hidden widths.
    """

    def __init__(self, embed_dim: int = 512, *, hidden: Sequence[int] = (256, 256, 256)) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp = _mlp(2, hidden)
        self.head = nn.Linear(hidden[-1] if hidden else 2, embed_dim)

    def forward(self, lonlat: torch.Tensor) -> torch.Tensor:
        """Encode ``B x 2`` (lon, lat) degrees to ``B x embed_dim``."""
        lonlat = lonlat.float()
        v = torch.stack([lonlat[:, 0] / 180.0, lonlat[:, 1] / 90.0], dim=-1)  # no host-to-device copy per step
        return self.head(self.mlp(v))


LOCATION_ENCODERS = ("geoclip", "sh", "mlp")


def build_location_encoder(
    kind: str = "geoclip",
    embed_dim: int = 512,
    *,
    hidden: Sequence[int] | None = None,
    n_freqs: int = 256,
    sigmas: Sequence[float] = (2.0**0, 2.0**4, 2.0**8),
    sh_degree: int = 10,
    seed: int = 0,
) -> nn.Module:
    """Build a location encoder by name.

    Args:
        kind: ``geoclip`` (RFF, default), ``sh`` (spherical harmonics) or ``mlp``.
        embed_dim: Output dimension.
        hidden: Hidden widths (defaults: geoclip ``1024x3``, sh ``512x2``, mlp ``256x3``).
        n_freqs: RFF frequencies per branch (geoclip).
        sigmas: RFF branch sigmas (geoclip).
        sh_degree: Number of SH degrees (sh).
        seed: Seed of the fixed RFF frequencies (geoclip).

    Returns:
        An ``nn.Module`` mapping ``B x 2`` (lon, lat) degrees to ``B x embed_dim``.
    """
    if kind == "geoclip":
        return GeoCLIPLocationEncoder(
            embed_dim, sigmas=sigmas, n_freqs=n_freqs, hidden=tuple(hidden or (1024, 1024, 1024)), seed=seed
        )
    if kind == "sh":
        return SphericalHarmonicsLocationEncoder(embed_dim, degree=sh_degree, hidden=tuple(hidden or (512, 512)))
    if kind == "mlp":
        return MLPLocationEncoder(embed_dim, hidden=tuple(hidden or (256, 256, 256)))
    raise ValueError(f"unknown location encoder {kind!r}; choose from {LOCATION_ENCODERS}")
