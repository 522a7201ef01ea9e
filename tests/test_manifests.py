"""The manifests under deploy/, checked offline (there is no cluster on these machines).

- Kubernetes schemas: every resource of deploy/kubernetes (its ConfigMap made from config.env,
  as kustomize's generator does) passes `kubernetes-validate --strict` against the oldest
  Kubernetes still supported upstream and the newest the validator knows.
- What schemas cannot say: probes on the gRPC port by number and on the right health services,
  the grace period above the server's, the security context, resources with Numba's threads
  tied to the CPU limit, and config.env naming only real `convserve serve` options.
- KServe: its CRDs are not in the validator. The ServingRuntime's containers and volumes are
  validated as a Pod; the KServe fields we use are checked against KServe's v1beta1/v1alpha1
  field names, and the runtime and InferenceService against each other and our server's flags.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import kubernetes_validate as kv
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
OLDEST_SUPPORTED = "1.35"  # upstream end of life 2027-02-28; 1.34 ended 2026-10-27
NEWEST = kv.utils.latest_version()
VERSIONS = (OLDEST_SUPPORTED, NEWEST)
GRPC_PORT, METRICS_PORT = 8001, 8002

# Field names of the KServe API (v0.21) for the parts these manifests use.
SERVING_RUNTIME_SPEC = {
    "affinity", "annotations", "builtInAdapter", "containers", "disabled", "grpcDataEndpoint",
    "grpcEndpoint", "hostIPC", "httpDataEndpoint", "imagePullSecrets", "labels", "multiModel",
    "nodeSelector", "protocolVersions", "replicas", "resourceClaims", "schedulerName",
    "storageHelper", "supportedModelFormats", "tolerations", "volumes", "workerSpec",
}  # fmt: skip
SUPPORTED_MODEL_FORMAT = {"autoSelect", "name", "priority", "version"}
PREDICTOR_KEYS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "model"}
MODEL_KEYS = {"modelFormat", "runtime", "protocolVersion", "storageUri"}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def read_env(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def kubernetes_resources() -> list[dict]:
    """deploy/kubernetes as kustomize builds it (ConfigMap from config.env; image tag applied)."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    resources = [doc for name in kustomization["resources"] for doc in load_all(KUBERNETES / name)]
    for generator in kustomization["configMapGenerator"]:
        data = {k: v for env in generator["envs"] for k, v in read_env(KUBERNETES / env).items()}
        resources.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}}
            | {"data": data}
        )
    return resources


def by_kind(resources: list[dict], kind: str) -> dict:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


def validate(resource: dict, version: str) -> None:
    kv.validate(resource, version, strict=True)


def as_pod(pod_spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec}


def serve_parser() -> argparse.ArgumentParser:
    from convserve.server import cli

    parser = argparse.ArgumentParser(prog="convserve", exit_on_error=False)
    cli.register(parser.add_subparsers(dest="command"))
    return parser


# -- plain Kubernetes ------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_every_resource_passes_the_strict_schema(version):
    resources = kubernetes_resources()
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
        + ["Service", "Service"]
    )
    for resource in resources:
        validate(resource, version)


def test_the_strict_schema_rejects_what_kubelet_would():
    """The check can fail: a named gRPC probe port and an unknown field are refused."""
    deployment = by_kind(kubernetes_resources(), "Deployment")
    named_port = copy.deepcopy(deployment)
    named_port["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = (
        "grpc"
    )
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    for broken in (named_port, typo):
        with pytest.raises(kv.utils.ValidationError):
            validate(broken, OLDEST_SUPPORTED)


def container(resources: list[dict]) -> dict:
    (main,) = by_kind(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def check_server_container(main: dict, name: str) -> None:
    """Probes, security and resources every convserve container must have (Deployment or KServe)."""
    ports = {p["containerPort"]: p for p in main["ports"]}
    assert GRPC_PORT in ports
    for probe, service in (
        ("startupProbe", "readiness"),
        ("readinessProbe", "readiness"),
        ("livenessProbe", "liveness"),
    ):
        assert main[probe]["grpc"] == {"port": GRPC_PORT, "service": service}, probe
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # a cold compile
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security.get("runAsNonRoot") is True
    limits, requests = main["resources"]["limits"], main["resources"]["requests"]
    assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
    threads = {e["name"]: e for e in main["env"]}["NUMBA_NUM_THREADS"]["valueFrom"]
    assert threads["resourceFieldRef"] == {
        "containerName": name,
        "resource": "limits.cpu",
        "divisor": "1",
    }
    assert "/tmp" in {m["mountPath"] for m in main["volumeMounts"]}  # NUMBA_CACHE_DIR's copy
    assert serve_parser().parse_args(main.get("args", [])).command == "serve"


def test_deployment_probes_security_resources_and_grace():
    resources = kubernetes_resources()
    config = by_kind(resources, "ConfigMap")["data"]
    pod = by_kind(resources, "Deployment")["spec"]["template"]["spec"]
    main = container(resources)
    check_server_container(main, "convserve")
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {
        "grpc": GRPC_PORT,
        "metrics": METRICS_PORT,
    }
    assert main["envFrom"] == [{"configMapRef": {"name": "convserve-config"}}]
    assert pod["terminationGracePeriodSeconds"] > float(config["CONVSERVE_GRACE_PERIOD"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts[config["CONVSERVE_MODEL_REPOSITORY"]]["readOnly"] is True
    (init,) = pod["initContainers"]  # fills the model repository volume
    assert init["securityContext"] == main["securityContext"]
    assert {m["name"] for m in init["volumeMounts"]} == {mounts["/mnt/models"]["name"]}
    annotations = by_kind(resources, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_config_env_names_only_real_options_with_valid_values():
    from convserve.server.config import OPTIONS, add_arguments

    env = read_env(KUBERNETES / "config.env")
    known = {opt.env for opt in OPTIONS}
    assert set(env) <= known, f"not options of convserve serve: {sorted(set(env) - known)}"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, environ=env)
    args = parser.parse_args([])  # each value parsed as the server would
    assert args.grace_period > args.drain_seconds
    assert args.max_connection_age_secs > 0


def test_services_hpa_and_pdb_select_the_pods():
    resources = kubernetes_resources()
    labels = by_kind(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in resources if s["kind"] == "Service"}
    assert services["convserve"]["spec"]["type"] == "ClusterIP"
    assert services["convserve-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        grpc = {p["name"]: p for p in service["spec"]["ports"]}["grpc"]
        assert grpc["port"] == GRPC_PORT and grpc["targetPort"] == "grpc"
    pdb = by_kind(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = by_kind(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "convserve" and hpa["minReplicas"] >= 2
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


# -- KServe ------------------------------------------------------------------------------------
def runtime() -> dict:
    (doc,) = load_all(KSERVE / "servingruntime.yaml")
    return doc


def inference_service() -> dict:
    (doc,) = load_all(KSERVE / "inferenceservice.yaml")
    return doc


@pytest.mark.parametrize("version", VERSIONS)
def test_serving_runtime_pod_passes_the_strict_schema(version):
    spec = runtime()["spec"]
    pod = {"containers": spec["containers"], "volumes": spec["volumes"]}
    validate(as_pod(pod, "convserve-runtime"), version)


def test_serving_runtime_speaks_grpc_v2_for_the_convserve_format():
    doc = runtime()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    spec = doc["spec"]
    assert set(spec) <= SERVING_RUNTIME_SPEC, set(spec) - SERVING_RUNTIME_SPEC
    assert spec["protocolVersions"] == ["grpc-v2"]
    (fmt,) = spec["supportedModelFormats"]
    assert set(fmt) <= SUPPORTED_MODEL_FORMAT and fmt["name"] == "convserve"
    (main,) = spec["containers"]
    assert main["name"] == "kserve-container"
    (port,) = main["ports"]  # KServe exposes exactly one port
    assert port["containerPort"] == GRPC_PORT and port["name"] == "h2c"
    check_server_container(main, "kserve-container")
    args = serve_parser().parse_args(main["args"])
    assert (args.model_repository, args.port) == ("/mnt/models", GRPC_PORT)


def test_inference_service_uses_the_runtime():
    doc = inference_service()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = doc["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR_KEYS and set(predictor["model"]) <= MODEL_KEYS
    model = predictor["model"]
    spec = runtime()["spec"]
    assert model["runtime"] == runtime()["metadata"]["name"]
    assert model["modelFormat"] == {
        k: v for k, v in spec["supportedModelFormats"][0].items() if k != "autoSelect"
    }
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert "://" in model["storageUri"]
