"""The autoscalers (deploy/kubernetes/components, picked by deploy/kubernetes/overlays): every
manifest of every overlay valid against the Kubernetes API schemas (kubernetes-validate, offline)
and KEDA's ScaledObject against its CRD's schema (vendored in tests/schemas); each overlay the
base plus exactly one autoscaler; the queue-depth autoscalers scale on a metric the service
really serves, on the port the pods really expose."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service import config
from service.api.metrics import Metrics

from . import kustomize
from .kustomize import AUTOSCALER_KINDS, KUBERNETES, KUSTOMIZATIONS, OVERLAYS

KUBERNETES_VERSIONS = ("1.29", "1.37")
"""The oldest Kubernetes still common in managed clusters, and the newest kubernetes-validate
knows."""
KEDA_CRD = Path(__file__).parent / "schemas" / "keda.sh_scaledobjects-v2.20.1.yaml"
ADAPTER_VALUES = (KUBERNETES / "components" / "autoscale-pods-metric"
                  / "prometheus-adapter-values.yaml")
BASE_OBJECTS = {"Deployment/summarizer", "Service/summarizer", "Service/summarizer-headless",
                "PodDisruptionBudget/summarizer"}


def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as the API server's strict field validation reads it: an object
    with `properties` takes no other field (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def crd_validator() -> jsonschema.Draft202012Validator:
    (crd,) = [d for d in yaml.safe_load_all(KEDA_CRD.read_text(encoding="utf-8")) if d]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked below
    return jsonschema.Draft202012Validator(schema)


def validate(document: dict[str, Any]) -> None:
    """Raise unless `document` is valid for every Kubernetes version of KUBERNETES_VERSIONS."""
    if document["kind"] == "ScaledObject":
        assert document["apiVersion"] == "keda.sh/v1alpha1"
        crd_validator().validate(document)
        # Its metadata is an ObjectMeta: validate it as a ConfigMap's.
        document = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]}
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


def every_object() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for directory in KUSTOMIZATIONS:
        for document in kustomize.objects(directory):
            name = f"{directory.relative_to(KUBERNETES)}:{document['kind']}/" \
                   f"{document['metadata']['name']}"
            found.append((name, document))
    return found


@pytest.mark.parametrize(("name", "document"), every_object(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_every_manifest_is_valid_against_the_kubernetes_schemas(
        name: str, document: dict[str, Any]) -> None:
    validate(document)


def test_the_validation_catches_a_misspelt_or_mistyped_field() -> None:
    """The checks above can fail: a field out of place or of the wrong type is refused, for
    built-in kinds and for the ScaledObject alike."""
    objects = kustomize.by_name(kustomize.objects(OVERLAYS_BY_NAME["keda"]))
    deployment = copy.deepcopy(objects["Deployment/summarizer"])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # not `resources`
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(objects["ScaledObject/summarizer"])
    scaled["spec"]["maxReplicas"] = 10  # the HPA's name; KEDA's is maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    scaled = copy.deepcopy(objects["ScaledObject/summarizer"])
    scaled["spec"]["minReplicaCount"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


OVERLAYS_BY_NAME = {p.name: p for p in OVERLAYS}


def test_the_overlays_are_keda_the_prometheus_adapter_and_cpu() -> None:
    assert set(OVERLAYS_BY_NAME) == {"keda", "prometheus-adapter", "cpu"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_each_overlay_is_the_base_and_exactly_one_autoscaler(directory: Path) -> None:
    objects = kustomize.by_name(kustomize.objects(directory))
    assert BASE_OBJECTS <= set(objects)
    autoscalers = [o for o in objects.values() if o["kind"] in AUTOSCALER_KINDS]
    assert len(autoscalers) == 1, [o["kind"] for o in autoscalers]  # two would fight
    (autoscaler,) = autoscalers
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "summarizer")


def test_every_manifest_file_is_used_by_a_kustomization() -> None:
    used = {path for d in [*KUSTOMIZATIONS, KUBERNETES / "base"]
            for path in kustomize.listed_files(d)}
    on_disk = {p.resolve() for p in KUBERNETES.rglob("*.yaml")
               if p.name != "kustomization.yaml" and p != ADAPTER_VALUES}
    assert on_disk == used, on_disk ^ used


def test_the_default_and_the_cpu_overlay_are_the_same() -> None:
    """`kubectl apply -k deploy/kubernetes` keeps doing what it did: base + CPU autoscaler."""
    assert sorted(kustomize.listed_files(KUBERNETES)) == sorted(
        kustomize.listed_files(OVERLAYS_BY_NAME["cpu"]))


@pytest.mark.skipif(kustomize.kubectl() is None, reason="kubectl is not installed: the "
                    "structure is checked above, without rendering")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kubectl_kustomize_renders_each_overlay_into_valid_objects(directory: Path) -> None:
    rendered = kustomize.by_name(kustomize.render(directory))
    assert set(rendered) == set(kustomize.by_name(kustomize.objects(directory)))
    for document in rendered.values():
        validate(document)
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "summarizer"


# ----- the queue-depth autoscalers and the metric they read -----

def served_metric_names() -> set[str]:
    """The metric names a server serves on its metrics port (a fresh registry)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def keda_trigger() -> dict[str, Any]:
    objects = kustomize.by_name(kustomize.objects(OVERLAYS_BY_NAME["keda"]))
    (trigger,) = objects["ScaledObject/summarizer"]["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    return trigger["metadata"]


def pods_metric_hpa() -> dict[str, Any]:
    objects = kustomize.by_name(kustomize.objects(OVERLAYS_BY_NAME["prometheus-adapter"]))
    return objects["HorizontalPodAutoscaler/summarizer"]["spec"]


def adapter_rule() -> dict[str, Any]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))
    (rule,) = values["rules"]["custom"]
    return rule


def test_keda_scales_on_the_queue_depth_the_service_serves() -> None:
    query = keda_trigger()["query"]
    metrics = set(re.findall(r"\b(summarizer_[a-z_]+)\b", query))
    assert metrics == {"summarizer_queue_depth"}
    assert metrics <= served_metric_names()
    assert query.strip().startswith("sum(")  # KEDA divides the total by the threshold
    assert float(keda_trigger()["threshold"]) > 0


def test_the_pods_metric_hpa_reads_the_metric_the_adapter_rule_serves() -> None:
    (metric,) = pods_metric_hpa()["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    served_as = rule["name"].get("as") or rule["name"]["matches"]
    assert metric["pods"]["metric"]["name"] == served_as
    series = re.match(r"([a-z_]+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert series in served_metric_names()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a per-pod metric
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_both_queue_depth_autoscalers_have_the_same_target_and_bounds() -> None:
    hpa = pods_metric_hpa()
    (metric,) = hpa["metrics"]
    objects = kustomize.by_name(kustomize.objects(OVERLAYS_BY_NAME["keda"]))
    scaled = objects["ScaledObject/summarizer"]["spec"]
    assert float(metric["pods"]["target"]["averageValue"]) == float(keda_trigger()["threshold"])
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (hpa["minReplicas"],
                                                                      hpa["maxReplicas"])
    assert scaled["minReplicaCount"] >= 1  # never to zero: loading a model takes minutes
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] == hpa["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"] >= 300


def test_the_pods_serve_their_metrics_where_prometheus_is_told_to_scrape() -> None:
    deployment = kustomize.by_name(kustomize.objects(KUBERNETES / "base"))["Deployment/summarizer"]
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert "metrics_port" in {f.name for f in config.fields()}
    port = int(env[config.ENV_PREFIX + "METRICS_PORT"])
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
