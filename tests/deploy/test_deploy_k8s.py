"""Structure of the Kubernetes manifests in deploy/k8s (no cluster needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

NAMESPACE = "credit-proxy"
APP_PORTS = {"proxy": 8000, "billing": 8001, "credits": 8002}
SECRET_KEYS = {
    "INTERNAL_TOKEN",
    "ADMIN_TOKEN",
    "USER_TOKEN_SECRET",
    "STRIPE_API_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "OPENAI_API_KEY",
    "CREDITS_DATABASE_URL",
    "BILLING_DATABASE_URL",
}
# What each service must get from the Secret (env name -> Secret key).
REQUIRED_SECRET_ENV = {
    "credits": {"DATABASE_URL": "CREDITS_DATABASE_URL", "INTERNAL_TOKEN": "INTERNAL_TOKEN"},
    "billing": {
        "DATABASE_URL": "BILLING_DATABASE_URL",
        "INTERNAL_TOKEN": "INTERNAL_TOKEN",
        "STRIPE_API_KEY": "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRET": "STRIPE_WEBHOOK_SECRET",
    },
    "proxy": {
        "INTERNAL_TOKEN": "INTERNAL_TOKEN",
        "USER_TOKEN_SECRET": "USER_TOKEN_SECRET",
        "OPENAI_API_KEY": "OPENAI_API_KEY",
    },
}
KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}

_QUANTITY = {"type": ["string", "integer", "number"]}
_RESOURCES = {
    "type": "object",
    "required": ["cpu", "memory"],
    "properties": {"cpu": _QUANTITY, "memory": _QUANTITY},
}


def _http_probe(path: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["httpGet"],
        "properties": {
            "httpGet": {
                "type": "object",
                "required": ["path", "port"],
                "properties": {"path": {"const": path}, "port": {"type": ["string", "integer"]}},
            },
            "periodSeconds": {"type": "integer", "minimum": 1},
            "timeoutSeconds": {"type": "integer", "minimum": 1},
            "failureThreshold": {"type": "integer", "minimum": 1},
        },
    }


CONTAINER_SCHEMA = {
    "type": "object",
    "required": [
        "name",
        "image",
        "command",
        "ports",
        "startupProbe",
        "livenessProbe",
        "readinessProbe",
        "resources",
        "securityContext",
        "lifecycle",
    ],
    "properties": {
        "ports": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "containerPort"],
                "properties": {"containerPort": {"type": "integer"}},
            },
        },
        "startupProbe": _http_probe("/healthz"),
        "livenessProbe": _http_probe("/healthz"),
        "readinessProbe": _http_probe("/readyz"),
        "resources": {
            "type": "object",
            "required": ["requests", "limits"],
            "properties": {"requests": _RESOURCES, "limits": _RESOURCES},
        },
        "securityContext": {
            "type": "object",
            "required": ["allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"],
            "properties": {
                "allowPrivilegeEscalation": {"const": False},
                "readOnlyRootFilesystem": {"const": True},
                "privileged": {"const": False},
                "runAsUser": {"type": "integer", "minimum": 1},
                "capabilities": {
                    "type": "object",
                    "required": ["drop"],
                    "properties": {"drop": {"contains": {"const": "ALL"}}},
                },
            },
        },
        "lifecycle": {
            "type": "object",
            "required": ["preStop"],
            "properties": {
                "preStop": {
                    "type": "object",
                    "properties": {
                        "exec": {
                            "type": "object",
                            "required": ["command"],
                            "properties": {"command": {"type": "array", "minItems": 2}},
                        }
                    },
                }
            },
        },
    },
}

DEPLOYMENT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": {"type": "object", "required": ["name", "namespace", "labels"]},
        "spec": {
            "type": "object",
            "required": ["selector", "template"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "template": {
                    "type": "object",
                    "required": ["metadata", "spec"],
                    "properties": {
                        "metadata": {"type": "object", "required": ["labels"]},
                        "spec": {
                            "type": "object",
                            "required": ["containers", "securityContext", "terminationGracePeriodSeconds"],
                            "properties": {
                                "terminationGracePeriodSeconds": {"type": "integer", "minimum": 10},
                                "securityContext": {
                                    "type": "object",
                                    "required": ["runAsNonRoot", "runAsUser"],
                                    "properties": {
                                        "runAsNonRoot": {"const": True},
                                        "runAsUser": {"type": "integer", "minimum": 1},
                                        "runAsGroup": {"type": "integer", "minimum": 1},
                                    },
                                },
                                "containers": {"type": "array", "minItems": 1, "items": CONTAINER_SCHEMA},
                            },
                        },
                    },
                },
            },
        },
    },
}


def _named(by_kind: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in by_kind.get(kind, [])}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def test_every_document_has_a_known_kind(k8s_docs: list[tuple[Path, dict[str, Any]]]) -> None:
    assert k8s_docs
    for path, doc in k8s_docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, (path.name, doc.get("kind"))
        if doc["kind"] == "Kustomization":
            continue
        metadata = doc["metadata"]
        assert metadata.get("name"), path.name
        if doc["kind"] != "Namespace":
            assert metadata.get("namespace") == NAMESPACE, (path.name, metadata["name"])


def test_names_are_unique_per_kind(k8s_docs: list[tuple[Path, dict[str, Any]]]) -> None:
    seen = [(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs if doc["kind"] != "Kustomization"]
    assert len(seen) == len(set(seen))


def test_namespace(k8s_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    assert set(_named(k8s_by_kind, "Namespace")) == {NAMESPACE}


def test_kustomization_lists_every_file(repo_root: Path) -> None:
    k8s_dir = repo_root / "deploy" / "k8s"
    kustomization = yaml.safe_load((k8s_dir / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in k8s_dir.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


def test_kustomization_image_matches_deployments(
    repo_root: Path, k8s_by_kind: dict[str, list[dict[str, Any]]]
) -> None:
    kustomization = yaml.safe_load((repo_root / "deploy" / "k8s" / "kustomization.yaml").read_text())
    image_names = {entry["name"] for entry in kustomization.get("images", [])}
    for deployment in k8s_by_kind["Deployment"]:
        image = _container(deployment)["image"]
        assert image.rsplit(":", 1)[0] in image_names


def test_kubectl_kustomize_renders(repo_root: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(repo_root / "deploy" / "k8s")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds.count("Deployment") == 3
    assert all(
        doc["metadata"].get("namespace") == NAMESPACE for doc in rendered if doc["kind"] != "Namespace"
    )


def test_three_deployments(k8s_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    assert set(_named(k8s_by_kind, "Deployment")) == set(APP_PORTS)


@pytest.mark.parametrize("name", sorted(APP_PORTS))
def test_deployment_schema(k8s_by_kind: dict[str, list[dict[str, Any]]], name: str) -> None:
    jsonschema.validate(_named(k8s_by_kind, "Deployment")[name], DEPLOYMENT_SCHEMA)


@pytest.mark.parametrize("name", sorted(APP_PORTS))
def test_deployment_runs_its_service(k8s_by_kind: dict[str, list[dict[str, Any]]], name: str) -> None:
    deployment = _named(k8s_by_kind, "Deployment")[name]
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    container = _container(deployment)
    assert container["command"] == ["python", "-m", f"services.{name}"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": APP_PORTS[name]}
    assert _env(container)["PORT"]["value"] == str(APP_PORTS[name])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port in ports or port == APP_PORTS[name], probe


@pytest.mark.parametrize("name", sorted(APP_PORTS))
def test_deployment_shuts_down_gracefully(k8s_by_kind: dict[str, list[dict[str, Any]]], name: str) -> None:
    deployment = _named(k8s_by_kind, "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    command = _container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert int(command[1]) < pod["terminationGracePeriodSeconds"]
    strategy = deployment["spec"].get("strategy", {})
    assert strategy.get("rollingUpdate", {}).get("maxUnavailable") == 0


@pytest.mark.parametrize("name", sorted(APP_PORTS))
def test_read_only_root_has_a_writable_tmp(k8s_by_kind: dict[str, list[dict[str, Any]]], name: str) -> None:
    deployment = _named(k8s_by_kind, "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("name", sorted(APP_PORTS))
def test_deployment_configuration_sources(k8s_by_kind: dict[str, list[dict[str, Any]]], name: str) -> None:
    deployment = _named(k8s_by_kind, "Deployment")[name]
    container = _container(deployment)
    configmaps = _named(k8s_by_kind, "ConfigMap")
    secrets = _named(k8s_by_kind, "Secret")
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "secrets are passed one by one, not the whole Secret"
        assert source["configMapRef"]["name"] in configmaps
    env = _env(container)
    for item in env.values():
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] in secrets
            assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    for env_name, key in REQUIRED_SECRET_ENV[name].items():
        assert env[env_name]["valueFrom"]["secretKeyRef"]["key"] == key, env_name


def test_environment_names_come_from_the_contract(
    k8s_by_kind: dict[str, list[dict[str, Any]]], contract_env: frozenset[str]
) -> None:
    for configmap in k8s_by_kind["ConfigMap"]:
        assert set(configmap["data"]) <= contract_env
    for deployment in k8s_by_kind["Deployment"]:
        assert set(_env(_container(deployment))) <= contract_env


def test_configmap_is_production_and_not_secret(k8s_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    (configmap,) = k8s_by_kind["ConfigMap"]
    data = configmap["data"]
    assert data["ENVIRONMENT"] == "production"
    assert data["HOST"] == "0.0.0.0"
    assert data["CREDITS_URL"] == f"http://credits:{APP_PORTS['credits']}"
    assert data["BILLING_URL"] == f"http://billing:{APP_PORTS['billing']}"
    assert data["OPENAI_BASE_URL"].endswith("/v1")
    secret_like = {"INTERNAL_TOKEN", "ADMIN_TOKEN", "USER_TOKEN_SECRET", "DATABASE_URL", "RABBITMQ_URL"}
    assert not (set(data) & (secret_like | SECRET_KEYS))
    assert all(isinstance(value, str) for value in data.values())


def test_secret_is_an_example_with_placeholders(k8s_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    (secret,) = k8s_by_kind["Secret"]
    assert secret["type"] == "Opaque"
    data = secret["stringData"]
    assert SECRET_KEYS <= set(data)
    dev_defaults = {"dev-internal-token", "dev-admin-token", "dev-user-token-secret"}
    for key, value in data.items():
        assert "REPLACE_ME" in value, key
        assert value not in dev_defaults
    assert "data" not in secret


@pytest.mark.parametrize("name", sorted(APP_PORTS))
def test_service_matches_deployment(k8s_by_kind: dict[str, list[dict[str, Any]]], name: str) -> None:
    service = _named(k8s_by_kind, "Service")[name]
    deployments = _named(k8s_by_kind, "Deployment")
    selector = service["spec"]["selector"]
    selected = [
        d
        for d in deployments.values()
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert [d["metadata"]["name"] for d in selected] == [name]
    container_ports = {p["name"]: p["containerPort"] for p in _container(selected[0])["ports"]}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        resolved = container_ports.get(target, target) if isinstance(target, str) else target
        assert resolved in container_ports.values()
        assert port["port"] == APP_PORTS[name]


def test_only_the_three_services(k8s_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    services = _named(k8s_by_kind, "Service")
    assert set(services) == set(APP_PORTS)
    for service in services.values():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_hpa_targets_the_proxy(k8s_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    (hpa,) = k8s_by_kind["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "proxy"}
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] <= spec["maxReplicas"]
    proxy = _named(k8s_by_kind, "Deployment")["proxy"]
    assert "replicas" not in proxy["spec"], "the HPA owns the proxy's replica count"
    requests = _container(proxy)["resources"]["requests"]
    for metric in spec["metrics"]:
        assert metric["type"] == "Resource"
        assert metric["resource"]["name"] in requests, "utilization needs a request to compare with"


def test_pdb_protects_the_proxy(k8s_by_kind: dict[str, list[dict[str, Any]]]) -> None:
    pdbs = _named(k8s_by_kind, "PodDisruptionBudget")
    (hpa,) = k8s_by_kind["HorizontalPodAutoscaler"]
    proxy_labels = _named(k8s_by_kind, "Deployment")["proxy"]["spec"]["template"]["metadata"]["labels"]
    pdb = pdbs["proxy"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= proxy_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to proceed"
    deployments = _named(k8s_by_kind, "Deployment")
    for name, budget in pdbs.items():
        if name == "proxy":
            continue
        replicas = deployments[name]["spec"]["replicas"]
        assert budget["spec"]["minAvailable"] < replicas, name
