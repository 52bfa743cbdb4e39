"""The Grafana dashboard and the Prometheus alert rules in deploy/, checked against the metrics the code serves.

Every metric, label and label value an expression names must be one the code registers (read from the
source with `ast` and from prometheus_client's registry), so a renamed metric fails here rather than
leaving a panel empty or an alert silent. The rules are also parsed and unit-tested by promtool
(Debian's prometheus package: `make prometheus`).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "visearch.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S = ROOT / "deploy" / "k8s" / "visearch.yaml"

METRIC_TYPES = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary",
                "Info": "info", "Enum": "stateset"}
# Labels Prometheus puts on every series it scrapes (prometheus.yml's relabelling adds namespace and pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
# Series Prometheus makes itself for each target.
SYNTHETIC = {"up": set(), "scrape_duration_seconds": set(), "scrape_samples_scraped": set()}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",), "stateset": ("",)}
# Words of PromQL that are not metrics; the aggregators too, as they may come before their `by (...)`.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan", "atan2", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
            "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def declared_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) of every prometheus_client metric made in visearch/ and services/,
    read from the source (nothing imported)."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for path in [*(ROOT / "visearch").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        if "_pb2" in path.name:
            continue
        tree = ast.parse(path.read_text(), str(path))
        local = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "prometheus_client" for a in node.names if a.name in METRIC_TYPES}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in local):
                continue
            kind = METRIC_TYPES[local[node.func.id]]
            name = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            assert isinstance(name, str), f"{path}:{node.lineno}: a metric whose name is not a literal"
            labels = next((kw.value for kw in node.keywords if kw.arg == "labelnames"),
                          node.args[2] if len(node.args) > 2 else None)
            names = tuple(ast.literal_eval(labels)) if labels is not None else ()
            if kind == "counter":
                name = name.removesuffix("_total")
            assert name not in found, f"{name} made twice"
            found[name] = (kind, names)
    return found


def served_series() -> dict[str, set[str]]:
    """Every series name a visearch process can serve (or Prometheus makes per target) -> its labels."""
    from prometheus_client import REGISTRY

    import visearch.observability  # noqa: F401 - registers the project's metrics

    declared = declared_metrics()
    registered = {m.name: m for m in REGISTRY.collect()}
    ours = {n for n in registered if n.startswith("visearch_")}
    assert ours == set(declared), f"registry {sorted(ours ^ set(declared))} differ from the source"
    series: dict[str, set[str]] = {name: set(labels) for name, labels in SYNTHETIC.items()}
    for name, (kind, labels) in declared.items():
        for suffix in SUFFIXES[kind]:
            series[name + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    for name, family in registered.items():  # prometheus_client's own: process_*, python_*
        if not name.startswith("visearch_"):
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
    return series


def label_values() -> dict[str, set[str]]:
    """What the labels with a closed set of values can be: the services' names, their methods, gRPC codes."""
    from visearch.detection.v1 import detection_pb2
    from visearch.embedding.v1 import embedding_pb2
    from visearch.gateway.v1 import gateway_pb2
    from visearch.rerank.v1 import rerank_pb2

    services = [s for m in (gateway_pb2, detection_pb2, embedding_pb2, rerank_pb2)
                for s in m.DESCRIPTOR.services_by_name.values()]
    components = {d["metadata"]["name"] for d in yaml.safe_load_all(K8S.read_text())
                  if d["kind"] == "Deployment" and d["metadata"]["name"] != "triton"}
    return {"service": {s.name for s in services}, "method": {m.name for s in services for m in s.methods},
            "code": {c.name for c in grpc.StatusCode}, "job": {f"visearch-{c}" for c in components}}


TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]|[a-zA-Z_:][a-zA-Z0-9_:]*|\S')
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """The selectors of a PromQL expression [(metric, [(label, op, value)])] and the labels its
    by/without/on/ignoring/group_* clauses name."""
    tokens = TOKEN.findall(expr)
    selectors, grouping = [], set()
    i = 0
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t in GROUPING and nxt == "(":
            j = tokens.index(")", i)
            grouping |= {x for x in tokens[i + 2:j] if x != ","}
            i = j + 1
            continue
        if re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", t) and t not in KEYWORDS and nxt != "(":
            matchers = []
            if nxt.startswith("{"):
                body = nxt[1:-1]
                pos = 0
                while pos < len(body.strip()):
                    m = MATCHER.match(body, pos)
                    assert m, f"cannot read the matchers {nxt} in {expr!r}"
                    matchers.append(m.groups())
                    pos = m.end()
                i += 1
            selectors.append((t, matchers))
        i += 1
    return selectors, grouping


def problems(expr: str, series: dict[str, set[str]], values: dict[str, set[str]]) -> list[str]:
    """What in `expr` names a metric, label or label value the code does not serve."""
    selectors, grouping = parse(expr)
    out = []
    if not selectors:
        out.append("no metric at all")
    known = set(TARGET_LABELS)
    for metric, matchers in selectors:
        if metric not in series:
            out.append(f"metric {metric} is not served by any visearch process")
            continue
        labels = series[metric] | TARGET_LABELS
        known |= series[metric]
        for label, op, value in matchers:
            if label not in labels:
                out.append(f"{metric} has no label {label}")
            elif label in values:
                if op in ("=", "!="):
                    alternatives, regex = [value], False
                else:
                    alternatives, regex = value.split("|"), True
                for alt in alternatives:
                    if regex and re.search(r"[.*+?()\[\]^$]", alt):  # a pattern: it must match some value
                        if not any(re.fullmatch(value, v) for v in values[label]):
                            out.append(f"{label}=~{value!r} matches no {label} the code serves")
                        break
                    if alt not in values[label]:
                        out.append(f"{label} {alt!r} is not a {label} the code serves")
    for label in grouping - known:
        out.append(f"grouping by {label}, which none of its metrics has")
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for q in p.get("targets", []):
            out.append((p["title"], q["expr"]))
    return out


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_every_metric_the_dashboard_and_alerts_name_is_served():
    series, values = served_series(), label_values()
    exprs = dashboard_exprs() + [(r["alert"], r["expr"]) for r in rules()]
    assert len(exprs) > 20
    bad = {f"{where}: {expr.strip()}": p for where, expr in exprs if (p := problems(expr, series, values))}
    assert not bad, json.dumps(bad, indent=1)
    # And every metric of visearch has a panel: none is served without being looked at.
    shown = {m for _, e in dashboard_exprs() for m, _ in parse(e)[0]}
    for name, (kind, _) in declared_metrics().items():
        assert any(name + s in shown for s in SUFFIXES[kind]), f"{name} has no panel"


def test_the_check_catches_a_wrong_metric_label_or_value():
    series, values = served_series(), label_values()
    ok = 'histogram_quantile(0.99, sum by (le, method) (rate(visearch_rpc_seconds_bucket{service="GatewayService"}[5m])))'
    assert problems(ok, series, values) == []
    assert problems("sum(rate(visearch_rpc_second_count[5m]))", series, values) == [
        "metric visearch_rpc_second_count is not served by any visearch process"]
    assert problems("sum by (catalogue) (visearch_index_objects)", series, values) == [
        "grouping by catalogue, which none of its metrics has"]
    assert problems('visearch_rpc_in_flight{service="Gateway"}', series, values) == [
        "service 'Gateway' is not a service the code serves"]
    assert problems('rate(visearch_rpc_seconds_count{code=~"INTERNAL|UNAVAILBLE"}[5m])', series, values) == [
        "code 'UNAVAILBLE' is not a code the code serves"]
    assert problems('up{job=~"visearch-(gateway|search)"}', series, values) == []  # a pattern: matches gateway
    assert problems('up{job=~"visearch-(search|index)"}', series, values) == [
        "job=~'visearch-(search|index)' matches no job the code serves"]
    assert problems("visearch_index_objects{catalogue=\"x\"}", series, values) == [
        "visearch_index_objects has no label catalogue"]
    assert problems("sum(rate(visearch_ingested_items_total[5m])) or vector(0)", series, values) == []


def test_alert_rules_are_well_formed():
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    names = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Visearch[A-Z][A-Za-z]+", rule["alert"])
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert set(rule["annotations"]) == {"summary", "description"}
            names.append(rule["alert"])
    assert len(names) == len(set(names)) >= 8
    # Each alert is unit-tested (alerts.test.yml) firing at least once.
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert fired == set(names), set(names) ^ fired
    # And explained in docs/OBSERVABILITY.md.
    doc_text = (ROOT / "docs" / "OBSERVABILITY.md").read_text()
    assert [n for n in names if n not in doc_text] == []


def test_dashboard_is_well_formed():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and p["description"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"] == p["datasource"] and t["legendFormat"] for t in p["targets"]), p["title"]


def promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        pytest.fail("promtool is not installed: run `make prometheus` (Debian's prometheus package)")
    return exe


def test_promtool_parses_the_rules_and_their_unit_tests_pass():
    ok = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    tested = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_parses_every_dashboard_query(tmp_path):
    # Grafana's variables given values, each query becomes a recording rule promtool parses.
    records = [{"record": f"dashboard:query_{n}", "expr": e.replace("$__rate_interval", "1m")}
               for n, (_, e) in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    ok = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.rules.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]}))
    assert subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0


def test_prometheus_scrapes_every_component_under_the_jobs_the_alerts_name():
    """prometheus.yml keeps the k8s pods' ports named metrics*, under job visearch-<app>; the
    manifests give every component such ports, on the ports its settings serve /metrics on.
    (Debian's promtool is built without Kubernetes discovery, so this is read here.)"""
    scrape = yaml.safe_load(SCRAPE.read_text())
    assert [(SCRAPE.parent / f).is_file() for f in scrape["rule_files"]] == [True]
    [job] = scrape["scrape_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    [to_job] = [r for r in job["relabel_configs"] if r.get("target_label") == "job"]
    assert to_job["source_labels"] == ["__meta_kubernetes_pod_label_app"] and to_job["replacement"] == "visearch-$1"
    docs = list(yaml.safe_load_all(K8S.read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    apps = {}
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"] != "triton":
            [c] = d["spec"]["template"]["spec"]["containers"]
            apps[d["spec"]["template"]["metadata"]["labels"]["app"]] = [
                p for p in c.get("ports", []) if re.fullmatch(keep["__meta_kubernetes_pod_container_port_name"], p["name"])]
    assert {a for a in apps if re.fullmatch(keep["__meta_kubernetes_pod_label_app"], a)} == set(apps)
    for app, ports in apps.items():
        first = int(config["VISEARCH_WORKER_METRICS_PORT" if app == "worker" else "VISEARCH_METRICS_PORT"])
        # A worker's pool processes serve on consecutive ports (services/worker/app.py), one per process.
        from visearch.settings import WorkerSettings

        n = WorkerSettings.model_fields["worker_concurrency"].default if app == "worker" else 1
        assert sorted(p["containerPort"] for p in ports) == list(range(first, first + n)), app
    assert config["VISEARCH_HOST"] == "0.0.0.0"  # /metrics reachable from Prometheus, workers' too
    alerted = {v for r in rules() for _, ms in parse(r["expr"])[0] for label, _, v in ms if label == "job"}
    values = label_values()["job"]
    assert all(any(re.fullmatch(v, j) for j in values) for v in alerted) and {f"visearch-{a}" for a in apps} == values
