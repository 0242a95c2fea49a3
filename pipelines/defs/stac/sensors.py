"""The catalog sensor: rebuild a region when its STAC catalog has items the last build did not see."""

import dagster as dg

from gair_dataset.stac_catalog import StacSearchError, validate_items
from pipelines.common.storage import DataRoot
from pipelines.defs.jobs import build_dataset_job
from pipelines.defs.stac.assets import items_version
from pipelines.defs.stac.resources import StacCatalog
from pipelines.partitions import REGIONS

#: Seconds between two looks at the catalogs (a search per region each time).
CATALOG_CHECK_INTERVAL_S = 6 * 3600


@dg.sensor(job=build_dataset_job, minimum_interval_seconds=CATALOG_CHECK_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Searches each region's catalog; launches build_dataset for a region whose usable items "
                       "differ from those of its last build (new, changed or removed items). A region whose "
                       "catalog answers as before launches nothing.")
def new_catalog_items_sensor(context: dg.SensorEvaluationContext, stac: StacCatalog,
                             data_root: DataRoot) -> dg.SensorResult:
    """One run request per region whose items' data version differs from the one its ``stac_items`` recorded.

    The run key is the region plus the new data version, so one catalog state launches one run however many
    ticks see it; a region whose search fails is logged and looked at again on the next tick.
    """
    requests, unchanged, failed = [], [], []
    for name in sorted(REGIONS):
        region = REGIONS[name]
        try:
            items = stac.search(region.search_params(), data_root)
        except StacSearchError as exc:
            context.log.warning("region %s: catalog search failed (%s); looked at again next tick", name, exc)
            failed.append(name)
            continue
        ok, _ = validate_items(items, check_bands=True)
        version = items_version(ok)
        built = (data_root.read_stats("stac", name) or {}).get("data_version")
        if ok and version != built:
            context.log.info("region %s: %d usable items, data version %s (last build: %s): rebuild", name,
                             len(ok), version, built)
            requests.append(dg.RunRequest(run_key=f"catalog-{name}-{version}", partition_key=name,
                                          tags={"gair/trigger": "new_catalog_items", "gair/data_version": version}))
        else:
            unchanged.append(name)
    skip = None if requests else (f"no region's catalog changed ({len(unchanged)} unchanged"
                                  f"{', search failed for ' + ', '.join(failed) if failed else ''})")
    return dg.SensorResult(run_requests=requests, skip_reason=skip)
