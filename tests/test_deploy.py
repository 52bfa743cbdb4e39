"""docker-compose.yml and deploy/ checked statically (no Docker engine or cluster here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_are_healthchecked_and_wait_for_healthy_dependencies():
    services = compose()["services"]
    assert {"triton", "redis", "milvus", "etcd", "minio", "detection", "embedding", "rerank", "gateway",
            "worker"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, cond in deps.items():
            assert dep in services and cond == {"condition": "service_healthy"}, (name, dep)


def test_compose_builds_only_existing_services_and_wires_their_ports():
    services = compose()["services"]
    for name, svc in services.items():
        if "build" not in svc:
            continue
        target = svc["build"]["args"]["SERVICE"]
        assert target == name and (ROOT / "services" / target / "__main__.py").is_file()
        env = svc["environment"]
        if name != "worker":
            port = env[f"VISEARCH_{name.upper()}_PORT"]
            assert f"localhost:{port}" in " ".join(svc["healthcheck"]["test"])
        for dep in ("detection", "embedding", "rerank"):
            assert env[f"VISEARCH_{dep.upper()}_ADDR"] == f"{dep}:{env[f'VISEARCH_{dep.upper()}_PORT']}"


def test_compose_secrets_are_required_not_defaulted():
    text = (ROOT / "docker-compose.yml").read_text()
    refs = re.findall(r"\$\{([A-Z_]+)([^}]*)\}", text)
    assert refs
    for var, rest in refs:
        if "PASSWORD" in var or "SECRET" in var or "KEY" in var:
            assert rest.startswith(":?"), f"${{{var}}} must be required with :?"


def test_k8s_manifests_probe_over_grpc_and_match_config():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "visearch.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"gateway", "detection", "embedding", "rerank", "worker", "triton"}
    gpu = deployments.pop("triton")["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert gpu["nvidia.com/gpu"] == "1"
    hpas = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    pdbs = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert {"embedding", "gateway", "worker"} <= hpas and {"embedding", "gateway", "worker"} <= pdbs
    for name, dep in deployments.items():
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert (ROOT / "services" / name).is_dir()
        if name == "worker":
            continue
        port = int(config[f"VISEARCH_{name.upper()}_PORT"])
        assert c["readinessProbe"]["grpc"]["port"] == port == c["ports"][0]["containerPort"]
        if name != "gateway":
            assert config[f"VISEARCH_{name.upper()}_ADDR"].endswith(f"{name}:{port}")


def _run(*argv: str):
    import subprocess
    import sys

    bindir = Path(sys.executable).parent
    return subprocess.run([str(bindir / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120)


def test_compose_validates_against_the_compose_spec(tmp_path):
    ok = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("healthcheck:", "healthchek:", 1))
    bad = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken))
    assert bad.returncode != 0, "the validator must catch a misspelt key"


def test_k8s_manifests_validate_against_the_kubernetes_schemas(tmp_path):
    ok = _run("kubernetes-validate", "--strict", str(ROOT / "deploy" / "k8s" / "visearch.yaml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "k8s.yaml"
    broken.write_text((ROOT / "deploy" / "k8s" / "visearch.yaml").read_text().replace("containerPort:", "containerPrt:", 1))
    assert _run("kubernetes-validate", "--strict", str(broken)).returncode != 0
