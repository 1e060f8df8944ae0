"""The Kubernetes manifests and compose.yaml agree with the Dockerfile, the settings and the CLI.

Everything is read at test time (the Dockerfile's USER, EXPOSE, ENTRYPOINT, CMD and ENV; the
settings' fields and variables; the real argument parser), so a change on either side that the
deployment files do not follow fails here."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from service import cli, config
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from . import kustomize
from .conftest import serving
from .fakes import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = kustomize.KUBERNETES


def dockerfile() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined), by keyword, in order."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


def exec_form(value: str) -> list[str]:
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for value in dockerfile().get("ENV", []):
        env.update(dict(pair.split("=", 1) for pair in shlex.split(value)))
    return env


def image_uid() -> int:
    return int(dockerfile()["USER"][-1].split(":")[0])


def image_port() -> int:
    ports = [int(p.split("/")[0]) for value in dockerfile()["EXPOSE"] for p in value.split()]
    assert len(ports) == 1, ports
    return ports[0]


def documents() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object `kubectl apply -k deploy/kubernetes` applies, by kind/name (the
    base and the CPU autoscaler; tests/test_autoscaling.py checks the other overlays)."""
    return kustomize.by_name(kustomize.objects(KUBERNETES))


def pod_spec() -> dict[str, Any]:
    return documents()["Deployment/summarizer"]["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    return only


def settings_environment() -> set[str]:
    return {name for item in config.fields() for name in config.env_names(item)}


def check_environment(env: dict[str, str]) -> config.Settings:
    """Every SUMMARIZER_* variable is a real setting, and the values make valid settings."""
    unknown = {k for k in env if k.startswith(config.ENV_PREFIX)} - settings_environment()
    assert not unknown, f"not settings: {unknown}"
    return config.Settings.load(environ={**image_env(), **env})


# ----- Kubernetes -----

def test_every_manifest_parses_and_kustomization_lists_them() -> None:
    base = KUBERNETES / "base"
    assert sorted(kustomize.kustomization(base)["resources"]) == sorted(
        p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {"Deployment/summarizer", "Service/summarizer", "Service/summarizer-headless",
            "HorizontalPodAutoscaler/summarizer", "PodDisruptionBudget/summarizer"} <= set(
        documents())


def test_kustomization_images_block_sets_the_deployments_image() -> None:
    """`kubectl apply -k` (no standalone kustomize) takes the pushed image from `images:`; its
    name must be the Deployment's image name, or the block silently changes nothing."""
    kustomization = kustomize.kustomization(KUBERNETES / "base")  # every overlay builds on it
    name, _, tag = container()["image"].partition(":")
    [image] = kustomization["images"]
    assert image["name"] == name and {"newName", "newTag"} <= set(image)
    page = (ROOT / "docs" / "deployment.md").read_text()
    assert "images:\n  - name: summarizer " in page  # the docs show kubectl users the block
    assert "newName: registry.example.com/summarizer" in page


def test_container_runs_the_image_command_with_real_arguments_and_settings() -> None:
    spec = container()
    entrypoint = exec_form(dockerfile()["ENTRYPOINT"][-1])
    assert entrypoint == ["summarizer"]
    assert spec.get("command", entrypoint) == entrypoint
    args = spec.get("args", exec_form(dockerfile()["CMD"][-1]))
    namespace = cli._parser().parse_args(args)  # exits (fails) on an unknown flag or value
    assert namespace.command == "serve"
    env = {e["name"]: e["value"] for e in spec["env"] if "value" in e}
    settings = config.from_arguments(namespace, environ={**image_env(), **env})
    check_environment(env)
    assert settings.port == image_port() and settings.model == image_env()["SUMMARIZER_MODEL"]
    assert int(env["SUMMARIZER_THREADS"]) <= float(spec["resources"]["limits"]["cpu"])


def test_probes_use_grpc_health_on_the_serving_port() -> None:
    spec = container()
    port = image_port()
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports["grpc"] == port
    assert set(ports) <= {"grpc", "metrics"}  # the metrics port: tests/test_autoscaling.py
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(spec[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert spec[probe]["grpc"]["port"] == port, probe
    startup = spec["startupProbe"]
    # Loading and warming a model can take minutes: the kubelet must not restart it meanwhile.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_shutdown_gets_more_time_than_the_servers_grace_period() -> None:
    spec = container()
    env = {e["name"]: e["value"] for e in spec["env"] if "value" in e}
    grace_s = check_environment(env).grace_period_s
    pre_stop = spec["lifecycle"]["preStop"]["exec"]["command"]
    pause_s = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    assert pod_spec()["terminationGracePeriodSeconds"] > grace_s + pause_s


def test_runs_as_the_images_non_root_user_with_a_writable_tmp() -> None:
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == image_uid() != 0
    spec = container()
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False
    if spec["securityContext"].get("readOnlyRootFilesystem"):
        # The image points the Hugging Face cache (HF_HOME) under a path that must be writable.
        mounts = [m["mountPath"] for m in spec["volumeMounts"]]
        assert any(image_env()["HF_HOME"].startswith(m + "/") for m in mounts), mounts


def test_a_mounted_unconverted_model_converts_into_a_writable_volume() -> None:
    """With the root filesystem read-only, the default engine's conversion of a mounted model
    must land on a volume (it went to ~/.cache and the pod crash-looped), one big enough for an
    int8 copy of a large checkpoint."""
    spec = container()
    env = {e["name"]: e["value"] for e in spec["env"] if "value" in e}
    cache = env["SUMMARIZER_CONVERT_CACHE_DIR"]
    assert check_environment(env).convert_cache_dir == cache
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    assert cache in mounts and not mounts[cache].get("readOnly"), mounts
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    size = volumes[mounts[cache]["name"]]["emptyDir"]["sizeLimit"]
    assert size.endswith("Gi") and float(size[:-2]) >= 1, size


def test_resources_have_requests_within_limits() -> None:
    resources = container()["resources"]

    def mib(quantity: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(Mi|Gi)", quantity).groups()
        return float(number) * (1024 if unit == "Gi" else 1)

    assert 0 < mib(resources["requests"]["memory"]) <= mib(resources["limits"]["memory"])
    assert float(resources["requests"]["cpu"]) <= float(resources["limits"]["cpu"])


def test_services_select_the_pods_and_reach_the_grpc_port() -> None:
    objects = documents()
    labels = objects["Deployment/summarizer"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Deployment/summarizer"]["spec"]["selector"]["matchLabels"].items() <= \
        labels.items()
    port_names = {p["name"]: p["containerPort"] for p in container()["ports"]}
    for name in ("Service/summarizer", "Service/summarizer-headless"):
        spec = objects[name]["spec"]
        assert spec["selector"].items() <= labels.items(), name
        (port,) = spec["ports"]
        assert port["port"] == image_port() and port["appProtocol"] == "grpc"
        assert port_names.get(port["targetPort"], port["targetPort"]) == image_port()
    assert objects["Service/summarizer-headless"]["spec"]["clusterIP"] == "None"


def test_autoscaler_and_disruption_budget_target_the_deployment() -> None:
    objects = documents()
    hpa = objects["HorizontalPodAutoscaler/summarizer"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "summarizer"}
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert "cpu" in container()["resources"]["requests"]  # utilisation is relative to it
    labels = objects["Deployment/summarizer"]["spec"]["template"]["metadata"]["labels"]
    pdb = objects["PodDisruptionBudget/summarizer"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


# ----- docker compose -----

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))["services"][
        "summarizer"]


def test_compose_builds_the_dockerfile_and_publishes_the_port(compose: dict[str, Any]) -> None:
    build = compose["build"]
    assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
    # Build arguments are ones the Dockerfile declares.
    declared = {value.split("=")[0] for value in dockerfile()["ARG"]}
    assert set(build.get("args", {})) <= declared
    published = [str(p).split(":") for p in compose["ports"]]
    assert [int(container_port) for _, container_port in published] == [image_port()]


def test_compose_converts_a_mounted_model_into_a_volume_the_user_owns(
        compose: dict[str, Any]) -> None:
    cache = compose["environment"]["SUMMARIZER_CONVERT_CACHE_DIR"]
    # A model mounted at run time (no baked-in MODEL) may be unconverted: the image must hold
    # torch to convert it (the default ENGINE=ctranslate2 image leaves torch out).
    assert compose["build"]["args"]["MODEL"] == "" and compose["build"]["args"]["ENGINE"] == "torch"
    targets = {v["target"]: v for v in compose["volumes"]}
    assert targets[cache]["type"] == "volume" and not targets[cache].get("read_only")
    # A new named volume takes the owner of the image's directory: the image must create it.
    created = " ".join(dockerfile()["RUN"])
    assert re.search(rf"install -d -o {image_uid()} -g {image_uid()} {re.escape(cache)}\b",
                     created), created


def test_compose_health_check_is_the_cli_health_command(compose: dict[str, Any]) -> None:
    test = compose["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == exec_form(dockerfile()["ENTRYPOINT"][-1])[0]
    assert cli._parser().parse_args(test[2:]).command == "health"


def test_compose_settings_model_volume_and_stop_time(compose: dict[str, Any]) -> None:
    settings = check_environment(compose["environment"])
    assert settings.port == image_port()
    (volume,) = [v for v in compose["volumes"] if v["target"] == settings.model]
    assert volume["type"] == "bind" and volume["read_only"] is True
    stop_s = float(compose["stop_grace_period"].removesuffix("s"))
    assert stop_s > settings.grace_period_s


# ----- client-side load balancing needs connections that end -----

async def test_max_connection_age_ends_connections_so_clients_re_resolve() -> None:
    """With round_robin over DNS a client finds new replicas only when it re-resolves, which
    it does when a connection ends: the server ends each one after max_connection_age_s."""
    settings = config.Settings(model="fake/model", max_connection_age_s=0.5, grace_period_s=1)
    request = pb.SummarizeRequest(articles=[pb.Article(id="a", text="Prices rose.")])
    async with serving(settings, lambda s: FakeEngine()) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        await stub.Summarize(request, timeout=10)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # The server's GOAWAY takes the channel out of READY (it would stay there otherwise).
        await asyncio.wait_for(
            channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=30)
        assert (await stub.Summarize(request, timeout=10)).results[0].summary  # reconnects


def test_the_deployment_ages_connections_for_round_robin_clients() -> None:
    env = {e["name"]: e["value"] for e in container()["env"] if "value" in e}
    assert check_environment(env).max_connection_age_s > 0
