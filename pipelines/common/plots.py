"""Small matplotlib previews embedded in Dagster materialization metadata (PNG as a markdown data URI)."""


import base64
import io
from pathlib import Path

import dagster as dg
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import shapely
from shapely.geometry import box


def png_md(png: bytes | Path, alt: str = "preview") -> dg.MetadataValue:
    """A PNG (bytes or a file) as a markdown metadata value with the image inline."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})")


def figure_md(fig, alt: str = "preview") -> dg.MetadataValue:
    """Render a figure to a markdown metadata value (and close it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return png_md(buf.getvalue(), alt)


def footprints_map(geoms, region, title: str, colors=None, points=None):
    """Outline polygons (EPSG:4326) with the region (a bbox or a shapely polygon) and optional points."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, g in enumerate(geoms):
        polys = getattr(g, "geoms", [g])
        for p in polys:
            x, y = p.exterior.xy
            c = colors[i] if colors is not None else "tab:blue"
            ax.fill(x, y, alpha=0.25, color=c, lw=0)
            ax.plot(x, y, color=c, lw=0.6)
    outline = region if isinstance(region, shapely.Geometry) else box(*region)
    rings = [r for part in getattr(outline, "geoms", [outline]) for r in (part.exterior, *part.interiors)]
    for i, ring in enumerate(rings):
        x, y = ring.xy
        ax.plot(x, y, "k--", lw=1, label="region" if i == 0 else None)
    if points is not None and len(points):
        ax.scatter(points[0], points[1], s=2, c="k", alpha=0.5, label="SV points")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("lon")
    ax.set_ylabel("lat")
    ax.legend(fontsize=7, loc="upper right")
    return fig


def offsets_hist(x, y, title: str):
    """2-D histogram of relative positions inside tiles (x east, y down from the top)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    h = axes[0].hist2d(x, y, bins=10, range=[[0, 1], [0, 1]], cmap="viridis")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("x (east)")
    axes[0].set_ylabel("y (from top)")
    axes[0].set_title("SV position inside its tile", fontsize=9)
    fig.colorbar(h[3], ax=axes[0])
    axes[1].hist([x, y], bins=20, range=(0, 1), label=["x", "y"])
    axes[1].legend(fontsize=7)
    axes[1].set_title(title, fontsize=9)
    return fig
