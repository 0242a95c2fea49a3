"""Run the pipeline in a subprocess for end-to-end tests (the code location reads its regions, catalog and data
root from the environment when it loads, so each run needs a fresh interpreter).

Import as ``from tests.run_helpers import run_build_dataset`` (like ``tests/synthetic_shards.py``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Appended to a run script that leaves a Dagster ``result``: prints the asset checks and exits non-zero unless the
#: run succeeded and every check (there must be some) passed.
CHECKS_EXIT = """
checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
print("CHECKS", checks)
raise SystemExit(0 if result.success and checks and all(checks.values()) else 1)
"""

#: ``build_dataset`` for the partition named by ``sys.argv[1]``, on an ephemeral instance.
BUILD_DATASET = """
import sys
import dagster as dg
from pipelines.definitions import defs
result = defs.resolve_job_def("build_dataset").execute_in_process(
    partition_key=sys.argv[1], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
""" + CHECKS_EXIT


def run_python(script: str, *args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -c script *args`` in the repository with ``env`` added to the environment; assert it succeeded.

    Args:
        script: the Python source.
        args: its ``sys.argv[1:]``.
        env: variables set on top of ``os.environ`` (e.g. ``GAIR_REGIONS``, ``GAIR_DATA_ROOT``).
        timeout: seconds.

    Returns:
        The finished process (``stdout``/``stderr`` as text), for more checks on its output.
    """
    proc = subprocess.run([sys.executable, "-c", script, *args], check=False, cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def run_build_dataset(partition: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Materialise the ``build_dataset`` job for ``partition`` in a subprocess; assert it and its checks passed."""
    return run_python(BUILD_DATASET, partition, env=env, timeout=timeout)


@contextlib.contextmanager
def data_root_env(root: Path) -> Iterator[Path]:
    """``GAIR_DATA_ROOT`` set to ``root`` for the block (for in-process runs), restored afterwards."""
    old = os.environ.get("GAIR_DATA_ROOT")
    os.environ["GAIR_DATA_ROOT"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("GAIR_DATA_ROOT", None)
        else:
            os.environ["GAIR_DATA_ROOT"] = old
