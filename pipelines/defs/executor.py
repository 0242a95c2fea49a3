"""The code location's executor: Dagster's default, or one Kubernetes Job per step (``GAIR_STEP_EXECUTOR=k8s``).

With the ``K8sRunLauncher`` (``deploy/k8s/dagster.yaml``) every run gets its own pod and its steps run inside it;
``GAIR_STEP_EXECUTOR=k8s`` makes :data:`dagster_k8s.k8s_job_executor` the default executor instead, so that each
step gets its own Job (run config: ``deploy/k8s/run-config.yaml``). Read when the location loads.
"""

import os

import dagster as dg
from dagster_k8s import k8s_job_executor

STEP_EXECUTOR_ENV = "GAIR_STEP_EXECUTOR"


@dg.definitions
def executor() -> dg.Definitions:
    """``k8s_job_executor`` when ``GAIR_STEP_EXECUTOR=k8s``; otherwise nothing (Dagster's default executor).

    Raises:
        ValueError: On a value other than ``k8s``, ``default`` or empty.
    """
    kind = os.environ.get(STEP_EXECUTOR_ENV, "") or "default"
    if kind == "default":
        return dg.Definitions()
    if kind != "k8s":
        raise ValueError(f"{STEP_EXECUTOR_ENV}={kind!r}: expected 'k8s' or 'default'")
    return dg.Definitions(executor=k8s_job_executor)
