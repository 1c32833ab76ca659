"""docker-compose.yml against the Compose Specification's JSON schema, and what this project needs of it.

The schema is the compose-spec project's own (compose-spec/compose-spec, schema/compose-spec.json), as the dev
requirement check-jsonschema vendors it together with its sha256. No containers are involved: make compose-test
runs the stack itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVER_DOCKERFILE = "deploy/server.Dockerfile"
GPU_DOCKERFILE = "deploy/server-gpu.Dockerfile"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    raw = (vendor / "compose-spec.json").read_bytes()
    expected = (vendor / "sha256" / "compose-spec.sha256").read_text().split()[0]
    assert hashlib.sha256(raw).hexdigest() == expected, "the vendored compose-spec.json does not match its sha256"
    return json.loads(raw)


def interpolate(value: Any) -> Any:
    """The file as compose reads it with no variable set: every ``${VAR:-default}`` becomes its default."""
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: m.group(3) or "", value.replace("$$", "\0")).replace("\0", "$")
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return interpolate(compose)["services"]


def dockerfile(service: dict[str, Any]) -> str:
    build = service.get("build") or {}
    return build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"


def default_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services `compose up` starts without a --profile."""
    return {name: service for name, service in services.items() if not service.get("profiles")}


def replicas(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in default_services(services).items() if dockerfile(s) == SERVER_DOCKERFILE}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: str(value) for key, value in env.items()}


def test_the_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    for document in (compose, interpolate(compose)):
        errors = [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)
        ]
        assert not errors, "\n".join(errors)


def test_every_variable_has_a_default() -> None:
    """`docker compose up` works with no .env and no variable set."""
    for match in VARIABLE.finditer(COMPOSE_FILE.read_text()):
        assert match.group(2) in (":-", "-"), f"{match.group(0)} has no default"


def test_two_replicas_share_sessions_through_redis(services: dict[str, dict[str, Any]]) -> None:
    found = replicas(services)
    assert len(found) >= 2, f"expected at least two replicas built from {SERVER_DOCKERFILE}, found {sorted(found)}"
    for name, service in found.items():
        env = environment(service)
        assert env["LSTM_SERVER_REPLICA_NAME"] == name  # the x-replica metadata names the compose service
        assert env["LSTM_SERVER_SESSION_STORE"] == "redis"
        redis_host = re.match(r"redis://([^:/]+)", env["LSTM_SERVER_REDIS_URL"]).group(1)
        assert redis_host in services, f"{name}: the Redis of {env['LSTM_SERVER_REDIS_URL']} is not a service"
        assert redis_host in service["depends_on"]
        assert "./models:/models:ro" in service["volumes"], f"{name} must mount the model repository read-only"
        assert service.get("restart") in ("always", "unless-stopped", "on-failure")
        assert "ports" not in service, f"{name}: replicas are reached through the gateway only"


def test_the_gateway_routes_sessions_to_the_replicas(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    assert dockerfile(gateway) == "deploy/gateway.Dockerfile"
    upstreams = environment(gateway)["GATEWAY_UPSTREAMS"].split()
    assert sorted(upstreams) == sorted(f"{name}:50051" for name in replicas(services))
    assert sorted(gateway["depends_on"]) == sorted(replicas(services))
    assert any(port.startswith("127.0.0.1:") and port.endswith(":8080") for port in gateway["ports"])
    image = (ROOT / "deploy/gateway.Dockerfile").read_text()
    assert "deploy/nginx/gateway.conf.template" in image and "deploy/nginx/entrypoint.sh" in image
    template = (ROOT / "deploy/nginx/gateway.conf.template").read_text()
    assert re.search(r"^\s*hash\s+\$\w+\s+consistent;", template, re.M), "sessions must hash consistently"
    assert "${GATEWAY_UPSTREAMS_BLOCK}" in template


def test_every_service_has_a_health_check(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        assert not check.get("disable"), f"{name}: health check disabled"
        test = check.get("test")
        if test:
            assert test not in (["NONE"], "NONE"), f"{name}: health check disabled"
            continue
        text = (ROOT / dockerfile(service)).read_text()
        assert re.search(r"^HEALTHCHECK\s+(?!NONE)", text, re.M), f"{name}: no health check in compose or its image"


def test_every_image_takes_its_base_as_a_build_argument(services: dict[str, dict[str, Any]]) -> None:
    """So that the local test builds the stack on a local base image, and users on the official ones."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name, service in services.items():
        text = (ROOT / dockerfile(service)).read_text()
        default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
        assert default, f"{dockerfile(service)}: no ARG BASE_IMAGE=<default>"
        assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M), f"{dockerfile(service)}: FROM ${{BASE_IMAGE}}"
        argument = raw[name]["build"]["args"]["BASE_IMAGE"]
        assert re.fullmatch(r"\$\{[A-Z_]+_BASE_IMAGE:-[^}]+\}", argument), f"{name}: BASE_IMAGE not overridable"
        assert service["build"]["args"]["BASE_IMAGE"] == default.group(1), f"{name}: default differs from the image's"


def test_the_server_image_holds_no_training_code_and_no_models() -> None:
    for path in (SERVER_DOCKERFILE, GPU_DOCKERFILE):
        copies = re.findall(r"^COPY\s+(.*)$", (ROOT / path).read_text(), re.M)
        for line in copies:
            assert not re.search(r"\b(training|export|models|bench|tests)\b", line), f"{path}: COPY {line}"
        instructions = [line for line in (ROOT / path).read_text().splitlines() if not line.startswith("#")]
        assert not any(re.search(r"\btorch\b", line) for line in instructions), f"{path} installs torch"
        assert any("ORT_DISABLE_TELEMETRY=1" in line for line in instructions), f"{path}: onnxruntime telemetry on"
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignored[0] == "*", ".dockerignore must start from nothing (an allow-list)"
    for allowed in (line for line in ignored if line.startswith("!")):
        assert not re.search(r"(models|\.venv|\.git|training|export|runs|\.podman|\.cluster)", allowed), allowed


def test_the_gpu_profile_adds_a_gpu_replica(services: dict[str, dict[str, Any]]) -> None:
    gpu = {name: s for name, s in services.items() if "gpu" in (s.get("profiles") or [])}
    assert gpu, "no service in the gpu profile"
    for name, service in gpu.items():
        assert dockerfile(service) == GPU_DOCKERFILE
        assert environment(service)["LSTM_SERVER_DEVICE"] == "cuda"
        assert environment(service)["LSTM_SERVER_REPLICA_NAME"] == name
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    # onnxruntime-gpu at the version constraints.txt pins for onnxruntime (the image reads it from there).
    image = (ROOT / GPU_DOCKERFILE).read_text()
    assert "s/^onnxruntime==//p' constraints.txt" in image and "onnxruntime-gpu==${ort_version}" in image
    assert re.search(r"^onnxruntime==\S+$", (ROOT / "constraints.txt").read_text(), re.M)
