"""Building GAIR training data: STAC search, tile grids, street-view points, DuckDB pairing, chips, shards.

No torch and no Dagster here: the model side (:mod:`gair_model`) reads the shards through the sample contract
(:mod:`gair_dataset.contract`), and the orchestration (:mod:`pipelines`) wires these functions into assets.
"""
