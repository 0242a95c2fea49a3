"""A synthetic world shared by the sample region's satellite bands and street-view photos.

**Synthetic data.** One land-cover map (10 m cells in a UTM grid) drives both sensors:

- the Sentinel-2-like bands are per-class spectra (plus date effects, noise and clouds) rendered from it;
- each street-view image is a tiny ray-caster standing at the point and looking along its heading: ground
  colours come from the cover under the camera, forest and building walls rise where a ray first hits them.

So what an SV image shows depends on where it stands and what lies in its view, not on a colour code of its
position: two cameras 20 m apart see nearly the same walls, two 300 m apart usually do not.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

WATER, FOREST, GRASS, URBAN, ROAD, BARE = range(6)
CLASS_NAMES = ("water", "forest", "grass", "urban", "road", "bare")

#: Sentinel-2 L2A band names in asset order, with their native resolution in metres.
S2_BANDS: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}
#: Surface reflectance x 10000 per class, in ``S2_BANDS`` order (typical published spectra, rounded).
_SPECTRA = np.array([
    # B01  B02  B03  B04  B05  B06  B07  B08  B8A  B09  B11  B12
    [700, 600, 550, 350, 300, 250, 230, 200, 180, 120, 100, 80],          # water
    [300, 250, 420, 220, 700, 2200, 2800, 3000, 3100, 900, 1400, 650],    # forest
    [450, 420, 750, 520, 1200, 2800, 3300, 3500, 3600, 1100, 2200, 1200],  # grass / crops
    [1300, 1250, 1350, 1450, 1550, 1650, 1700, 1750, 1800, 700, 2300, 2100],  # urban
    [1000, 1050, 1100, 1150, 1200, 1250, 1280, 1300, 1320, 600, 1700, 1500],  # road
    [900, 950, 1250, 1600, 1900, 2100, 2250, 2400, 2500, 900, 3200, 2700],   # bare soil
], dtype=np.float32)

#: Ground and wall colours (RGB) for the street-level renderer.
_GROUND_RGB = np.array([[40, 80, 140], [60, 90, 45], [95, 150, 60], [140, 135, 125], [70, 70, 75],
                        [150, 120, 85]], dtype=np.float32)
_WALL_HEIGHT = np.array([0.0, 16.0, 0.0, 12.0, 0.0, 0.0], dtype=np.float32)  # metres, 0 = not tall
_EYE_HEIGHT = 2.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Gaussian-filtered white noise (via FFT), normalised to zero mean and unit std."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * scale_px) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


@dataclass
class LandCover:
    """A land-cover raster in a UTM CRS.

    Attributes:
        classes: ``uint8`` array (rows from the north) of class codes.
        origin_x: easting of the west edge (metres).
        origin_y: northing of the north edge (metres).
        resolution: cell size in metres.
        epsg: the UTM EPSG code.
    """

    classes: np.ndarray
    origin_x: float
    origin_y: float
    resolution: float
    epsg: int

    def lookup(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Class codes at UTM coordinates (grass outside the map)."""
        col = np.floor((x - self.origin_x) / self.resolution).astype(np.int64)
        row = np.floor((self.origin_y - y) / self.resolution).astype(np.int64)
        h, w = self.classes.shape
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out = np.full(np.shape(x), GRASS, dtype=np.uint8)
        out[inside] = self.classes[row[inside], col[inside]]
        return out


def make_land_cover(seed: int, origin_x: float, origin_y: float, size_px: int, resolution: float,
                    epsg: int) -> tuple[LandCover, list[tuple[np.ndarray, np.ndarray]]]:
    """Generate a land-cover map with water, forest, fields, towns and a road network.

    Returns:
        The land cover and the list of road polylines (as arrays of UTM x and y) used to place SV points.
    """
    rng = np.random.default_rng(seed)
    shape = (size_px, size_px)
    relief = _smooth_noise(rng, shape, size_px / 10)
    veg = _smooth_noise(rng, shape, size_px / 25)
    town = _smooth_noise(rng, shape, size_px / 14)
    fine = _smooth_noise(rng, shape, 3)

    classes = np.full(shape, GRASS, dtype=np.uint8)
    classes[veg + 0.3 * fine > 0.55] = FOREST
    classes[(veg < -0.9) & (relief > 0)] = BARE
    urban = town + 0.25 * fine > 0.9
    # Blocky buildings: keep town cells on a 3x3-cell lattice, leaving streets between blocks.
    rows, cols = np.indices(shape)
    blocks = ((rows // 3) % 3 != 2) & ((cols // 3) % 3 != 2)
    classes[urban & blocks] = URBAN
    classes[urban & ~blocks] = ROAD
    classes[relief < -1.3] = WATER

    roads: list[tuple[np.ndarray, np.ndarray]] = []
    extent = size_px * resolution
    for i in range(5):
        # Straight roads crossing the map at random angles, 12 m wide.
        angle = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0.2, 0.8, size=2) * extent
        dx, dy = math.cos(angle), math.sin(angle)
        t = np.linspace(-extent, extent, 4000)
        px, py = cx + t * dx, cy + t * dy
        keep = (px >= 0) & (px < extent) & (py >= 0) & (py < extent)
        px, py = px[keep], py[keep]
        dist = np.abs((cols * resolution + resolution / 2 - cx) * dy - (rows * resolution + resolution / 2 - cy) * dx)
        on_road = dist < 6.0 + (3.0 if i == 0 else 0.0)
        classes[on_road & (classes != WATER)] = ROAD
        roads.append((origin_x + px, origin_y - py))
    return LandCover(classes, origin_x, origin_y, resolution, epsg), roads


@dataclass(frozen=True)
class Acquisition:
    """One synthetic Sentinel-2 acquisition of the land cover."""

    date: str  # ISO datetime, e.g. "2021-06-14T10:30:31.024000Z"
    processing_baseline: str  # e.g. "03.00"; >= "04.00" gets the +1000 DN offset
    season: float  # 0 = winter, 1 = high summer (vegetation vigour)
    cloud_seed: int | None  # None = clear sky


def render_band(cover: LandCover, band: str, acq: Acquisition, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one band (uint16 DN at its native resolution) and the matching cloud mask.

    Returns:
        ``(dn, cloud)``: ``dn`` at the band's resolution, ``cloud`` a boolean mask on the same grid.
    """
    names = list(S2_BANDS)
    bi = names.index(band)
    refl = _SPECTRA[cover.classes, bi].astype(np.float32)
    veg_mask = np.isin(cover.classes, (FOREST, GRASS))
    if S2_BANDS[band] <= 20 and band in ("B06", "B07", "B08", "B8A"):
        refl[veg_mask] *= 0.6 + 0.4 * acq.season
    rng = np.random.default_rng(seed)
    refl *= 1.0 + 0.04 * rng.standard_normal(refl.shape).astype(np.float32)
    cloud = np.zeros(refl.shape, dtype=bool)
    if acq.cloud_seed is not None:
        crng = np.random.default_rng(acq.cloud_seed)
        field = _smooth_noise(crng, refl.shape, refl.shape[0] / 12)
        cloud = field > 1.0
        refl[cloud] = 0.35 * refl[cloud] + 0.65 * (6500 + 300 * field[cloud])
    factor = S2_BANDS[band] // int(round(cover.resolution))
    if factor > 1:
        h, w = refl.shape
        refl = refl[: h - h % factor, : w - w % factor]
        refl = refl.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
        cloud = cloud[: h - h % factor, : w - w % factor]
        cloud = cloud.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)) > 0.5
    offset = 1000.0 if acq.processing_baseline >= "04.00" else 0.0
    dn = np.clip(refl + offset, 1, 65535).astype(np.uint16)
    return dn, cloud


def scl_from(cover: LandCover, cloud20: np.ndarray) -> np.ndarray:
    """A Sentinel-2 scene-classification (SCL) band at 20 m: 4 vegetation, 5 bare, 6 water, 9 cloud."""
    c = cover.classes[::2, ::2][: cloud20.shape[0], : cloud20.shape[1]]
    scl = np.full(c.shape, 5, dtype=np.uint8)
    scl[np.isin(c, (FOREST, GRASS))] = 4
    scl[c == WATER] = 6
    scl[cloud20] = 9
    return scl


def _texture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A position-stable pseudo-random texture in [0, 1) (the same ground looks the same from anywhere)."""
    v = np.sin(np.floor(x) * 12.9898 + np.floor(y) * 78.233) * 43758.5453
    return v - np.floor(v)


def render_street_view(cover: LandCover, x: float, y: float, heading_deg: float, *, width: int = 256,
                       height: int = 192, fov_deg: float = 90.0, max_dist: float = 250.0,
                       sky_brightness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Render what a camera at UTM ``(x, y)`` sees looking along ``heading_deg`` (0 = north, clockwise).

    Returns:
        ``uint8`` RGB array ``height x width x 3``.
    """
    f32 = np.float32
    cols = np.arange(width, dtype=f32)
    az = np.radians(heading_deg + (cols / (width - 1) - 0.5) * fov_deg).astype(f32)
    dirx, diry = np.sin(az), np.cos(az)
    dists = np.geomspace(2.0, max_dist, 64).astype(f32)
    ray_cls = cover.lookup(x + dirx[None, :] * dists[:, None], y + diry[None, :] * dists[:, None])
    tall = _WALL_HEIGHT[ray_cls] > 0
    hit = tall.any(axis=0)
    first = np.argmax(tall, axis=0)
    hit_d = np.where(hit, dists[first], f32(max_dist * 4))
    hit_cls = ray_cls[first, np.arange(width)]
    wall_h = np.where(hit, _WALL_HEIGHT[hit_cls], f32(0))
    hit_x, hit_y = x + dirx * hit_d, y + diry * hit_d

    half = height // 2
    vfov = math.radians(fov_deg) * height / width
    elev = ((0.5 - (np.arange(height, dtype=f32) + 0.5) / height) * vfov).astype(f32)  # radians, up > 0
    sky = np.array([120, 165, 220], dtype=f32) * f32(sky_brightness)
    img = np.empty((height, width, 3), dtype=f32)
    img[:half] = sky * (0.8 + 0.4 * elev[:half, None, None] / (vfov / 2))

    # Ground (lower half): class colour where each pixel's ray meets the ground.
    e_lo = elev[half:]
    ground_d = np.minimum(_EYE_HEIGHT / np.tan(-e_lo), max_dist).astype(f32)[:, None]
    gx, gy = x + dirx[None, :] * ground_d, y + diry[None, :] * ground_d
    shade = 0.85 + 0.3 * _texture(gx * 2, gy * 2)
    haze = (ground_d / max_dist)[..., None]
    img[half:] = _GROUND_RGB[cover.lookup(gx, gy)] * shade[..., None] * (1 - 0.5 * haze) + sky * 0.5 * haze

    # Walls: trees are dark green and noisy, buildings get a per-building colour and storey stripes.
    e = elev[:, None]
    top = np.arctan2(wall_h - _EYE_HEIGHT, hit_d)[None, :]
    base = -np.arctan2(f32(_EYE_HEIGHT), hit_d)[None, :]
    is_wall = hit[None, :] & (e <= top) & (e >= base)
    rr, cc = np.nonzero(is_wall)
    if rr.size:
        d, hx, hy = hit_d[cc], hit_x[cc], hit_y[cc]
        z = _EYE_HEIGHT + d * np.tan(elev[rr])
        tex = _texture(np.floor(hx / 30), np.floor(hy / 30))
        building = np.stack([150 + 80 * tex, 120 + 60 * tex, 100 + 40 * (1 - tex)], axis=-1)
        building *= np.where((z % 3.0) < 0.9, 0.55, 1.0)[:, None]
        tree = np.array([35, 70, 35], dtype=f32) * (0.7 + 0.6 * _texture(hx * 4 + z, hy * 4 - z))[:, None]
        wall = np.where((hit_cls[cc] == URBAN)[:, None], building, tree)
        fog = (d / max_dist)[:, None]
        img[rr, cc] = wall * (1 - 0.5 * fog) + sky * 0.5 * fog

    rng = np.random.default_rng(seed)
    img += rng.standard_normal(img.shape, dtype=f32) * f32(3.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = 88) -> bytes:
    """Encode an RGB array as baseline JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
