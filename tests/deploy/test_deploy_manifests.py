"""The deploy/ files are valid and agree with each other and with the code:
Kubernetes manifests (kubernetes-validate, offline schemas), the compose file,
the example and in-cluster gateway configs (load_config), the Dockerfile."""

from __future__ import annotations

import functools
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bon_gateway.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.30"  # oldest release these manifests target (native gRPC probes, preStop sleep)

try:
    import kubernetes_validate
except ImportError:  # a dev extra; CI installs it, so there a missing one is a failure
    if os.environ.get("CI"):
        raise
    pytest.skip("kubernetes-validate not installed (pip install -e '.[dev]')", allow_module_level=True)


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.cache
def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _documents(path):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


MANIFEST_FILES = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_kubernetes_manifest_is_valid(name: str) -> None:
    for doc in _documents(K8S / name):
        # strict: unknown fields (a typo in a probe, a misplaced key) are errors too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_can_fail() -> None:
    doc = _manifests()[("Deployment", "bon-gateway")]
    broken = json.loads(json.dumps(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # Everything but the Secret example, which holds placeholder keys.
    expected = sorted(n for n in MANIFEST_FILES if n != "secret.example.yaml")
    assert sorted(kustomization["resources"]) == expected


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _in_cluster_config() -> str:
    return str(_manifests()[("ConfigMap", "bon-gateway-config")]["data"]["gateway.toml"])


def test_gateway_deployment() -> None:
    docs = _manifests()
    deployment = docs[("Deployment", "bon-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    gateway = _container(deployment)
    assert gateway["args"][:1] == ["serve"]
    assert gateway["args"][gateway["args"].index("--config") + 1] == "/etc/bon-gateway/gateway.toml"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": 8080, "grpc": 50051}
    for kind in ("requests", "limits"):
        assert "nvidia.com/gpu" not in gateway["resources"][kind]
        assert {"cpu", "memory"} <= set(gateway["resources"][kind])
    # The pod must outlive the longest request so SIGTERM can drain it.
    config = parse_config(tomllib.loads(_in_cluster_config()))
    assert pod["terminationGracePeriodSeconds"] > config.server.request_timeout_s
    # API keys come from a Secret, not the ConfigMap.
    secret_env = [e for e in gateway["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert [e["valueFrom"]["secretKeyRef"]["name"] for e in secret_env] == ["bon-gateway-api-keys"]
    secret = docs[("Secret", "bon-gateway-api-keys")]
    assert secret_env[0]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]


def test_gateway_service_ports() -> None:
    service = _manifests()[("Service", "bon-gateway")]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8080, "grpc": 50051}
    pods = _manifests()[("Deployment", "bon-gateway")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pods.items()


def test_reward_workers_are_gpu_pods_behind_a_headless_service() -> None:
    docs = _manifests()
    deployment = docs[("Deployment", "reward-workers")]
    worker = _container(deployment)
    args = worker["args"]
    assert args[0] == "worker"
    assert args[args.index("--listen") + 1] == "0.0.0.0:50061"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == 50061
    service = docs[("Service", "reward-workers")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["port"] == 50061
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # The worker's --model names an entry of the shared config.
    config = parse_config(tomllib.loads(_in_cluster_config()))
    assert config.reward_model(args[args.index("--model") + 1])


def test_in_cluster_config_points_at_the_headless_service() -> None:
    config = parse_config(tomllib.loads(_in_cluster_config()))
    service = _manifests()[("Service", "reward-workers")]["metadata"]
    expected = f"dns:///{service['name']}.{service['namespace']}.svc.cluster.local:50061"
    assert config.reward_models, "no reward model in the ConfigMap"
    for model in config.reward_models:
        assert model.addresses == (expected,)
        assert model.workers == 0  # gateway pods spawn none: remote workers only
    assert config.server.host == "0.0.0.0"


# Limits against hostile clients and bad upstreams/workers (issue 13): an operator reading
# the ConfigMap sees them and their values (the gateway's defaults) instead of guessing.
HARDENING_KEYS = {
    ("server", "limits"): ("max_header_bytes", "header_timeout_s", "body_timeout_s", "max_connections"),
    ("generator",): ("max_response_bytes",),
}
PROBE_KEYS = ("interval_s", "timeout_s", "restart_after_s")


def test_in_cluster_config_writes_out_the_hardening_limits_at_their_defaults() -> None:
    raw = tomllib.loads(_in_cluster_config())
    defaults = parse_config({"reward_models": [{"name": "m", "path": "p"}]})
    for table, keys in HARDENING_KEYS.items():
        section, default_section = raw, defaults
        for name in table:
            section, default_section = section[name], getattr(default_section, name)
        for key in keys:
            assert key in section, f"[{'.'.join(table)}] {key} missing from the ConfigMap"
            assert section[key] == getattr(default_section, key), key
    for model in raw["reward_models"]:
        probe = model.get("probe", {})
        for key in PROBE_KEYS:
            assert key in probe, f"[reward_models.probe] {key} missing from the ConfigMap"
            assert probe[key] == getattr(defaults.reward_models[0].probe, key), key


def test_every_object_is_in_the_namespace() -> None:
    for (kind, name), doc in _manifests().items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "bon-gateway", f"{kind}/{name}"


def test_example_config_loads() -> None:
    config = load_config(DEPLOY / "gateway.example.toml")
    model = config.reward_model("skywork")
    assert model.path == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
    assert model.device == "cuda"
    assert model.addresses == ()  # co-located workers, spawned by the gateway
    assert config.server.host == "0.0.0.0"


def test_compose_services() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "gateway", "prometheus", "grafana"}
    gateway = services["gateway"]
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).is_file()
    for name in ("vllm", "gateway"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    # Every bind-mounted file exists (paths are relative to deploy/).
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    # The gateway's config mount is the example config, whose generator is the vllm service.
    config = load_config(DEPLOY / "gateway.example.toml")
    assert config.generator.url.startswith("http://vllm:8000/")
    assert services["vllm"]["command"][0] == config.generator.model
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"gateway:{config.server.http_port}"]


def test_grafana_provisioning() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "bon-gateway.yaml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]]
    assert f"{path}/bon-gateway.json" in mounts


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert stages[-1].startswith("nvidia/cuda:") and "runtime" in stages[-1]
    assert re.search(r"PYTHON_VERSION=3\.11\b", text)
    assert '".[gpu]"' in text
    final = text[text.rindex("\nFROM ") :]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and not user[-1].startswith(("root", "0")), "the image must run as non-root"
    assert re.search(r'^ENTRYPOINT \["bon-gateway"\]', final, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", final, re.M)
    # Everything the Dockerfile copies survives its .dockerignore.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    allowed = {line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")}
    for args in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for source in args.split()[:-1]:
            assert source.rstrip("/") in allowed, f"{source} is excluded by Dockerfile.dockerignore"


def test_worker_args_parse_with_the_worker_cli(tmp_path: Path) -> None:
    """The reward-worker pod's command line is one `bon-gateway worker` accepts."""
    worker_cli = pytest.importorskip("bon_gateway.scoring.worker.__main__")
    args = list(_container(_manifests()[("Deployment", "reward-workers")])["args"])
    assert args[0] == "worker"
    config = tmp_path / "gateway.toml"
    config.write_text(_in_cluster_config())
    args[args.index("--config") + 1] = str(config)  # the ConfigMap, as mounted in the pod
    parsed = worker_cli.build_parser().parse_args(args[1:])
    entries = worker_cli.model_entries(parsed)
    assert [e.name for e in entries] == ["skywork"]
    assert entries[0].device == "cuda"


def test_only_gateways_reach_the_workers() -> None:
    docs = _manifests()
    policy = docs[("NetworkPolicy", "reward-workers")]["spec"]
    workers = docs[("Deployment", "reward-workers")]["spec"]["template"]["metadata"]["labels"]
    gateways = docs[("Deployment", "bon-gateway")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= workers.items()
    (rule,) = policy["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= gateways.items()
    assert not rule["from"][0]["podSelector"]["matchLabels"].items() <= workers.items()
    assert rule["ports"] == [{"port": 50061, "protocol": "TCP"}]
