"""Concurrency pools and retry policies shared by the assets.

Pools (Dagster concurrency pools, ``pool=`` on an asset) bound how many steps of a kind run at once across every
run of the instance. Without limits set on the instance a pool limits nothing; see README "Operating" for the
``dagster.yaml`` / CLI settings:

- ``stac_api``: STAC catalog searches (catalog rate limits; Planetary Computer throttles bursts);
- ``remote_reads``: steps that read remote rasters or download images (chips for the shards, street-view API images);
- ``gpu``: steps that run the model (training, the ablation, evaluation, embeddings) — one GPU, one step at a time.

Serialising two runs of the *same* region partition does not rely on a pool: every region asset holds the
partition's file lock while it writes (:meth:`pipelines.common.storage.DataRoot.region_lock`).
"""

import dagster as dg

STAC_POOL = "stac_api"
REMOTE_READS_POOL = "remote_reads"
GPU_POOL = "gpu"

#: Network-bound assets (STAC search, street-view API reads, remote chip reads): 3 retries after 10 s, 20 s, 40 s
#: (each +/- up to its own length of jitter, so that runs retried together do not hit the service together). The
#: HTTP clients already retry single requests (429/5xx, Retry-After); this retries the step after an outage longer
#: than their budget. Deterministic failures (bad config, no usable data, a refused token) raise
#: ``dg.Failure(..., allow_retries=False)`` and are not retried.
NETWORK_RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
