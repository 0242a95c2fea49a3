"""The pretrained GeoCLIP location encoder (Vivanco Cepeda et al., NeurIPS 2023) as an evaluation baseline.

The weights ship inside the ``geoclip`` wheel (``geoclip/model/weights/location_encoder_weights.pth``). Importing
``geoclip`` pulls in ``transformers`` (seconds), so this module only *locates* the installed package with
:func:`importlib.util.find_spec` (which does not execute it) and loads the state dict into
:class:`GeoCLIPLocation`, a line-for-line reproduction of ``geoclip.model.location_encoder.LocationEncoder``:
Equal Earth projection of (lat, lon)-ordered degrees scaled by ``66.50336 / 180``, then three capsules
(Gaussian random Fourier features with a stored ``b`` matrix, sigma 2^0, 2^4, 2^8, 256 frequencies -> MLP
512->1024->1024->1024 with ReLU -> Linear 1024->512), summed.

GeoCLIP orders coordinates **(lat, lon)**; every public function here takes **(lon, lat)** like the GAIR
encoders and swaps internally. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

GEOCLIP_SIGMAS = (2**0, 2**4, 2**8)
GEOCLIP_DIM = 512
WEIGHTS_RELPATH = Path("model") / "weights" / "location_encoder_weights.pth"

# GeoCLIP's Equal Earth constants (geoclip/model/location_encoder.py).
_A1 = 1.340264
_A2 = -0.081106
_A3 = 0.000893
_A4 = 0.003796
_SF = 66.50336


class GeoCLIPUnavailable(ImportError):
    """The ``geoclip`` package (and so its pretrained weights) is not installed."""


def geoclip_weights_path() -> Path:
    """Path of the pretrained location-encoder weights inside the installed ``geoclip`` package.

    Raises:
        GeoCLIPUnavailable: ``geoclip`` is not installed, or its wheel lacks the weights file.
    """
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
        raise GeoCLIPUnavailable(
            "the 'geoclip' package is not installed (pip install geoclip==1.3.0; its wheel carries the weights); "
            "the geoclip_pretrained baseline needs it and never downloads anything"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_RELPATH
    if not path.is_file():
        raise GeoCLIPUnavailable(f"geoclip is installed but its location-encoder weights are missing: {path}")
    return path


def _equal_earth_latlon(latlon: torch.Tensor) -> torch.Tensor:
    """GeoCLIP's scaled Equal Earth projection of ``B x 2`` (lat, lon) degrees (same operations, same order)."""
    latitude = latlon[:, 0]
    longitude = latlon[:, 1]
    latitude_rad = torch.deg2rad(latitude)
    longitude_rad = torch.deg2rad(longitude)
    sqrt3 = torch.sqrt(torch.tensor(3.0))
    theta = torch.asin((sqrt3 / 2) * torch.sin(latitude_rad))
    denominator = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
    x = (2 * sqrt3 * longitude_rad * torch.cos(theta)) / denominator
    y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
    return (torch.stack((x, y), dim=1) * _SF) / 180


class _GaussianEncoding(nn.Module):
    """``[cos(2 pi v B^T), sin(2 pi v B^T)]`` with a stored ``b`` (``encoded x input``), as ``rff.GaussianEncoding``."""

    def __init__(self, encoded_size: int = 256, input_size: int = 2) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(encoded_size, input_size), requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vp = 2 * np.pi * v @ self.b.T
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)


class _Capsule(nn.Module):
    """One GeoCLIP branch: RFF -> 3 x (Linear + ReLU) -> Linear head (state-dict names as in GeoCLIP)."""

    def __init__(self) -> None:
        super().__init__()
        self.capsule = nn.Sequential(
            _GaussianEncoding(256, 2),
            nn.Linear(512, 1024), nn.ReLU(),
            nn.Linear(1024, 1024), nn.ReLU(),
            nn.Linear(1024, 1024), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(1024, GEOCLIP_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.capsule(x))


class GeoCLIPLocation(nn.Module):
    """GeoCLIP's location encoder (512-d output) with a (lon, lat) interface.

    The state dict has GeoCLIP's key names (``LocEnc{i}.capsule.0.b``, ...), so the shipped weights load
    strictly. Use :func:`load_geoclip_location` for the pretrained model.
    """

    def __init__(self, n_capsules: int = len(GEOCLIP_SIGMAS)) -> None:
        super().__init__()
        self.n = n_capsules
        for i in range(n_capsules):
            self.add_module(f"LocEnc{i}", _Capsule())

    def forward_latlon(self, latlon: torch.Tensor) -> torch.Tensor:
        """Encode ``B x 2`` (lat, lon) degrees (GeoCLIP's own order) to ``B x 512``."""
        location = _equal_earth_latlon(latlon.float())
        features = torch.zeros(location.shape[0], GEOCLIP_DIM, device=location.device)
        for i in range(self.n):
            features += self.get_submodule(f"LocEnc{i}")(location)
        return features

    def forward(self, lonlat: torch.Tensor) -> torch.Tensor:
        """Encode ``B x 2`` (lon, lat) degrees (the GAIR order) to ``B x 512``."""
        return self.forward_latlon(lonlat[:, [1, 0]])


def load_geoclip_location(device: str | torch.device = "cpu") -> GeoCLIPLocation:
    """The pretrained GeoCLIP location encoder from the installed package, in eval mode.

    Args:
        device: Where to put it.

    Raises:
        GeoCLIPUnavailable: ``geoclip`` is not installed.
    """
    state = torch.load(geoclip_weights_path(), map_location="cpu", weights_only=True)
    model = GeoCLIPLocation()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


@torch.no_grad()
def geoclip_embed(lonlat: np.ndarray, *, model: GeoCLIPLocation | None = None, batch_size: int = 4096) -> np.ndarray:
    """Pretrained GeoCLIP embeddings of (lon, lat) degrees.

    Args:
        lonlat: ``N x 2`` array ordered (lon, lat).
        model: A loaded encoder (default: :func:`load_geoclip_location`).
        batch_size: Points per forward pass.

    Returns:
        ``N x 512`` float32 array.
    """
    model = model or load_geoclip_location()
    device = next(model.parameters()).device
    pts = torch.as_tensor(np.asarray(lonlat, dtype=np.float32).reshape(-1, 2))
    out = [model(pts[i:i + batch_size].to(device)).cpu() for i in range(0, len(pts), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, GEOCLIP_DIM), np.float32)
