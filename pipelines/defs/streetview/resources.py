"""Street-view point sources behind one resource (a table of points or a folder of geotagged JPEGs)."""


import dagster as dg
import pandas as pd

from gair_dataset.sample_region import ensure_sample
from gair_dataset.streetview_points import load_exif_folder, load_table
from pipelines.config import StreetViewSource, data_root


class StreetViewPoints(dg.ConfigurableResource):
    """Loads a region's SV points from local files (GeoParquet/CSV table, or EXIF GPS of JPEGs).

    A hosted SV API (e.g. Mapillary) would be another implementation of ``load``; none is built yet.
    """

    def load(self, source: StreetViewSource, base_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Return ``(points, read_rejects)`` for a region's source."""
        if source.uses_sample:
            ensure_sample(data_root() / "sample")
        path = source.resolve(base_dir)
        if source.kind == "exif_folder":
            return load_exif_folder(path)
        return load_table(path, source.image_root), pd.DataFrame(columns=["sv_id", "image_uri", "reason"])
