"""Region partitions (one per region of the regions file) and the config lookup for a partition."""


import dagster as dg

from pipelines.config import RegionConfig, load_regions

REGIONS = load_regions()
region_partitions = dg.StaticPartitionsDefinition(sorted(REGIONS))


def region_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> RegionConfig:
    """The region config of the partition being materialized."""
    key = context.partition_key
    if key not in REGIONS:
        raise dg.Failure(f"unknown region partition {key!r}; declared: {sorted(REGIONS)}")
    return REGIONS[key]
