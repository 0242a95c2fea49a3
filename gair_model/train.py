"""GAIR trainer entry point: ``python -m gair_model.train`` or ``torchrun --nproc_per_node=N -m gair_model.train``.

The trainer lives in :mod:`gair_model.training`, one module per job: ``config`` (the one configuration: flags,
presets, the Dagster config), ``data`` (epoch arithmetic, loaders, the queue's pre-fill), ``step`` (one optimiser
step, also what the benchmark times), ``logs`` (metrics, checkpoints' bookkeeping, resume) and ``main`` (the
loop). ``--print-config`` prints the resolved configuration of a preset and flags without training.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from gair_model.training.config import TrainConfig, describe, parse_args, resolve_config
from gair_model.training.logs import METRICS_PREFIX, SUMMARY_PREFIX
from gair_model.training.main import train

__all__ = ["METRICS_PREFIX", "SUMMARY_PREFIX", "TrainConfig", "main", "parse_config", "resolve_config", "train"]


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The configuration given by command-line arguments (``--shards`` required)."""
    cfg, _ = parse_args(argv)
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point (also callable in-process): the run summary, or the configuration (``--print-config``)."""
    logging.basicConfig(level=os.environ.get("GAIR_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    cfg, print_only = parse_args(argv)
    if print_only:
        print(describe(cfg))
        return cfg.model_dump()
    return train(cfg)


if __name__ == "__main__":
    main()
