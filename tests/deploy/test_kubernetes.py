"""deploy/kubernetes/ rendered and checked offline: no cluster is involved.

Every overlay is rendered with ``kubectl kustomize`` (from a copy of the folder whose Secrets come from
``deploy/credentials.py``, as an operator makes them), then: the built-in kinds against Kubernetes' own schemas
(kubernetes-validate, pinned to the API version below, strict), the custom resources by shape (a KServe predictor
is a PodSpec, so it is validated as one), the gateway's Envoy configuration against Envoy's own API (xds-protos),
the policy linter checkov over all of it, and this project's own
contract: the server's options in the manifests are ones it accepts and agree with docker-compose.yml and the
image, the ports and probes are the server's, the NetworkPolicies let only the gateway reach the replicas and
only the replicas reach Redis, the gateway hashes sessions onto the replicas, and the autoscaler's metrics are
ones the server exports.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import os
import pkgutil
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import credentials
import kubernetes_validate
import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from lstm_server.config import ENV_PREFIX, ServerConfig, load_config
from lstm_server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "kserve")
KUBERNETES_VERSION = "1.32.0"  # the schemas the manifests are checked against (kubectl on these machines: 1.32)
CHECKOV = ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"  # make checkov (its own pins: not torch's)
# checkov findings the manifests skip, each with its reason beside it (a checkov.io/skip annotation)
DOCUMENTED_SKIPS = {"CKV_K8S_43"}
SERVER_CONTAINERS = ("lstm-server", "kserve-container")
PORT_OPTIONS = {"grpc": "port", "h2c": "port", "http": "http_port", "http1": "http_port", "metrics": "metrics_port"}

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl (with its built-in kustomize) is not installed: the Kubernetes manifests cannot be rendered",
)


# -- rendering ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubernetes_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/kubernetes/ with its Secrets' files made as docs/deployment.md says."""
    copy = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, copy, ignore=shutil.ignore_patterns("files"))
    credentials.write_stack_secrets(copy / "secrets" / "files", ["lstm-gateway"], redis_address="lstm-redis:6379")
    return copy


@pytest.fixture(scope="module")
def rendered(kubernetes_copy: Path) -> dict[str, list[dict[str, Any]]]:
    """Each overlay's objects, as ``kubectl kustomize`` renders them."""
    found = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            ["kubectl", "kustomize", str(kubernetes_copy / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"overlays/{overlay} does not render: {result.stderr}"
        found[overlay] = [item for item in yaml.safe_load_all(result.stdout) if item]
    return found


def objects(items: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item for item in items if item["kind"] == kind}


def pod_specs(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template: of the workloads, and of KServe's predictors (a PodSpec with KServe's fields)."""
    found = {}
    for item in items:
        if item["kind"] in ("Deployment", "StatefulSet"):
            found[item["metadata"]["name"]] = item["spec"]["template"]["spec"]
        elif item["kind"] == "InferenceService":
            found[item["metadata"]["name"]] = item["spec"]["predictor"]
    return found


def server_containers(items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) of every lstm-server container."""
    return [
        (spec, container)
        for spec in pod_specs(items).values()
        for container in spec["containers"]
        if container["name"] in SERVER_CONTAINERS
    ]


def test_every_overlay_renders_its_parts(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cpu", "gpu"):
        kinds = {(item["kind"], item["metadata"]["name"]) for item in rendered[overlay]}
        for expected in [
            ("Deployment", "lstm-server"),
            ("Deployment", "lstm-gateway"),
            ("StatefulSet", "lstm-redis"),
            ("PodDisruptionBudget", "lstm-server"),
            ("HorizontalPodAutoscaler", "lstm-server"),
            ("ServiceMonitor", "lstm-server"),
            ("NetworkPolicy", "default-deny"),
        ]:
            assert expected in kinds, f"overlays/{overlay} lacks {expected}"
        assert {item["metadata"].get("namespace") for item in rendered[overlay] if item["kind"] != "Namespace"} == {
            "lstm-serving"
        }
    images = {o: {c["image"] for _, c in server_containers(rendered[o])} for o in OVERLAYS}
    assert images["cpu"] == {"registry.example.org/lstm-server:0.1.0"}
    assert images["gpu"] == {"registry.example.org/lstm-server-gpu:0.1.0"}
    (gpu,) = [c for _, c in server_containers(rendered["gpu"])]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "LSTM_SERVER_DEVICE", "value": "cuda"} in gpu["env"]
    assert set(objects(rendered["kserve"], "InferenceService")) == {"lstm-grpc", "lstm-http"}


# -- schemas --------------------------------------------------------------------------------------------------


def test_built_in_kinds_follow_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for items in rendered.values():
        for item in items:
            if "." in item["apiVersion"].split("/")[0] and item["kind"] in ("ServiceMonitor", "InferenceService"):
                continue  # custom resources: by shape, below
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_wrong_manifest(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The schemas are really applied: a misspelt field and a wrong type are refused."""
    deployment = json.loads(json.dumps(objects(rendered["cpu"], "Deployment")["lstm-server"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = json.loads(json.dumps(objects(rendered["cpu"], "Deployment")["lstm-server"]))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


KSERVE_COMPONENT_FIELDS = {  # ComponentExtensionSpec (KServe v1beta1): beside the inline PodSpec of a predictor
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy",
}  # fmt: skip


def predictor_pod(service: dict[str, Any]) -> dict[str, Any]:
    """The pod KServe makes of an InferenceService's predictor: its inline PodSpec, without KServe's own fields."""
    predictor = service["spec"]["predictor"]
    metadata = {
        key: service["metadata"][key] for key in ("name", "namespace", "annotations") if key in service["metadata"]
    }
    spec = {key: value for key, value in predictor.items() if key not in KSERVE_COMPONENT_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata | {"labels": predictor["labels"]}, "spec": spec}


def test_kserve_predictors_are_pod_specs_with_the_ports_kserve_expects(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    hpa = objects(rendered["cpu"], "HorizontalPodAutoscaler")["lstm-server"]["spec"]
    for name, service in objects(rendered["kserve"], "InferenceService").items():
        assert service["apiVersion"] == "serving.kserve.io/v1beta1"
        predictor = service["spec"]["predictor"]
        pod = predictor_pod(service)
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        (container,) = pod["spec"]["containers"]
        assert container["name"] == "kserve-container"  # the name KServe gives a custom predictor's container
        # One port a predictor: KServe routes gRPC to a port named h2c, HTTP to one named http1.
        (port,) = container["ports"]
        assert port["name"] in ("h2c", "http1"), f"{name}: KServe routes only ports named h2c or http1"
        # KServe scales a predictor itself: the same bounds as the plain Deployment's HorizontalPodAutoscaler
        assert (predictor["minReplicas"], predictor["maxReplicas"]) == (hpa["minReplicas"], hpa["maxReplicas"])
        assert predictor["labels"]["lstm-serving/redis-client"] == "true"


def test_the_service_monitor_scrapes_the_replicas_metrics_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    items = rendered["cpu"]
    (monitor,) = objects(items, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    services = [s for s in objects(items, "Service").values() if selects(monitor["spec"]["selector"], s["metadata"])]
    assert len(services) == 1, "the ServiceMonitor must select exactly one Service"
    ports = {port["name"] for port in services[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    server = objects(items, "Deployment")["lstm-server"]["spec"]["template"]
    assert all(server["metadata"]["labels"].get(k) == v for k, v in services[0]["spec"]["selector"].items())


def selects(selector: dict[str, Any], metadata: dict[str, Any]) -> bool:
    labels = metadata.get("labels") or {}
    return all(labels.get(key) == value for key, value in (selector.get("matchLabels") or {}).items())


# -- the policy linter ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report(rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One checkov run over every rendered overlay (its start-up dominates: a few seconds of CPU)."""
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed at {CHECKOV.relative_to(ROOT)}: run `make checkov`")
    folder = tmp_path_factory.mktemp("rendered")
    files = []
    for overlay, items in rendered.items():
        path = folder / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all([*items, *map(predictor_pod, objects(items, "InferenceService").values())]))
        files += ["-f", str(path)]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE"}  # offline
    result = subprocess.run(
        [str(CHECKOV), *files, "--framework", "kubernetes", "--skip-download", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.stdout, f"checkov wrote nothing: {result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    reports = [reports] if isinstance(reports, dict) else reports  # one report per framework
    return {
        key: [check for report in reports for check in report["results"].get(f"{key}_checks", [])]
        for key in ("failed", "skipped", "passed")
    }


def test_checkov_finds_nothing_undocumented(checkov_report: dict) -> None:
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in checkov_report["failed"]]
    assert not failed, "checkov findings (fix them, or skip one with its reason in a checkov.io/skip annotation):\n" + (
        "\n".join(failed)
    )
    checked = {check["resource"].split(".")[0] for check in checkov_report["passed"]}
    assert {"Deployment", "StatefulSet", "Pod"} <= checked  # it did check the workloads and KServe's predictors
    for check in checkov_report["skipped"]:
        assert check["check_id"] in DOCUMENTED_SKIPS, f"{check['check_id']} skipped without being documented here"
        assert len(check["check_result"].get("suppress_comment", "")) > 20, f"{check['check_id']}: give the reason"


# -- the server's configuration: no drift ---------------------------------------------------------------------


def environment_of(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the pod sees them (fieldRef: the pod's name; resourceFieldRef: the limit)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", item
            env[item["name"]] = "lstm-server-5d8f7c9b4-x2x7q"
        else:
            ref = item["valueFrom"]["resourceFieldRef"]
            (target,) = [c for c in spec["containers"] if c["name"] == ref["containerName"]]
            env[item["name"]] = str(math.ceil(cpu_cores(target["resources"]["limits"][ref["resource"].split(".")[1]])))
    return env


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def mounted_secret(spec: dict[str, Any], container: dict[str, Any], path: str, items: list[dict[str, Any]]) -> str:
    """The text of the Secret key that ``path`` is in the container (KeyError where no Secret is mounted there)."""
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/") and "secret" in volumes[mount["name"]]:
            secret = objects(items, "Secret")[volumes[mount["name"]]["secret"]["secretName"]]
            return base64.b64decode(secret["data"][path[len(mount["mountPath"]) + 1 :]]).decode()
    raise KeyError(f"{path}: no Secret is mounted there")


def compose_replica_environment() -> dict[str, str]:
    """The compose replicas' settings (a variable with no value passes the shell's on: no setting of its own)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {key: str(value) for key, value in compose["x-replica"]["environment"].items() if value is not None}


def image_environment() -> dict[str, str]:
    """The ``ENV`` of deploy/server.Dockerfile's final stage that configures the server."""
    text = (ROOT / "deploy" / "server.Dockerfile").read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found |= dict(re.findall(r"(LSTM_SERVER_\w+)=(\S+)", line))
    return found


def test_every_server_option_in_the_manifests_is_one_the_server_accepts(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Unknown LSTM_SERVER_* variables are ignored by the server, so a misspelt one would silently do nothing:
    every one must name an option, and the whole (arguments, variables, the mounted TOML) must load."""
    options = {ENV_PREFIX + name.upper() for name in ServerConfig.model_fields}
    for overlay, items in rendered.items():
        for spec, container in server_containers(items):
            env = environment_of(spec, container)
            unknown = {name for name in env if name.startswith(ENV_PREFIX)} - options
            assert not unknown, f"overlays/{overlay}: {sorted(unknown)} name no option of lstm-server"
            args = list(container.get("args", []))
            config_path = args[args.index("--config") + 1]
            local = tmp_path / f"{overlay}-{container['name']}.toml"
            local.write_text(mounted_secret(spec, container, config_path, items))
            args[args.index("--config") + 1] = str(local)
            config = load_config(args, environ=env)  # raises ConfigError naming the option
            for variable in ("LSTM_SERVER_AUTH_TOKENS", "LSTM_SERVER_STATE_KEYS_FILE"):
                assert mounted_secret(spec, container, env[variable], items).strip(), f"{variable}: empty Secret"
            assert config.session_store == "redis" and config.authenticated and config.host == "0.0.0.0"
            url = tomllib.loads(local.read_text())["redis_url"]
            host, port = re.fullmatch(r"redis://:[^@]+@([^:/]+):(\d+)/0", url).groups()
            redis = objects(items, "Service")[host]
            assert int(port) in {p["port"] for p in redis["spec"]["ports"]}, f"{url}: no such port on {host}"


def test_the_manifests_agree_with_compose_and_the_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The same options as the compose replicas (secrets by the same file names, the same values elsewhere), and
    the image's own settings stated as the image states them."""
    compose = compose_replica_environment()
    image = image_environment()
    assert image, "no LSTM_SERVER_* ENV found in deploy/server.Dockerfile"
    for overlay, items in rendered.items():
        for spec, container in server_containers(items):
            env = environment_of(spec, container)
            for name, value in compose.items():
                assert name in env, f"overlays/{overlay}: compose sets {name}, the manifest does not"
                if value.startswith("/run/secrets/"):
                    assert Path(env[name]).name == Path(value).name, f"{name}: another secret than compose's"
                elif not value.startswith("${"):
                    assert env[name] == value, f"overlays/{overlay}: {name}={env[name]}, compose: {value}"
                elif name == "LSTM_SERVER_THREADS":
                    assert int(env[name]) >= 1  # the CPU limit, where compose leaves it to the cores
            for name, value in image.items():
                assert env[name] == value, f"overlays/{overlay}: {name}={env[name]}, the image: {value}"


def test_ports_probes_and_drain_are_the_servers(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, items in rendered.items():
        for spec, container in server_containers(items):
            env = environment_of(spec, container)
            config = ServerConfig.model_validate(
                {
                    name: env[ENV_PREFIX + name.upper()]
                    for name in ServerConfig.model_fields
                    if ENV_PREFIX + name.upper() in env
                }
                | {"insecure_no_auth": True}
            )
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            for name, number in ports.items():
                assert getattr(config, PORT_OPTIONS[name]) == number, f"overlays/{overlay}: port {name}"
            if container["name"] == "lstm-server":  # a Deployment exposes every port the server listens on
                listening = {o: getattr(config, o) for o in set(PORT_OPTIONS.values()) if getattr(config, o)}
                declared = {PORT_OPTIONS[name] for name in ports}
                assert set(listening) <= declared, (
                    f"overlays/{overlay}: the server listens on {sorted(set(listening) - declared)} "
                    "(lstm_server.config) but the container does not declare it"
                )
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                check = container[probe]
                if "grpc" in check:  # grpc.health.v1 on the server's gRPC port
                    assert check["grpc"]["port"] == config.port
                else:
                    assert check["httpGet"] == {"path": "/v2/health/ready", "port": config.http_port}
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "5 minutes to load the models"
            # preStop, then the server's own drain, all within the grace period Kubernetes gives before SIGKILL
            drain = container["lifecycle"]["preStop"]["sleep"]["seconds"] + config.drain_delay_s
            assert spec["terminationGracePeriodSeconds"] > drain + config.grace_period_s + 5
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
            assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] >= 10000
            assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]


def test_the_disruption_budget_and_autoscaler_cover_the_replicas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    items = rendered["cpu"]
    template = objects(items, "Deployment")["lstm-server"]["spec"]["template"]["metadata"]
    assert selects(objects(items, "PodDisruptionBudget")["lstm-server"]["spec"]["selector"], template)
    hpa = objects(items, "HorizontalPodAutoscaler")["lstm-server"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lstm-server"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    # Each metric the autoscaler reads is one prometheus-adapter serves, from a metric the server exports.
    adapter = yaml.safe_load((KUBERNETES / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule["seriesQuery"].split("{")[0] for rule in adapter["rules"]["custom"]}
    exported = {family.name for family in Metrics().registry.collect()}
    for metric in hpa["metrics"]:
        name = metric["pods"]["metric"]["name"]
        assert name in served, f"{name}: no prometheus-adapter rule serves it"
        assert served[name] in exported, f"{served[name]}: the server exports no such metric"


# -- the gateway ----------------------------------------------------------------------------------------------


def test_the_gateway_hashes_sessions_onto_every_ready_replica(rendered: dict[str, list[dict[str, Any]]]) -> None:
    items = rendered["cpu"]
    (config_map,) = [m for name, m in objects(items, "ConfigMap").items() if name.startswith("lstm-gateway")]
    envoy = yaml.safe_load(config_map["data"]["envoy.yaml"])
    server = objects(items, "Deployment")["lstm-server"]["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in server["spec"]["containers"][0]["ports"]}
    (listener,) = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    clusters = {cluster["name"]: cluster for cluster in envoy["static_resources"]["clusters"]}
    for route in routes:
        action = route["route"]
        assert action["hash_policy"] == [{"header": {"header_name": "x-session-id"}}]
        # a call that reached a replica is never retried (only a refused connection or stream)
        assert set(action["retry_policy"]["retry_on"].split(",")) <= {"connect-failure", "refused-stream"}
        cluster = clusters[action["cluster"]]
        assert cluster["lb_policy"] == "RING_HASH" and cluster["type"] == "STRICT_DNS"
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        service = objects(items, "Service")[address["address"]]
        assert service["spec"]["clusterIP"] == "None", "a headless Service: one address per ready replica"
        assert not service["spec"].get("publishNotReadyAddresses")
        assert selects({"matchLabels": service["spec"]["selector"]}, server["metadata"])
        assert address["port_value"] in ports.values()
    assert [route["route"]["cluster"] for route in routes] == ["replicas-grpc", "replicas-http"]
    assert (
        clusters["replicas-grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]["port_value"]
        == ports["grpc"]
    )
    # TLS from the mounted Secret (the certificate credentials.py made), HTTP/2 for gRPC
    gateway = objects(items, "Deployment")["lstm-gateway"]["spec"]["template"]["spec"]
    (container,) = gateway["containers"]
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert "h2" in tls["alpn_protocols"]
    certificate = tls["tls_certificates"][0]["certificate_chain"]["filename"]
    assert mounted_secret(gateway, container, certificate, items).startswith("-----BEGIN CERTIFICATE-----")
    assert listener["address"]["socket_address"]["port_value"] == container["ports"][0]["containerPort"]


def type_urls(value: Any) -> set[str]:
    """Every ``"@type"`` (the type URL of a typed_config) in ``value``."""
    if isinstance(value, dict):
        own = {value["@type"]} if "@type" in value else set()
        return own | {url for item in value.values() for url in type_urls(item)}
    if isinstance(value, list):
        return {u for item in value for u in type_urls(item)}
    return set()


def envoy_bootstrap(config: dict[str, Any]) -> bootstrap_pb2.Bootstrap:
    """``config`` read as Envoy's Bootstrap message, with the data-plane API's own protobuf definitions
    (xds-protos): every field name and type, and the type of every typed_config. Not Envoy's value checks
    (``envoy --mode validate`` does those; no Envoy binary on these machines)."""
    for url in type_urls(config):  # import the package of each "@type", so that the Any can be resolved
        package = importlib.import_module(url.split("/")[-1].rsplit(".", 1)[0])
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_pb2"):
                importlib.import_module(f"{package.__name__}.{module.name}")
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())


def test_the_gateway_configuration_is_envoys(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (config_map,) = [m for name, m in objects(rendered["cpu"], "ConfigMap").items() if name.startswith("lstm-gateway")]
    config = yaml.safe_load(config_map["data"]["envoy.yaml"])
    bootstrap = envoy_bootstrap(config)
    assert [cluster.name for cluster in bootstrap.static_resources.clusters] == ["replicas-grpc", "replicas-http"]
    wrong = json.loads(json.dumps(config))
    route = wrong["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["hash_polic"] = []
    with pytest.raises(json_format.ParseError, match="hash_polic"):
        envoy_bootstrap(wrong)


# -- network policies -----------------------------------------------------------------------------------------


def allowed(items: list[dict[str, Any]], source: dict[str, str], target: dict[str, str], port: int) -> bool:
    """Would the NetworkPolicies let a pod labelled ``source`` open ``port`` on a pod labelled ``target`` (both in
    the namespace; ``source`` None: from outside it)? Both sides must allow it: ingress of the target and egress
    of the source (a pod no policy selects is open in that direction)."""

    def named_port(rule_port: Any, pod: dict[str, str]) -> bool:
        if isinstance(rule_port, int):
            return rule_port == port
        for spec in pod_specs(items).values():  # a named port: the target's container port of that name
            for container in spec["containers"]:
                for declared in container.get("ports", []):
                    if declared["name"] == rule_port and declared["containerPort"] == port:
                        return True
        return False

    def peer_matches(peer: dict[str, Any], pod: dict[str, str] | None) -> bool:
        if "namespaceSelector" in peer:
            return False  # other namespaces (monitoring, DNS): not the pods of this one
        return pod is not None and selects(peer["podSelector"], {"labels": pod})

    def direction(pod: dict[str, str] | None, other: dict[str, str] | None, kind: str, key: str) -> bool:
        if pod is None:
            return True
        policies = [
            p["spec"]
            for p in objects(items, "NetworkPolicy").values()
            if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], {"labels": pod})
        ]
        if not policies:
            return True
        for policy in policies:
            for rule in policy.get(kind.lower(), []):
                peers = rule.get(key)
                if peers is not None and not any(peer_matches(peer, other) for peer in peers):
                    continue
                if any(named_port(p["port"], target) for p in rule.get("ports", [{"port": port}])):
                    return True
        return False

    return direction(target, source, "Ingress", "from") and direction(source, target, "Egress", "to")


def test_only_the_gateway_reaches_the_replicas_and_only_the_replicas_reach_redis(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay in ("cpu", "gpu"):
        items = rendered[overlay]
        workloads = [("Deployment", "lstm-server"), ("Deployment", "lstm-gateway"), ("StatefulSet", "lstm-redis")]
        labels = {
            name: objects(items, kind)[name]["spec"]["template"]["metadata"]["labels"] for kind, name in workloads
        }
        server, gateway, redis = labels["lstm-server"], labels["lstm-gateway"], labels["lstm-redis"]
        stranger = {"app.kubernetes.io/name": "something-else"}
        assert allowed(items, None, gateway, 8443), "clients reach the gateway"
        assert allowed(items, gateway, server, 50051) and allowed(items, gateway, server, 8000)
        assert not allowed(items, None, server, 50051) and not allowed(items, stranger, server, 50051)
        assert not allowed(items, stranger, server, 8000) and not allowed(items, gateway, server, 9090)
        assert allowed(items, server, redis, 6379)
        assert not allowed(items, gateway, redis, 6379) and not allowed(items, stranger, redis, 6379)
        assert not allowed(items, None, redis, 6379)
        assert not allowed(items, redis, server, 50051), "Redis calls nothing"
    for overlay, items in rendered.items():  # DNS: kube-dns in any namespace, nothing else beyond the namespace
        for policy in objects(items, "NetworkPolicy").values():
            for rule in policy["spec"].get("egress", []):
                for peer in rule["to"]:
                    if "namespaceSelector" in peer:
                        assert peer == {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                        assert {p["port"] for p in rule["ports"]} == {53}, f"overlays/{overlay}: {policy['metadata']}"
    items = rendered["kserve"]
    predictor = objects(items, "InferenceService")["lstm-grpc"]["spec"]["predictor"]["labels"]
    redis = objects(items, "StatefulSet")["lstm-redis"]["spec"]["template"]["metadata"]["labels"]
    assert allowed(items, predictor, redis, 6379) and not allowed(items, None, redis, 6379)


# -- secrets and Redis ----------------------------------------------------------------------------------------


def test_no_secret_value_is_written_in_a_manifest(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Secrets come from generated files (or an external store): no manifest in the folder holds a Secret, and
    the rendered ones are exactly the files credentials.py made."""
    for path in KUBERNETES.rglob("*.yaml"):
        for item in yaml.safe_load_all(path.read_text()):
            assert not (item and item.get("kind") == "Secret"), f"{path}: a Secret written in a manifest"
    secrets = objects(rendered["cpu"], "Secret")
    assert set(secrets) == {"lstm-server", "lstm-gateway-tls", "lstm-redis"}
    assert secrets["lstm-gateway-tls"]["type"] == "kubernetes.io/tls"
    assert set(secrets["lstm-server"]["data"]) == {"auth-tokens", "state-keys", "replica.toml"}
    # Every replica mounts the same state keys (sessions saved by one load in another).
    for overlay, items in rendered.items():
        sources = {
            volume["secret"]["secretName"]
            for spec, _ in server_containers(items)
            for volume in spec["volumes"]
            if "secret" in volume
        }
        assert sources == {"lstm-server"}, f"overlays/{overlay}: the replicas' secrets differ: {sources}"


def test_redis_keeps_an_append_only_file_on_a_volume_behind_a_password(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    redis = objects(rendered["cpu"], "StatefulSet")["lstm-redis"]
    spec = redis["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/data"] == "data"
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    conf = mounted_secret(spec, container, args[0], rendered["cpu"])
    assert re.fullmatch(r"requirepass \S{32,}\n?", conf), "the password comes from the mounted redis.conf"
    assert not any("requirepass" in str(a) for a in args[1:]) and "env" not in container
