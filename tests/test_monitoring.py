"""deploy/monitoring: the alert rules and the Grafana dashboard read metrics a real server exports,
the rules pass promtool's checks and unit tests, and the kustomize component renders and
validates.

The metric names are checked against the /metrics of real servers (separate processes, tiny
random-weight checkpoints, the torch engine, one with static and one with continuous batching)
after real calls, so a renamed or dropped metric fails here, not on an operator's empty panel.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service import config
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from . import promql
from .test_cli import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
KUBERNETES = ROOT / "deploy" / "kubernetes"
RULES = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULE_TESTS = ROOT / "tests" / "monitoring" / "alerts-test.yaml"
RUNBOOKS = ROOT / "docs" / "operations-monitoring.md"

# Series the rules and the dashboard read from other exporters, which kube-prometheus-stack
# scrapes; docs/operations-monitoring.md names them.
EXTERNAL = {
    "kube_deployment_status_replicas_available": "kube-state-metrics",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "kube_pod_container_resource_limits": "kube-state-metrics",
    "container_memory_working_set_bytes": "cAdvisor (kubelet)",
    "container_memory_rss": "cAdvisor (kubelet)",
}
# Labels Prometheus adds to every scraped series (the PodMonitor's targets), not in /metrics.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint"}
GRPC_CODES = {code.name for code in grpc.StatusCode}


# ----- what the rules and the dashboard query -----

def rule_documents() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_documents()["spec"]["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included, rows left out."""
    found = []
    for panel in dashboard()["panels"]:
        found += panel.get("panels", [])
        if panel["type"] != "row":
            found.append(panel)
    return found


def variable_queries() -> list[tuple[str, str]]:
    """(selector, label) of every `label_values(selector, label)` template variable."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: not label_values(): {query}"
            found.append((match[1], match[2]))
    return found


def queries() -> dict[str, str]:
    """Every PromQL expression, by where it is."""
    found = {f"rule {rule.get('alert') or rule.get('record')}": rule["expr"] for rule in rules()}
    for panel in panels():
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for index, (selector, _) in enumerate(variable_queries()):
        found[f"variable {index}"] = selector
    return found


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


# ----- the tokenizer that finds the metric names -----

@pytest.mark.parametrize(("expr", "expected"), [
    ('histogram_quantile(0.95, sum by (namespace, le) (rate(a_bucket{code=~"X|Y"}[5m]))) > 10',
     [("a_bucket", (("code", "=~", "X|Y"),))]),
    ("sum without (instance) (rate(b_total[$__rate_interval])) / on (pod) group_left (node) "
     "c offset 5m", [("b_total", ()), ("c", ())]),
    ("60 * sum(rate(a[5m]) or rate(b[1h30m])) > bool 3 and d unless e",
     [("a", ()), ("b", ()), ("d", ()), ("e", ())]),
    ('label_replace(a{x="}", y!~"{\\"}"}, "dst", "$1", "src", "(.*)")',
     [("a", (("x", "=", "}"), ("y", "!~", '{"}')))]),
    ('{__name__="foo", job="x"} + ns:foo:rate5m{pod=~"$pod"}',
     [("foo", (("job", "=", "x"),)), ("ns:foo:rate5m", (("pod", "=~", "$pod"),))]),
    ("max by (pod) (f) / sum(g) by (pod) @ end()", [("f", ()), ("g", ())]),
    ("# a comment naming not_a_metric\nh - 1e-3 * 0x1f", [("h", ())]),
])
def test_selectors_are_found_and_function_keyword_and_label_names_are_not(
        expr: str, expected: list[tuple[str, tuple[tuple[str, str, str], ...]]]) -> None:
    found = [(s.name, tuple((m.label, m.op, m.value) for m in s.matchers))
             for s in promql.selectors(expr)]
    assert found == expected


def test_the_tokenizer_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="cannot read"):
        promql.selectors("a{code=~INTERNAL}")
    with pytest.raises(ValueError, match="cannot read"):
        promql.selectors("a ; b")


# ----- the live servers -----

@dataclass
class Scrape:
    """A server's /metrics: sample names and, by sample name, the labels and their values."""

    labels: dict[str, dict[str, set[str]]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        labels: dict[str, dict[str, set[str]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                seen = labels.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    seen.setdefault(label, set()).add(value)
        return cls(labels)


def live_scrape(model: Path, *flags: str) -> Scrape:
    """Start a real server, send it calls (one ok, one refused as invalid), scrape /metrics."""
    server = ServerProcess("--model", str(model), "--metrics-port", "-1", "--engine", "torch",
                           "--summary-max-tokens", "6", "--headline-max-tokens", "4",
                           "--num-beams", "1", *flags)
    try:
        server.wait_serving()
        [port] = [int(m[1]) for line in server.log
                  if (m := re.search(r"metrics on http://[\d.]+:(\d+)/metrics", line))]
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SummarizerStub(channel)
            reply = stub.Summarize(pb.SummarizeRequest(articles=[
                pb.Article(id="a", text="The council approved the new bus routes on Monday."),
                pb.Article(id="b", text="Storm floods homes along the coast.")]), timeout=120)
            assert [r.id for r in reply.results] == ["a", "b"]
            with pytest.raises(grpc.RpcError) as refused:
                stub.Summarize(pb.SummarizeRequest(articles=[pb.Article(text="  ")]), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            return Scrape.parse(answer.read().decode())
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scrapes(tiny_bart: Path) -> dict[str, Scrape]:
    static = live_scrape(tiny_bart, "--batching", "static")
    continuous = live_scrape(tiny_bart, "--batching", "continuous")
    # They really are the two modes: only continuous batching exports its decoding steps,
    # and only static batching observes batches.
    assert "summarizer_active_articles" in continuous.labels
    assert "summarizer_active_articles" not in static.labels
    assert "summarizer_decode_step_duration_seconds_count" in continuous.labels
    return {"static": static, "continuous": continuous}


def exported(scrapes: dict[str, Scrape]) -> dict[str, dict[str, set[str]]]:
    """Sample names of both servers, with the labels and values each was seen with."""
    merged: dict[str, dict[str, set[str]]] = {}
    for scrape in scrapes.values():
        for name, labels in scrape.labels.items():
            for label, values in labels.items():
                merged.setdefault(name, {}).setdefault(label, set()).update(values)
            merged.setdefault(name, {})
    return merged


@pytest.mark.slow
def test_every_metric_the_rules_and_dashboard_read_is_exported(
        scrapes: dict[str, Scrape]) -> None:
    live = exported(scrapes)
    used: dict[str, set[str]] = {}
    for where, expr in queries().items():
        for name in promql.metric_names(expr):
            used.setdefault(name, set()).add(where)
    ours = {name for name in used if name.startswith("summarizer_")}
    assert ours, "no summarizer metric found: the tokenizer is broken"
    missing = {name: sorted(used[name]) for name in ours if name not in live}
    assert not missing, f"not exported by a live server: {missing}"
    others = set(used) - ours - recorded()
    assert others <= set(EXTERNAL), f"from no known exporter: {others - set(EXTERNAL)}"
    assert set(EXTERNAL) <= set(used), "EXTERNAL lists series nothing reads"
    # Both kinds of batching are covered: each has metrics the other lacks, all read somewhere.
    for mode in ("static", "continuous"):
        assert any(name in scrapes[mode].labels for name in ours)
    assert "summarizer_batch_padding_ratio_bucket" in used  # static
    assert "summarizer_cache_used_bytes" in used  # continuous


@pytest.mark.slow
def test_label_matchers_name_exported_labels_and_real_values(scrapes: dict[str, Scrape]) -> None:
    live = exported(scrapes)
    for where, expr in queries().items():
        for selector in promql.selectors(expr):
            if not selector.name.startswith("summarizer_"):
                continue
            labels = live[selector.name]
            for matcher in selector.matchers:
                assert matcher.label in labels or matcher.label in TARGET_LABELS, (
                    f"{where}: {selector.name} has no label {matcher.label!r} "
                    f"(it has {sorted(labels)})")
                if matcher.label in ("code", "outcome") and matcher.op in ("=", "=~"):
                    values = set(matcher.value.split("|"))
                    assert values <= GRPC_CODES | {"ok"}, f"{where}: {values - GRPC_CODES}"
    for selector, label in variable_queries():
        [found] = promql.selectors(selector)
        assert label in TARGET_LABELS or label in live[found.name]


# ----- alert rules -----

def test_every_alert_says_what_happened_and_links_its_runbook_section() -> None:
    text = RUNBOOKS.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in text.splitlines() if line.startswith("#")}
    assert len(alerts()) >= 10
    for name, rule in alerts().items():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert (ROOT / path).resolve() == RUNBOOKS.resolve(), name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no section #{anchor}"
        # The runbook says what it means, what to check and what to do.
        section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        for part in ("What it means", "What to check", "What to do"):
            assert f"**{part}.**" in section, f"{name}: runbook lacks {part!r}"
    for name, exporter in EXTERNAL.items():
        assert name in text and exporter.split(" ")[0] in text, name


def test_the_replica_alert_minimum_is_the_autoscalers() -> None:
    """SummarizerReplicasBelowMinimum's bound is the autoscaler's minimum replica count,
    whichever autoscaler deploy/kubernetes has (an HPA, or a KEDA ScaledObject)."""
    minimums = []
    for path in KUBERNETES.rglob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document and document.get("kind") == "HorizontalPodAutoscaler":
                minimums.append(document["spec"]["minReplicas"])
            elif document and document.get("kind") == "ScaledObject":
                minimums.append(document["spec"].get("minReplicaCount", 0))
    [minimum] = set(minimums)
    expr = alerts()["SummarizerReplicasBelowMinimum"]["expr"]
    assert re.search(rf"< {minimum}\s*$", expr), expr
    assert f"minimum {minimum})" in alerts()["SummarizerReplicasBelowMinimum"]["annotations"][
        "summary"]


def test_every_alert_is_unit_tested_firing_and_then_resolving() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert cases["rule_files"] == ["rules.yaml"]
    fired_and_resolved = set()
    for case in cases["tests"]:
        firing_at: dict[str, float] = {}
        for check in case["alert_rule_test"]:
            at = _duration_s(check["eval_time"])
            if check["exp_alerts"]:
                firing_at.setdefault(check["alertname"], at)
            elif check["alertname"] in firing_at and at > firing_at[check["alertname"]]:
                fired_and_resolved.add(check["alertname"])
    assert set(alerts()) <= fired_and_resolved, set(alerts()) - fired_and_resolved


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text))


@pytest.fixture()
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); "
                    ".ci/run installs it and fails without it")
    return found


@pytest.fixture()
def rule_files(tmp_path: Path) -> Path:
    """The PrometheusRule's spec as a plain Prometheus rule file, with the unit tests beside it."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_documents()["spec"]))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return tmp_path


def test_promtool_checks_the_rules(promtool: str, rule_files: Path) -> None:
    done = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=rule_files,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests_fire_and_resolve_every_alert(promtool: str,
                                                          rule_files: Path) -> None:
    done = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=rule_files,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_fail_when_a_threshold_moves(promtool: str,
                                                        rule_files: Path) -> None:
    """The unit tests pin the thresholds: the error ratio's 5% raised to 50% fails them."""
    spec = rule_documents()["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "SummarizerErrorRatioHigh":
                assert rule["expr"].rstrip().endswith("> 0.05")
                rule["expr"] = rule["expr"].rstrip()[:-len("0.05")] + "0.5"
    (rule_files / "rules.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=rule_files,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "SummarizerErrorRatioHigh" in done.stdout + done.stderr


# ----- the dashboard -----

def test_dashboard_is_importable_with_a_datasource_variable_and_every_panel_queries() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]] + [p["id"] for p in panels()
                                                if p not in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert len(panels()) >= 15
    for panel in panels():
        assert panel["title"] and panel["targets"], panel.get("title")
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"
            assert promql.metric_names(target["expr"]), f"{panel['title']}: no metric"
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses every panel query (as a recording rule), with Grafana's interval
    variables replaced by a duration; `$namespace` and `$pod` sit inside label strings."""
    expressions = [target["expr"] for panel in panels() for target in panel["targets"]]
    groups = [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query:{index}",
         "expr": re.sub(r"\$__(rate_)?interval", "5m", expr)}
        for index, expr in enumerate(expressions)]}]
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": groups}))
    done = subprocess.run([promtool, "check", "rules", "queries.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in done.stdout


def test_dashboard_covers_what_operators_look_at() -> None:
    names = {name for panel in panels() for target in panel["targets"]
             for name in promql.metric_names(target["expr"])}
    for needed in ("summarizer_requests_total", "summarizer_request_duration_seconds_bucket",
                   "summarizer_queue_depth", "summarizer_queue_wait_seconds_bucket",
                   "summarizer_batch_size_bucket", "summarizer_batch_padding_ratio_sum",
                   "summarizer_active_articles", "summarizer_decode_step_duration_seconds_bucket",
                   "summarizer_cache_used_bytes", "summarizer_output_tokens_total",
                   "summarizer_worker_restarts_total", "container_memory_rss",
                   "summarizer_priority_queue_wait_seconds_bucket",
                   "summarizer_priority_request_duration_seconds_bucket",
                   "summarizer_priority_articles_refused_total"):
        assert needed in names, needed


# ----- the kustomize component -----

def component() -> dict[str, Any]:
    return yaml.safe_load((MONITORING / "kustomization.yaml").read_text(encoding="utf-8"))


def base_deployment() -> dict[str, Any]:
    for path in sorted(KUBERNETES.glob("**/*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document and document.get("kind") == "Deployment":
                return document
    raise AssertionError("no Deployment in deploy/kubernetes")


def test_component_structure_matches_the_base_deployment() -> None:
    """Without kubectl: the patch targets the base's Deployment and container, the PodMonitor
    selects its pods and scrapes the port the patch opens, on the port the setting sets."""
    kustomization = component()
    assert kustomization["kind"] == "Component"
    for name in kustomization["resources"] + [p["path"] for p in kustomization["patches"]]:
        assert (MONITORING / name).is_file(), name
    [generated] = kustomization["configMapGenerator"]
    assert generated["files"] == [DASHBOARD.name]
    deployment = base_deployment()
    [patch_ref] = kustomization["patches"]
    assert patch_ref["target"]["kind"] == "Deployment"
    assert patch_ref["target"]["name"] == deployment["metadata"]["name"]
    patch = yaml.safe_load((MONITORING / patch_ref["path"]).read_text(encoding="utf-8"))
    [patched] = patch["spec"]["template"]["spec"]["containers"]
    base_names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert patched["name"] in base_names
    check_metrics_port(patched)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text(encoding="utf-8"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["jobLabel"] in pod_labels
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # The base mentions the component, for users to turn it on.
    assert "#   - ../monitoring" in (KUBERNETES / "kustomization.yaml").read_text()


def check_metrics_port(container: dict[str, Any]) -> None:
    """The container's SUMMARIZER_METRICS_PORT is a valid setting and the port named metrics."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = config.Settings.load(environ={"SUMMARIZER_MODEL": "x", **env})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.metrics_port > 0 and ports["metrics"] == settings.metrics_port


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """`kubectl kustomize` of deploy/kubernetes with the component's line uncommented."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: test_component_structure_matches_the_base_"
                    "deployment checks the component without rendering it")
    copy = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(ROOT / "deploy", copy)
    kustomization = copy / "kubernetes" / "kustomization.yaml"
    text = kustomization.read_text(encoding="utf-8")
    enabled = text.replace("\n#   - ../monitoring", "\n  - ../monitoring")
    assert enabled != text, "the base no longer has the commented components line"
    kustomization.write_text(enabled, encoding="utf-8")
    done = subprocess.run([kubectl, "kustomize", str(copy / "kubernetes")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [d for d in documents if d["kind"] == kind]
    return found


def test_component_renders_with_kubectl_kustomize(rendered: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert {"PodMonitor", "PrometheusRule", "ConfigMap", "Deployment"} <= kinds
    [container] = [c for c in by_kind(rendered, "Deployment")["spec"]["template"]["spec"][
        "containers"] if c["name"] == "summarizer"]
    check_metrics_port(container)
    assert any(p["name"] == "grpc" for p in container["ports"])  # merged, not replaced
    configmap = by_kind(rendered, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD.name]) == dashboard()
    assert by_kind(rendered, "PrometheusRule")["spec"] == rule_documents()["spec"]


def test_rendered_objects_validate_against_their_schemas(rendered: list[dict[str, Any]]) -> None:
    """Kubernetes objects against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
    unknown fields fail); the Prometheus Operator's PodMonitor and PrometheusRule against the
    models generated from its CRDs (cloudcoil-models-prometheus-operator), which ignore
    unknown fields: a field they dropped makes the round trip differ, so that fails too."""
    import kubernetes_validate
    from cloudcoil.models.prometheus_operator import v1 as operator

    models = {"PodMonitor": operator.PodMonitor, "PrometheusRule": operator.PrometheusRule}
    for document in rendered:
        if document["kind"] in models:
            model = models[document["kind"]].model_validate(document)
            assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == document
        else:
            kubernetes_validate.validate(document, "1.32", strict=True)
    monitor = dict(by_kind(rendered, "PodMonitor"))
    monitor["spec"] = {**monitor["spec"], "podMetricsEndpoints": [{"port": "metrics",
                                                                   "interval": "15 seconds"}]}
    with pytest.raises(ValueError, match="interval"):  # the models do check
        operator.PodMonitor.model_validate(monitor)
