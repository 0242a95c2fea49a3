"""Access to RS rasters (local files or signed cloud URLs) for chip reads."""

import dagster as dg
from pydantic import Field

from gair_dataset.signing import Signer, planetary_computer_signer
from pipelines.defs.stac.resources import is_planetary_computer


class RasterAccess(dg.ConfigurableResource):
    """How chips are read: GDAL settings and, for the Planetary Computer, late signing of each href.

    The local implementation (default) reads files and plain URLs as they are; with
    ``sign_with_planetary_computer``, or a ``stac_catalog`` setting that names the Planetary Computer (the code
    location binds it to ``dg.EnvVar("GAIR_STAC_CATALOG")`` when set), every href is signed just before its read
    and re-signed once on 403.
    """

    sign_with_planetary_computer: bool = Field(default=False)
    stac_catalog: str = Field(default="", description="the GAIR_STAC_CATALOG setting: a Planetary Computer "
                              "catalog turns signing on")
    gdal_http_max_retry: int = Field(default=4)
    gdal_http_timeout_s: int = Field(default=60)

    def signer(self) -> Signer | None:
        """The href signer, or None for local/public data."""
        signs = self.sign_with_planetary_computer or is_planetary_computer(self.stac_catalog)
        return planetary_computer_signer() if signs else None

    def gdal_env(self) -> dict:
        """Extra GDAL options for the chip reader."""
        return {"GDAL_HTTP_MAX_RETRY": str(self.gdal_http_max_retry),
                "GDAL_HTTP_TIMEOUT": str(self.gdal_http_timeout_s)}
