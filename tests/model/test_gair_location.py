"""Location encoders: Equal Earth projection, RFF scales, spherical harmonics, baselines."""

import math

import pytest
import torch
from torch.nn import functional as F

from gair_model.models.location import (
    GaussianFourierFeatures,
    GeoCLIPLocationEncoder,
    build_location_encoder,
    equal_earth_projection,
    geoclip_normalise,
    real_spherical_harmonics,
)

torch.set_num_threads(1)

# Published Equal Earth (EPSG:8857, WGS84 authalic sphere R = 6371007.181 m) extents and PROJ
# (+proj=eqearth +R=1) values.
R_AUTHALIC = 6371007.181
KNOWN_UNIT_SPHERE = [
    ((0.0, 0.0), (0.0, 0.0)),
    ((180.0, 0.0), (2.7066299836960748, 0.0)),
    ((0.0, 90.0), (0.0, 1.3173627591574133)),
    ((180.0, 90.0), (1.6035886482840516, 1.3173627591574133)),
    ((-180.0, -90.0), (-1.6035886482840516, -1.3173627591574133)),
    ((13.4, 52.5), (0.1627644995627186, 0.9803646718999339)),
    ((-122.4, 37.8), (-1.6531543051137152, 0.7357536587307838)),
    ((151.2, -33.9), (2.0866400672259036, -0.6652554426964438)),
]


@pytest.mark.parametrize("lonlat,xy", KNOWN_UNIT_SPHERE)
def test_equal_earth_known_values(lonlat, xy):
    out = equal_earth_projection(torch.tensor([lonlat], dtype=torch.float64))[0]
    assert out.tolist() == pytest.approx(list(xy), abs=1e-12)


def test_equal_earth_published_extent_in_metres():
    out = equal_earth_projection(torch.tensor([[180.0, 0.0], [0.0, 90.0]], dtype=torch.float64)) * R_AUTHALIC
    assert out[0, 0].item() == pytest.approx(17243959.06, abs=1.0)
    assert out[1, 1].item() == pytest.approx(8392927.6, abs=1.0)


def test_equal_earth_matches_pyproj():
    pyproj = pytest.importorskip("pyproj")
    proj = pyproj.Proj("+proj=eqearth +R=1")
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(50, 2, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0]) - torch.tensor(
        [180.0, 90.0]
    )
    x, y = proj(pts[:, 0].numpy(), pts[:, 1].numpy())
    out = equal_earth_projection(pts)
    assert torch.allclose(out[:, 0], torch.as_tensor(x), atol=1e-10)
    assert torch.allclose(out[:, 1], torch.as_tensor(y), atol=1e-10)


def test_geoclip_normalisation_roughly_unit_range():
    v = geoclip_normalise(torch.tensor([[180.0, 0.0], [0.0, 90.0]], dtype=torch.float64))
    assert v[0, 0].item() == pytest.approx(1.0, abs=1e-3)  # lon 180 at the equator -> ~1
    assert 0.4 < v[1, 1].item() < 0.5


def _offset_km_east(lonlat: torch.Tensor, km: float) -> torch.Tensor:
    out = lonlat.clone()
    out[:, 0] += km / (111.32 * torch.cos(torch.deg2rad(lonlat[:, 1])))
    return out


def _rff_similarity(sigma: float, km: float, seed: int = 0) -> float:
    rff = GaussianFourierFeatures(2, 256, sigma, seed=seed).double()
    g = torch.Generator().manual_seed(1)
    base = torch.rand(64, 2, generator=g, dtype=torch.float64) * torch.tensor([300.0, 100.0]) - torch.tensor(
        [150.0, 50.0]
    )
    a = rff(geoclip_normalise(base))
    b = rff(geoclip_normalise(_offset_km_east(base, km)))
    return F.cosine_similarity(a, b, dim=-1).mean().item()


@pytest.mark.parametrize(
    "sigma,near_km,far_km",
    [
        (2.0**8, 1.0, 300.0),  # street / city scale
        (2.0**4, 30.0, 3000.0),  # region scale
        (2.0**0, 300.0, 15000.0),  # continent scale
    ],
)
def test_rff_branches_separate_near_and_far_at_their_scale(sigma, near_km, far_km):
    assert _rff_similarity(sigma, near_km) > 0.9
    assert abs(_rff_similarity(sigma, far_km)) < 0.25


def test_rff_frequencies_are_fixed_buffers():
    enc = GeoCLIPLocationEncoder(32, hidden=(16, 16, 16), seed=3)
    names = dict(enc.named_buffers())
    assert {"rff.0.freqs", "rff.1.freqs", "rff.2.freqs"} <= set(names)
    assert all("freqs" not in n for n, _ in enc.named_parameters())
    again = GeoCLIPLocationEncoder(32, hidden=(16, 16, 16), seed=3)
    assert torch.equal(enc.rff[2].freqs, again.rff[2].freqs)
    assert enc.rff[0].freqs.shape == (256, 2)
    assert enc.rff[2].freqs.std().item() == pytest.approx(256, rel=0.15)


def test_geoclip_encoder_architecture_and_near_far():
    torch.manual_seed(0)
    enc = GeoCLIPLocationEncoder(512)
    linears = [m for m in enc.branches[0] if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 1024), (1024, 1024), (1024, 1024)]
    assert enc.heads[0].out_features == 512 and len(enc.branches) == 3
    base = torch.tensor([[2.35, 48.85], [-74.0, 40.7], [139.7, 35.7]], dtype=torch.float64)
    with torch.no_grad():
        e0 = F.normalize(enc(base), dim=-1)
        near = F.normalize(enc(_offset_km_east(base, 0.5)), dim=-1)
        far = F.normalize(enc(_offset_km_east(base, 2000.0)), dim=-1)
    sim_near = (e0 * near).sum(-1)
    sim_far = (e0 * far).sum(-1)
    assert (sim_near > 0.99).all()
    assert (sim_far < sim_near - 0.01).all()


def test_spherical_harmonics_values_and_orthonormality():
    pole = real_spherical_harmonics(torch.tensor([[0.0, 90.0]]), 2)[0]
    assert pole[0].item() == pytest.approx(0.5 / math.sqrt(math.pi))
    assert pole[2].item() == pytest.approx(math.sqrt(3 / (4 * math.pi)))  # Y_1^0 = sqrt(3/4pi) cos(colat)
    # Numerical Gram matrix on a lat/lon grid (midpoint rule) ~ identity.
    n_lat, n_lon = 90, 180
    lat = (torch.arange(n_lat, dtype=torch.float64) + 0.5) / n_lat * 180 - 90
    lon = (torch.arange(n_lon, dtype=torch.float64) + 0.5) / n_lon * 360 - 180
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    y = real_spherical_harmonics(torch.stack([lo.flatten(), la.flatten()], -1), 4)
    area = torch.cos(torch.deg2rad(la.flatten())) * (math.pi / n_lat) * (2 * math.pi / n_lon)
    gram = (y * area[:, None]).t() @ y
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=2e-3)


@pytest.mark.parametrize("kind", ["geoclip", "sh", "mlp"])
def test_build_location_encoder(kind):
    enc = build_location_encoder(kind, 24, hidden=[32, 32], n_freqs=16, sh_degree=4)
    out = enc(torch.tensor([[10.0, 20.0], [-170.0, -80.0]], dtype=torch.float64))
    assert out.shape == (2, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    with pytest.raises(ValueError):
        build_location_encoder("sphere9000")


def test_rff_precision_survives_bf16_autocast():
    rff = GaussianFourierFeatures(2, 64, 2.0**8, seed=0)
    v = geoclip_normalise(torch.tensor([[2.35, 48.85], [2.36, 48.85]]))
    ref = rff(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rff(v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
