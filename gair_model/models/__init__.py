"""GAIR model components: encoders, location encoders, NILI and the full model."""

from gair_model.models.encoders import RSEncoder, SVEncoder, load_local_weights
from gair_model.models.gair import PRESETS, GAIRConfig, GAIRModel, preset
from gair_model.models.location import (
    GeoCLIPLocationEncoder,
    MLPLocationEncoder,
    SphericalHarmonicsLocationEncoder,
    build_location_encoder,
    equal_earth_projection,
)
from gair_model.models.nili import NILI, GridSampleLocalizer, build_localizer, rel_xy_to_query

__all__ = [
    "NILI",
    "PRESETS",
    "GAIRConfig",
    "GAIRModel",
    "GeoCLIPLocationEncoder",
    "GridSampleLocalizer",
    "MLPLocationEncoder",
    "RSEncoder",
    "SVEncoder",
    "SphericalHarmonicsLocationEncoder",
    "build_localizer",
    "build_location_encoder",
    "equal_earth_projection",
    "load_local_weights",
    "preset",
    "rel_xy_to_query",
]
