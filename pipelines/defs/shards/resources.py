"""Access to RS rasters (local files or signed cloud URLs) for chip reads."""

import dagster as dg
from pydantic import Field

from gair_dataset.signing import Signer, planetary_computer_signer


class RasterAccess(dg.ConfigurableResource):
    """How chips are read: GDAL settings and, for the Planetary Computer, late signing of each href.

    The local implementation (default) reads files and plain URLs as they are; with
    ``sign_with_planetary_computer`` every href is signed just before its read and re-signed once on 403.
    """

    sign_with_planetary_computer: bool = Field(default=False)
    gdal_http_max_retry: int = Field(default=4)
    gdal_http_timeout_s: int = Field(default=60)

    def signer(self) -> Signer | None:
        """The href signer, or None for local/public data."""
        return planetary_computer_signer() if self.sign_with_planetary_computer else None

    def gdal_env(self) -> dict:
        """Extra GDAL options for the chip reader."""
        return {"GDAL_HTTP_MAX_RETRY": str(self.gdal_http_max_retry),
                "GDAL_HTTP_TIMEOUT": str(self.gdal_http_timeout_s)}


def raster_access_from_env() -> RasterAccess:
    """Sign hrefs when the catalog is the Planetary Computer (``$GAIR_STAC_CATALOG``)."""
    import os

    choice = os.environ.get("GAIR_STAC_CATALOG", "local")
    return RasterAccess(sign_with_planetary_computer=choice == "planetary-computer" or "planetarycomputer" in choice)
