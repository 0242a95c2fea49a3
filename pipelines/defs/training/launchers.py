"""Where the training process runs: a local subprocess (default) or a pod on Kubernetes, both through Dagster Pipes.

The ``training_pipes_client`` resource is chosen when the code location loads, from ``GAIR_TRAINING_LAUNCHER``:

- unset or ``subprocess``: :class:`dagster.PipesSubprocessClient`, the trainer runs beside the run worker;
- ``k8s``: :class:`ClusterTrainingClient` (a :class:`dagster_k8s.PipesK8sClient` that knows the training image,
  namespace and base pod, ``deploy/k8s/training-pod.yaml``), set by ``GAIR_TRAINING_IMAGE`` (required),
  ``GAIR_TRAINING_NAMESPACE`` (default: the namespace the run runs in) and ``GAIR_TRAINING_POD_SPEC`` (a path;
  default: the checkout's ``deploy/k8s/training-pod.yaml``).

Either way the asset sends the same command (``python -m pipelines.training_pipes``) and the same Pipes extras;
everything it records comes back as Pipes messages (on Kubernetes, read from the pod's log). Paths in the extras
are those of the data root as the run worker sees it, so the pod must mount the same shared volume (or object-store
mount) at the same path (``GAIR_DATA_ROOT``, ``/data/gair_data`` in ``deploy/k8s``).
"""

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster_k8s import PipesK8sClient

LAUNCHER_ENV = "GAIR_TRAINING_LAUNCHER"
IMAGE_ENV = "GAIR_TRAINING_IMAGE"
NAMESPACE_ENV = "GAIR_TRAINING_NAMESPACE"
POD_SPEC_ENV = "GAIR_TRAINING_POD_SPEC"
#: The base pod of a training run on Kubernetes, in a checkout (a wheel install sets ``GAIR_TRAINING_POD_SPEC``).
DEFAULT_POD_SPEC = Path(__file__).resolve().parents[3] / "deploy" / "k8s" / "training-pod.yaml"
#: The module the training pod runs (``pipelines.training_pipes``): the image has the project installed.
TRAINING_MODULE = "pipelines.training_pipes"


def load_pod_template(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, spec)`` of a pod manifest (``kind: Pod``) used as the base of the training pod.

    Raises:
        ValueError: If the file is not a Pod manifest with a ``spec.containers`` list.
    """
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "Pod" or not isinstance(doc.get("spec"), dict) \
            or not doc["spec"].get("containers"):
        raise ValueError(f"{path}: expected a Pod manifest (kind: Pod) with spec.containers")
    return dict(doc.get("metadata") or {}), dict(doc["spec"])


class ClusterTrainingClient(PipesK8sClient):
    """A :class:`dagster_k8s.PipesK8sClient` bound to the training image, namespace and base pod.

    Args:
        image: The container image with this project installed (``pip install '.[pipelines]'``).
        pod_meta: Metadata of the base pod (labels, annotations); the pod name is set per run.
        pod_spec: Spec of the base pod: GPU limits, the shared data-root volume, node selector, tolerations.
        namespace: Namespace of the training pods (None: the current one).
        **kwargs: Passed to :class:`PipesK8sClient` (``kubeconfig_file``, ``load_incluster_config``, ...).
    """

    def __init__(self, image: str, pod_meta: Mapping[str, Any], pod_spec: Mapping[str, Any],
                 namespace: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image, self.namespace = image, namespace
        self.pod_meta, self.pod_spec = dict(pod_meta), dict(pod_spec)

    @property
    def gpus_per_pod(self) -> int:
        """The ``nvidia.com/gpu`` limit of the first container (0 when it has none)."""
        limits = ((self.pod_spec["containers"][0].get("resources") or {}).get("limits") or {})
        return int(limits.get("nvidia.com/gpu", 0))

    def run_training(self, context: dg.AssetExecutionContext, extras: dict[str, Any],
                     env: Mapping[str, str]) -> dg.PipesClientCompletedInvocation:
        """Run the training module in a pod of the base spec (the first container speaks Pipes)."""
        if self.gpus_per_pod and int(extras.get("nproc_per_node", 1)) != self.gpus_per_pod:
            context.log.warning(f"nproc_per_node={extras.get('nproc_per_node')} but the training pod has "
                                f"{self.gpus_per_pod} GPUs (nvidia.com/gpu): set nproc_per_node to use them all")
        return self.run(context=context, extras=extras, image=self.image, namespace=self.namespace,
                        command=["python", "-m", TRAINING_MODULE], env=dict(env),
                        base_pod_meta=self.pod_meta, base_pod_spec=self.pod_spec)


def training_pipes_client(environ: Mapping[str, str] | None = None) -> dg.PipesClient:
    """The Pipes client training runs with, as ``GAIR_TRAINING_LAUNCHER`` (and friends) in ``environ`` say.

    Args:
        environ: The environment to read (default: ``os.environ``).

    Raises:
        ValueError: On an unknown launcher, or ``k8s`` without ``GAIR_TRAINING_IMAGE``.
    """
    env = os.environ if environ is None else environ
    launcher = env.get(LAUNCHER_ENV, "") or "subprocess"
    if launcher == "subprocess":
        return dg.PipesSubprocessClient()
    if launcher != "k8s":
        raise ValueError(f"{LAUNCHER_ENV}={launcher!r}: expected 'subprocess' or 'k8s'")
    image = env.get(IMAGE_ENV, "")
    if not image:
        raise ValueError(f"{LAUNCHER_ENV}=k8s needs {IMAGE_ENV} (the image with this project installed)")
    meta, spec = load_pod_template(env.get(POD_SPEC_ENV) or DEFAULT_POD_SPEC)
    return ClusterTrainingClient(image=image, pod_meta=meta, pod_spec=spec, namespace=env.get(NAMESPACE_ENV) or None)


def run_training(client: dg.PipesClient, context: dg.AssetExecutionContext,
                 extras: dict[str, Any]) -> dg.PipesClientCompletedInvocation:
    """Launch the training module with ``extras`` through ``client`` (subprocess or Kubernetes).

    Raises:
        TypeError: For a Pipes client this project does not know how to give a command to.
    """
    if isinstance(client, ClusterTrainingClient):
        return client.run_training(context, extras, env={"PYTHONUNBUFFERED": "1"})
    if isinstance(client, dg.PipesSubprocessClient):
        command: Sequence[str] = [sys.executable, "-m", TRAINING_MODULE]
        return client.run(command=command, context=context, extras=extras,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    raise TypeError(f"training_pipes_client: {type(client).__name__} is not supported "
                    "(PipesSubprocessClient or ClusterTrainingClient)")
