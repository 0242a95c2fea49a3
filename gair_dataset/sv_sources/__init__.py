"""Street-view points from hosted APIs (Mapillary Graph API v4, Panoramax STAC API), images cached on disk.

Each source returns the points table of :mod:`gair_dataset.streetview_points` (``sv_id, lon, lat, image_uri,
heading, captured_at, source, license, attribution, source_url``) plus its rejects; ``image_uri`` is the local
cached copy of the image, ``source_url`` a stable, unsigned link to the picture on the provider.
"""

from gair_dataset.sv_sources.http import ApiError, AuthError, HttpSettings, make_session, redact_url
from gair_dataset.sv_sources.images import ImageCache
from gair_dataset.sv_sources.mapillary import fetch_mapillary
from gair_dataset.sv_sources.panoramax import fetch_panoramax

__all__ = ["ApiError", "AuthError", "HttpSettings", "ImageCache", "fetch_mapillary", "fetch_panoramax",
           "make_session", "redact_url"]
