"""Street-view point sources behind one resource (a table of points or a folder of geotagged JPEGs)."""


from pathlib import Path

import dagster as dg
import pandas as pd

from gair_dataset.streetview_points import load_exif_folder, load_table
from pipelines.common.storage import DataRoot
from pipelines.config import StreetViewSource


class StreetViewPoints(dg.ConfigurableResource):
    """Loads a region's SV points from local files (GeoParquet/CSV table, or EXIF GPS of JPEGs).

    A hosted SV API (e.g. Mapillary) would be another implementation of ``load``; none is built yet.
    """

    def load(self, source: StreetViewSource, base_dir: Path,
             data_root: DataRoot | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Return ``(points, read_rejects)`` for a region's source.

        Args:
            source: the region's street-view source.
            base_dir: the regions file's folder (relative paths resolve against it).
            data_root: the ``DataRoot`` resource of the run: a ``sample://`` source reads the embedded sample under
                it (generated on first use); ``DataRoot()``'s default when None.
        """
        sample_dir = (data_root or DataRoot()).sample() if source.uses_sample else None
        path = source.resolve(Path(base_dir), sample_dir)
        if source.kind == "exif_folder":
            return load_exif_folder(path)
        return load_table(path, source.image_root), pd.DataFrame(columns=["sv_id", "image_uri", "reason"])
