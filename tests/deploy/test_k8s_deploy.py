"""deploy/k8s: each file loaded and validated (Dagster's config schemas, the Kubernetes API models), and the
Kubernetes training client built from it without a cluster.

The Kubernetes objects are built with ``dagster_k8s.models`` (``k8s_snake_case_dict``, ``k8s_model_from_dict``:
the strict builders dagster-k8s uses for every pod it launches; an unknown key fails) into the ``kubernetes``
client's OpenAPI models, whose constructors check required fields, then round-tripped through
``kubernetes.client.ApiClient`` (serialise, deserialise) as the API server would receive them.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import dagster_instance_config_schema
from dagster_k8s import K8sRunLauncher, PipesK8sClient, k8s_job_executor
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_k8s.pipes import build_pod_body
from kubernetes import client as k8s

from pipelines.defs.training.launchers import (
    DEFAULT_POD_SPEC,
    TRAINING_MODULE,
    ClusterTrainingClient,
    load_pod_template,
    training_pipes_client,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "k8s"
#: A kubeconfig naming a cluster at a closed loopback port: enough to construct clients (nothing connects).
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: not-a-secret}}]
contexts: [{name: none, context: {cluster: none, user: none, namespace: gair}}]
current-context: none
"""
K8S_ENV = {"GAIR_TRAINING_LAUNCHER": "k8s", "GAIR_TRAINING_IMAGE": "registry.example.com/gair-pipeline:test",
           "GAIR_TRAINING_NAMESPACE": "gair"}


def _load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def _model(kind: str, doc: dict[str, Any]) -> Any:
    """``doc`` as the kubernetes client model ``V1<kind>``, strictly built and round-tripped through ApiClient."""
    cls = getattr(k8s, f"V1{kind}")
    fields = k8s_snake_case_dict(cls, {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")})
    model = k8s_model_from_dict(cls, fields)
    api = k8s.ApiClient()
    wire = api.sanitize_for_serialization(model)
    again = api.deserialize(SimpleNamespace(data=json.dumps(wire)), f"V1{kind}")
    assert api.sanitize_for_serialization(again) == wire
    return model


def _check(config_type: Any, value: Any) -> Any:
    """``value`` validated by a Dagster config schema (with defaults filled in), or the errors in the failure."""
    result = process_config(resolve_to_config_type(config_type), value)
    assert result.success, [e.message for e in result.errors or []]
    return result.value


def test_run_launcher_config_is_valid_and_builds(tmp_path, monkeypatch):
    instance = _load("dagster.yaml")
    for var in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(var, "5432")
    _check(dagster_instance_config_schema(), instance)  # the whole dagster.yaml, as the instance reads it
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    config = _check(K8sRunLauncher.config_type(), launcher["config"])
    # Dagster's schema keeps volumes permissive: dagster-k8s builds them into these models when it launches a run.
    volumes = [_model("Volume", v) for v in config["volumes"]]
    mounts = [_model("VolumeMount", m) for m in config["volume_mounts"]]
    assert {m.name for m in mounts} <= {v.name for v in volumes}
    env = dict(e.split("=", 1) for e in config["env_vars"])
    assert env["GAIR_TRAINING_LAUNCHER"] == "k8s" and env["GAIR_DATA_ROOT"] in {m.mount_path for m in mounts}
    assert env["GAIR_TRAINING_POD_SPEC"].endswith("deploy/k8s/training-pod.yaml")
    # The launcher itself, as the instance would construct it (out of the cluster: a kubeconfig instead).
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    built = K8sRunLauncher(**{**config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)})
    assert built.job_namespace == "gair" and built.image_pull_policy == "IfNotPresent"
    # The check is real: a misspelt field is refused.
    bad = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), {**config, "job_imag": "x"})
    assert not bad.success


def test_step_executor_run_config_is_valid():
    from pipelines.definitions import defs

    run_config = _load("run-config.yaml")
    config = _check(k8s_job_executor.config_schema.config_type, run_config["execution"]["config"])
    base = config["step_k8s_config"]["container_config"]
    _model("Container", {"name": "step", **base})
    assets = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    for step, step_config in config["per_step_k8s_config"].items():
        assert step in assets, f"per_step_k8s_config names {step!r}, not an asset step"
        _model("Container", {"name": step, **step_config["container_config"]})
    for volume in config["volumes"]:
        _model("Volume", volume)


def test_training_pod_spec_and_the_pod_the_client_launches():
    meta, spec = load_pod_template(DEPLOY / "training-pod.yaml")
    assert DEFAULT_POD_SPEC == DEPLOY / "training-pod.yaml"
    pod = _model("Pod", {"metadata": meta, "spec": spec})
    trainer = pod.spec.containers[0]
    assert int(trainer.resources.limits["nvidia.com/gpu"]) >= 1
    data_root = next(e.value for e in trainer.env if e.name == "GAIR_DATA_ROOT")
    assert data_root in {m.mount_path for m in trainer.volume_mounts}
    claim = {v.name: v for v in pod.spec.volumes}["data"].persistent_volume_claim
    assert claim.claim_name == "gair-data"
    with pytest.raises(Exception, match="Unexpected keys"):  # the model check is real: a misspelt key fails
        _model("Pod", {"metadata": meta, "spec": {**spec, "nodeSelektor": {}}})

    client = training_pipes_client(K8S_ENV)
    assert isinstance(client, ClusterTrainingClient) and isinstance(client, PipesK8sClient)
    assert client.gpus_per_pod == int(trainer.resources.limits["nvidia.com/gpu"])
    assert (client.image, client.namespace) == (K8S_ENV["GAIR_TRAINING_IMAGE"], "gair")
    # The pod body PipesK8sClient.run creates from this client's settings (dagster-k8s's own builder).
    body = build_pod_body(pod_name="dagster-run-train", image=client.image,
                          command=["python", "-m", TRAINING_MODULE],
                          env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msg"},
                          base_pod_meta=client.pod_meta, base_pod_spec=client.pod_spec)
    first = body.spec.containers[0]
    assert (first.name, first.image, first.command) == ("trainer", K8S_ENV["GAIR_TRAINING_IMAGE"],
                                                          ["python", "-m", "pipelines.training_pipes"])
    assert {"GAIR_DATA_ROOT", "DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= {e.name for e in first.env}
    assert body.spec.restart_policy == "Never" and body.metadata.name == "dagster-run-train"
    assert body.metadata.labels["app.kubernetes.io/name"] == "gair-training"
    k8s.ApiClient().sanitize_for_serialization(body)  # serialisable as the API call's body


def test_training_job_runs_torchrun_one_pod_per_node():
    service_doc, job_doc = yaml.safe_load_all((DEPLOY / "training-job.yaml").read_text())
    assert (service_doc["kind"], job_doc["kind"]) == ("Service", "Job")
    service, job = _model("Service", service_doc), _model("Job", job_doc)
    assert service.spec.cluster_ip == "None" and service.spec.selector == {"job-name": job.metadata.name}
    pod = job.spec.template.spec
    assert job.spec.completion_mode == "Indexed" and pod.subdomain == service.metadata.name
    trainer = pod.containers[0]
    env = {e.name: e.value for e in trainer.env}
    nnodes, gpus = int(env["NNODES"]), int(env["GPUS_PER_NODE"])
    assert job.spec.completions == job.spec.parallelism == nnodes > 1  # one pod per node
    assert int(trainer.resources.limits["nvidia.com/gpu"]) == gpus
    command = shlex.split(trainer.args[0])
    assert command[:4] == ["exec", "python", "-m", "torch.distributed.run"]
    flags = dict(a.split("=", 1) for a in command if a.startswith("--") and "=" in a)
    assert flags["--nnodes"] == "${NNODES}"
    assert flags["--nproc_per_node"] == "${GPUS_PER_NODE}" and flags["--node_rank"] == "${JOB_COMPLETION_INDEX}"
    assert flags["--master_addr"] == f"{job.metadata.name}-0.{service.metadata.name}"
    assert int(flags["--master_port"]) == service.spec.ports[0].port
    config = command[command.index("--config") + 1]
    assert command[command.index("-m", 4) + 1] == "gair_model.train"
    assert config.startswith(env["GAIR_DATA_ROOT"] + "/")
    assert env["GAIR_DATA_ROOT"] in {m.mount_path for m in trainer.volume_mounts}


def test_rbac_lets_the_run_pods_launch_and_follow_pods():
    docs = list(yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()))
    models = [_model(d["kind"], d) for d in docs]
    role = next(m for m in models if isinstance(m, k8s.V1Role))
    granted = {(r, v) for rule in role.rules for r in rule.resources for v in rule.verbs}
    assert {("pods", "create"), ("pods", "delete"), ("pods/log", "get"), ("jobs", "create")} <= granted
    binding = next(m for m in models if isinstance(m, k8s.V1RoleBinding))
    launcher = _load("dagster.yaml")["run_launcher"]["config"]
    assert binding.role_ref.name == role.metadata.name
    assert launcher["service_account_name"] in {s.name for s in binding.subjects}
    _, spec = load_pod_template(DEPLOY / "training-pod.yaml")
    assert spec["serviceAccountName"] in {m.metadata.name for m in models if isinstance(m, k8s.V1ServiceAccount)}


def test_launcher_choice_and_refusals(tmp_path):
    assert isinstance(training_pipes_client({}), dg.PipesSubprocessClient)
    assert isinstance(training_pipes_client({"GAIR_TRAINING_LAUNCHER": "subprocess"}), dg.PipesSubprocessClient)
    with pytest.raises(ValueError, match="'subprocess' or 'k8s'"):
        training_pipes_client({"GAIR_TRAINING_LAUNCHER": "slurm"})
    with pytest.raises(ValueError, match="GAIR_TRAINING_IMAGE"):
        training_pipes_client({"GAIR_TRAINING_LAUNCHER": "k8s"})
    not_a_pod = tmp_path / "job.yaml"
    not_a_pod.write_text((DEPLOY / "training-job.yaml").read_text().split("---")[1])
    with pytest.raises(ValueError, match="kind: Pod"):
        training_pipes_client({**K8S_ENV, "GAIR_TRAINING_POD_SPEC": str(not_a_pod)})


@pytest.mark.slow
def test_dg_check_defs_with_the_kubernetes_configuration(tmp_path):
    """The code location loads and checks with the Kubernetes training client and step executor selected."""
    env = {**os.environ, **K8S_ENV, "GAIR_STEP_EXECUTOR": "k8s", "GAIR_DATA_ROOT": str(tmp_path / "data"),
           "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "dg"), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = ("from pipelines.definitions import defs; "
             "print(type(defs.resources['training_pipes_client']).__name__, defs.executor.name)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["ClusterTrainingClient", "k8s"]
