"""docker-compose.yml and deploy/ checked statically (no Docker engine or cluster here)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.kustomize import canonical, files, render
from tests.test_dashboards import label_values, parse, problems, promtool, served_series
from visearch import redisconn
from visearch.pbtxt import parse_pbtxt
from visearch.queue import INGEST_QUEUE
from visearch.settings import QueueSettings, StoreSettings
from visearch.triton_repo import main as triton_repo_main

ROOT = Path(__file__).resolve().parent.parent
# Where every component, the Redis chart and KEDA read the Redis password.
REDIS_SECRET = {"name": "visearch-secrets", "key": "redis-password"}


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
    # The base runs on any cluster: Triton on the CPU (deploy/k8s/gpu puts it on a GPU).
    triton = deployments.pop("triton")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in {**triton["requests"], **triton["limits"]}
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
    # Redis: the URL in the ConfigMap, its password from the Secret, for every component that uses it.
    for name, dep in deployments.items():
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        assert "VISEARCH_REDIS_URL" not in env, f"{name}: VISEARCH_REDIS_URL comes from the ConfigMap"
        assert env["VISEARCH_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == REDIS_SECRET, name
    assert config["VISEARCH_REDIS_URL"].startswith("redis://") and "@" not in config["VISEARCH_REDIS_URL"]
    # Every component reads the ConfigMap, and it gives each process one BLAS thread as the mesh does.
    for name, dep in deployments.items():
        refs = dep["spec"]["template"]["spec"]["containers"][0].get("envFrom", [])
        assert {"configMapRef": {"name": "visearch-config"}} in refs, name
    assert config["OMP_NUM_THREADS"] == config["OPENBLAS_NUM_THREADS"] == "1"


def test_compose_services_run_one_blas_thread_each_as_the_mesh_does():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ours = {n: s for n, s in compose["services"].items() if (ROOT / "services" / n).is_dir()}
    assert {"gateway", "detection", "embedding", "rerank", "worker"} <= set(ours)
    for name, svc in ours.items():
        assert svc["environment"]["OMP_NUM_THREADS"] == svc["environment"]["OPENBLAS_NUM_THREADS"] == "1", name


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


# ------------------------------------------------------------------ production topology: KEDA, Milvus, Redis, GPU

KUSTOMIZATIONS = [ROOT / "deploy" / "k8s", ROOT / "deploy" / "production"]
PRODUCTION = ROOT / "deploy" / "production"
SCHEMAS = ROOT / "deploy" / "schemas"
# The oldest Kubernetes the manifests are written for (KEDA 2.x and HPA autoscaling/v2 run there) and the
# newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Custom resources -> the schema deploy/schemas holds for them (the core kinds: kubernetes-validate).
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject",
          ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication",
          ("milvus.io/v1beta1", "Milvus"): "milvus"}


def schema_errors(name: str, doc) -> list[str]:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]


def manifest_errors(doc: dict) -> list[str]:
    """What is wrong with one object: the Kubernetes schema (strict) for a core kind, deploy/schemas for a
    custom resource; a kind neither knows is an error."""
    kv = kubernetes_validate
    custom = CUSTOM.get((doc.get("apiVersion"), doc.get("kind")))
    if custom:
        return schema_errors(custom, doc)
    errors = []
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}: add one to deploy/schemas"]
        except kv.ValidationError as exc:
            errors.append(f"Kubernetes {version}: {'/'.join(map(str, exc.path))}: {exc.message}")
    return errors


def rendered(folder: Path = PRODUCTION) -> list[dict]:
    return render(folder)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def redis_values() -> dict:
    return yaml.safe_load((PRODUCTION / "redis-values.yaml").read_text())


def test_every_manifest_validates_against_a_schema():
    """Each kustomization renders, and each object it makes is valid (strict Kubernetes schemas for the core
    kinds, deploy/schemas for KEDA's and the Milvus Operator's custom resources); the Redis chart's values
    against theirs. Every file in deploy/k8s and deploy/production is one of those, so none escapes."""
    seen: set[Path] = set()
    for folder in KUSTOMIZATIONS:
        docs = rendered(folder)
        bad = {f"{d['kind']}/{d['metadata']['name']}": e for d in docs if (e := manifest_errors(d))}
        assert not bad, f"{folder}: {bad}"
        seen |= files(folder)
    assert schema_errors("redis-values", redis_values()) == []
    seen.add((PRODUCTION / "redis-values.yaml").resolve())
    on_disk = {p.resolve() for d in ("k8s", "production") for p in (ROOT / "deploy" / d).rglob("*.yaml")}
    assert on_disk - seen == set(), "files in deploy/ that no kustomization uses, so nothing checks"
    kinds = {(d["apiVersion"], d["kind"]) for d in rendered()}
    assert set(CUSTOM) <= kinds


def test_the_schemas_catch_mistakes():
    docs = rendered()
    so = by_kind(docs, "ScaledObject")["worker"]
    milvus = next(iter(by_kind(docs, "Milvus").values()))
    triton = by_kind(docs, "Deployment")["triton"]

    def broken(doc, path, value=None, delete=False, rename=None):
        doc = copy.deepcopy(doc)
        *parents, last = path
        node = doc
        for p in parents:
            node = node[p]
        if rename:
            node[rename] = node.pop(last)
        elif delete:
            del node[last]
        else:
            node[last] = value
        return doc

    trigger = ["spec", "triggers", 0]
    for bad in (broken(so, [*trigger, "metadata", "listLength"], 4),  # a number, where the CRD takes strings
                broken(so, [*trigger, "metadata", "listName"], rename="listname"),
                broken(so, [*trigger, "metadata", "sentinelMaster"], delete=True),
                broken(so, [*trigger, "type"], "redis-sentinal"),
                broken(so, ["spec", "minReplicaCount"], -1),
                broken(so, ["spec", "pollingInterval"], rename="pollingIntervall")):
        assert manifest_errors(bad), bad["spec"]
    gateway = by_kind(docs, "ScaledObject")["gateway"]
    assert manifest_errors(broken(gateway, [*trigger, "metadata", "query"], delete=True))
    assert manifest_errors(broken(gateway, ["spec", "triggers", 1, "metricType"], delete=True))  # cpu needs it
    for bad in (broken(milvus, ["spec", "components", "queryNode"], rename="queryNodes"),
                broken(milvus, ["spec", "components", "queryNode", "replicas"], "3"),
                broken(milvus, ["spec", "dependencies", "msgStreamType"], "rocksmq"),  # one process's, not a cluster's
                broken(milvus, ["spec", "mode"], "distributed")):
        assert manifest_errors(bad)
    assert manifest_errors(broken(triton, ["spec", "template", "spec", "nodeSelector"], rename="nodeSelecter"))
    values = redis_values()
    assert schema_errors("redis-values", broken(values, ["sentinel", "masterSet"], rename="masterset"))
    assert schema_errors("redis-values", broken(values, ["architecture"], "standalone"))  # Sentinel needs replicas
    assert manifest_errors({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def test_the_rendering_is_kubectl_kustomize_s():
    """tests/kustomize.py renders what `kubectl kustomize` does (where kubectl is installed: the CI machine's
    image has it), so the checks above see what a cluster would get."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the rendering is checked against it where it is")
    for folder in KUSTOMIZATIONS:
        out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        theirs = canonical([d for d in yaml.safe_load_all(out.stdout) if d])
        assert canonical(rendered(folder)) == theirs, folder


def test_scaled_objects_scale_deployments_that_exist_on_what_the_code_serves():
    """The workers scale on the Celery queue the code uses, found through the sentinels and master the
    services' VISEARCH_REDIS_URL names, with the password from the Secret they read; the gRPC services on
    metrics their processes serve (tests/test_dashboards.py's check); no CPU HPA is left to fight KEDA."""
    docs = rendered()
    deployments, scaled = by_kind(docs, "Deployment"), by_kind(docs, "ScaledObject")
    auths = by_kind(docs, "TriggerAuthentication")
    config = by_kind(docs, "ConfigMap")["visearch-config"]["data"]
    assert set(scaled) == {"worker", "gateway", "embedding"}
    hpa_targets = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    series, labels = served_series(), label_values()
    for name, so in scaled.items():
        spec = so["spec"]
        ref = spec["scaleTargetRef"]
        assert ref["name"] in deployments and (ref.get("kind", "Deployment"), ref.get("apiVersion", "apps/v1")) == (
            "Deployment", "apps/v1"), ref
        assert ref["name"] not in hpa_targets, f"{ref['name']}: an HPA and a ScaledObject would both scale it"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert spec["pollingInterval"] <= 30 and spec["cooldownPeriod"] >= 60, name
        for trig in spec["triggers"]:
            meta = trig["metadata"]
            if trig["type"] == "prometheus":
                query = meta["query"]
                assert problems(query, series, labels) == [], query
                # ...and counts the pods of the Deployment it scales (prometheus.yml: job visearch-<app>).
                app = deployments[ref["name"]]["spec"]["template"]["metadata"]["labels"]["app"]
                jobs = {v for _, ms in parse(query)[0] for label, op, v in ms if label == "job"}
                assert jobs == {f"visearch-{app}"}, query
                assert float(meta["threshold"]) > 0
    worker = scaled["worker"]["spec"]
    [trig] = [t for t in worker["triggers"] if t["type"].startswith("redis")]
    meta = trig["metadata"]
    assert meta["listName"] == INGEST_QUEUE
    target = redisconn.parse_sentinel(config["VISEARCH_REDIS_URL"])
    assert target is not None and trig["type"] == "redis-sentinel", "production's Redis is Sentinel"
    assert [tuple(a.strip().rsplit(":", 1)) for a in meta["addresses"].split(",")] == [
        (h, str(p)) for h, p in target.hosts]
    assert (meta["sentinelMaster"], int(meta.get("databaseIndex", "0"))) == (target.master, target.db)
    auth = auths[trig["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["name"], a["key"]) for a in auth} == {
        ("password", REDIS_SECRET["name"], REDIS_SECRET["key"])}


def test_the_in_flight_queries_parse(tmp_path):
    """promtool reads each ScaledObject query (as a recording rule), as it does the dashboard's."""
    queries = [t["metadata"]["query"] for so in by_kind(rendered(), "ScaledObject").values()
               for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(queries) == 2
    path = tmp_path / "keda.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": [
        {"record": f"keda:query_{n}", "expr": q} for n, q in enumerate(queries)]}]}))
    ok = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_redis_sentinel_values_agree_with_the_services_url():
    """The Bitnami chart's values make the Sentinel the services' VISEARCH_REDIS_URL names (master set, pod
    names, sentinel port), with the password from the same Secret, sentinels without one (visearch's clients
    give it to the primary only), a quorum that is a majority, and a Redis that never evicts."""
    values = redis_values()
    config = by_kind(rendered(), "ConfigMap")["visearch-config"]["data"]
    target = redisconn.parse_sentinel(config["VISEARCH_REDIS_URL"])
    assert values["sentinel"]["enabled"] and values["architecture"] == "replication"
    assert values["sentinel"]["masterSet"] == target.master
    name, n = values["fullnameOverride"], values["replica"]["replicaCount"]
    port = values["sentinel"]["containerPorts"]["sentinel"]
    assert list(target.hosts) == [(f"{name}-node-{i}.{name}-headless", port) for i in range(n)]
    assert n // 2 < values["sentinel"]["quorum"] <= n
    auth = values["auth"]
    assert auth["enabled"] and auth["sentinel"] is False
    assert {"name": auth["existingSecret"], "key": auth["existingSecretPasswordKey"]} == REDIS_SECRET
    conf = dict(line.split(None, 1) for line in values["commonConfiguration"].splitlines() if line.strip())
    assert conf["maxmemory-policy"] == "noeviction" and conf["appendonly"] == "yes" and conf["maxmemory"]
    # What the services make of it: the URL with the Secret's password in, which the clients read back.
    url = QueueSettings(redis_url=config["VISEARCH_REDIS_URL"], redis_password="p@ss:w/rd").redis_url
    assert redisconn.parse_sentinel(url) == redisconn.SentinelTarget(target.hosts, target.master, target.db, "p@ss:w/rd")
    # The base keeps a single Redis (the chart's standalone `redis-master`).
    base = by_kind(rendered(ROOT / "deploy" / "k8s"), "ConfigMap")["visearch-config"]["data"]
    assert redisconn.parse_sentinel(base["VISEARCH_REDIS_URL"]) is None


def test_the_milvus_cluster_is_the_one_the_services_use():
    """Cluster mode with query, data and index nodes and their dependencies as the operator expects; the
    Milvus version the store is tested against; the services' VISEARCH_MILVUS_URI names its proxy; the
    bounded-staleness window stays above its graceful time."""
    docs = rendered()
    [milvus] = by_kind(docs, "Milvus").values()
    spec = milvus["spec"]
    assert spec["mode"] == "cluster"
    comps = spec["components"]
    for node in ("queryNode", "dataNode", "indexNode", "proxy"):
        assert comps[node]["replicas"] >= 2, node
    deps = spec["dependencies"]
    stream = deps["msgStreamType"]
    assert stream in ("pulsar", "kafka") and stream in deps and {"etcd", "storage"} <= set(deps)
    assert deps["etcd"]["inCluster"]["values"]["replicaCount"] >= 3
    for dep in ("etcd", "storage", stream):
        assert deps[dep]["inCluster"]["deletionPolicy"] == "Retain", dep
    tested = compose()["services"]["milvus"]["image"]
    assert comps["image"] == tested, "the version the compose file and the store's tests run"
    uri = urlsplit(by_kind(docs, "ConfigMap")["visearch-config"]["data"]["VISEARCH_MILVUS_URI"])
    assert (uri.hostname, uri.port) == (f"{milvus['metadata']['name']}-milvus", 19530)
    graceful = spec["config"]["common"]["gracefulTime"] / 1000
    assert graceful < StoreSettings.model_fields["bounded_window_seconds"].default


def test_the_gpu_variant_serves_the_derived_gpu_repository(tmp_path, model_repo):
    """deploy/k8s/gpu: Triton on a GPU node (one GPU, node selector, toleration), serving the repository its
    init container derives with visearch.triton_repo --gpu from the mounted model_repository/; that very
    command, run here, writes GPU configs."""
    deployments = by_kind(rendered(), "Deployment")
    pod = deployments["triton"]["spec"]["template"]["spec"]
    [triton] = pod["containers"]
    for kind in ("requests", "limits"):
        assert triton["resources"][kind]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    [init] = pod["initContainers"]
    images = {c["image"] for d in deployments.values() for c in d["spec"]["template"]["spec"]["containers"]}
    assert init["image"] in images, "a visearch image the base deploys"
    argv = init["command"]
    assert argv[:4] == ["python", "-m", "visearch.triton_repo", "--gpu"]
    src, dst = argv[-2:]
    cache = argv[argv.index("--trt-cache") + 1]

    def mounts(container):
        return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    assert mounts(init)[src] == mounts(triton)[src] == "models"  # the links it writes resolve in Triton
    assert mounts(init)[dst] == mounts(triton)[dst] and mounts(triton)[cache] != "models"
    assert f"--model-repository={dst}" in triton["args"]
    # The command itself, on this checkout's models.
    local = [a.replace(src, str(model_repo)).replace(dst, str(tmp_path / "gpu")) for a in argv[3:]]
    assert triton_repo_main(local) == 0, shlex.join(local)
    conf = parse_pbtxt((tmp_path / "gpu" / "embedder" / "config.pbtxt").read_text())
    assert conf["instance_group"] == [{"count": [1], "kind": ["KIND_GPU"], "gpus": [0]}]
    accel = conf["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"][0]
    params = {p["key"][0]: p["value"][0] for p in accel["parameters"]}
    assert params["trt_engine_cache_path"].startswith(cache + "/")
