"""docker-compose.yml against the Compose Specification's JSON schema, and what this project needs of it.

The schema is the compose-spec project's own (compose-spec/compose-spec, schema/compose-spec.json), as the dev
requirement check-jsonschema vendors it together with its sha256. No containers are involved: make compose-test
runs the stack itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import credentials
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
    return {key: str(value) for key, value in env.items() if value is not None}  # no value: the shell's, if set


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


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> credentials.StackSecrets:
    """What `python3 deploy/credentials.py` writes for the compose stack (its defaults)."""
    return credentials.write_stack_secrets(tmp_path_factory.mktemp("secrets") / "secrets", ["gateway"])


def mounted(service: dict[str, Any], compose: dict[str, Any]) -> dict[str, Path]:
    """The service's secrets: path in the container -> the generated file's name (compose's default target)."""
    declared = interpolate(compose)["secrets"]
    found = {}
    for item in service.get("secrets") or []:
        name = item if isinstance(item, str) else item["source"]
        target = name if isinstance(item, str) else item.get("target", name)
        found[target if target.startswith("/") else f"/run/secrets/{target}"] = Path(declared[name]["file"])
    return found


def test_secrets_are_generated_files_outside_the_images(compose: dict[str, Any], generated) -> None:
    """Every secret is a file deploy/credentials.py writes into LSTM_SECRETS_DIR (./deploy/secrets by default),
    which git ignores and no image's build context holds."""
    raw = compose["secrets"]
    for name, secret in interpolate(compose)["secrets"].items():
        assert raw[name]["file"].startswith("${LSTM_SECRETS_DIR:-./deploy/secrets}/"), name
        assert (generated.folder / Path(secret["file"]).name).is_file(), f"{name}: credentials.py does not write it"
    assert (generated.folder / ".gitignore").read_text().splitlines()[-1] == "*"
    assert generated.folder.stat().st_mode & 0o777 == 0o700
    allowed = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert not any("secrets" in line or line.rstrip("/") == "!deploy" for line in allowed), allowed


def test_two_replicas_share_sessions_through_redis(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], generated
) -> None:
    found = replicas(services)
    assert len(found) >= 2, f"expected at least two replicas built from {SERVER_DOCKERFILE}, found {sorted(found)}"
    for name, service in found.items():
        env = environment(service)
        assert env["LSTM_SERVER_REPLICA_NAME"] == name  # the x-replica metadata names the compose service
        assert env["LSTM_SERVER_SESSION_STORE"] == "redis"
        # The Redis URL carries the password, so it comes from a mounted TOML file, not from the environment
        # (which would override the file).
        assert "LSTM_SERVER_REDIS_URL" not in env
        secrets = mounted(service, compose)
        config = service["command"][service["command"].index("--config") + 1]
        url = tomllib.loads((generated.folder / secrets[config].name).read_text())["redis_url"]
        password, redis_host = re.fullmatch(r"redis://:([^@]+)@([^:/]+):6379/0", url).groups()
        assert password == generated.redis_password and len(password) >= 32
        assert redis_host in services, f"{name}: the Redis of its redis_url is not a service"
        assert redis_host in service["depends_on"]
        # Authentication (a replica on 0.0.0.0 must have it) and the state keys every replica shares.
        for variable in ("LSTM_SERVER_AUTH_TOKENS", "LSTM_SERVER_STATE_KEYS_FILE"):
            assert env[variable] in secrets, f"{name}: {variable} is not a mounted secret"
        assert secrets[env["LSTM_SERVER_AUTH_TOKENS"]].name == "auth-tokens"
        assert secrets[env["LSTM_SERVER_STATE_KEYS_FILE"]].name == "state-keys"
        assert "LSTM_SERVER_INSECURE_NO_AUTH" not in env
        assert "./models:/models:ro" in service["volumes"], f"{name} must mount the model repository read-only"
        assert service.get("restart") in ("always", "unless-stopped", "on-failure")
        assert "ports" not in service, f"{name}: replicas are reached through the gateway only"


def test_the_replicas_environment_is_a_configuration_the_server_accepts(compose: dict[str, Any]) -> None:
    """With no variable set, as Docker compose and podman-compose 1.0 both read it: podman-compose leaves a
    ``${VAR:-}`` with an empty default unexpanded (its pattern wants one character), and the server then refuses
    the literal text, so every default is non-empty or the variable is passed through with no value."""
    from lstm_server.config import load_config

    for name, service in replicas(compose["services"]).items():
        for key, value in (service.get("environment") or {}).items():
            for match in VARIABLE.finditer(str(value or "")):
                assert match.group(2) not in (":-", "-") or match.group(3), (
                    f"{name}: {key}: {match.group(0)} has an empty default (podman-compose leaves it unexpanded): "
                    "give a default, or no value at all to pass the shell's through"
                )
        load_config([], environ=environment(interpolate(service)))  # raises ConfigError naming the variable


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


def test_the_gateway_serves_tls_with_the_generated_certificate(compose: dict[str, Any], generated) -> None:
    gateway = interpolate(compose)["services"]["gateway"]
    secrets = {target: path.name for target, path in mounted(gateway, compose).items()}
    # The entrypoint's defaults (also the image's environment) are where compose mounts the files.
    entrypoint = (ROOT / "deploy/nginx/entrypoint.sh").read_text()
    for variable, file in (("GATEWAY_TLS_CERT", "server.pem"), ("GATEWAY_TLS_KEY", "server-key.pem")):
        default = re.search(rf'^{variable}="\${{{variable}:-([^}}]+)}}"$', entrypoint, re.M).group(1)
        assert secrets[default] == file, variable
    template = (ROOT / "deploy/nginx/gateway.conf.template").read_text()
    assert re.search(r"^\s*listen \$\{GATEWAY_LISTEN\} ssl http2;", template, re.M)
    assert "ssl_certificate ${GATEWAY_TLS_CERT};" in template and "ssl_certificate_key ${GATEWAY_TLS_KEY};" in template
    assert "${GATEWAY_TLS_CERT} ${GATEWAY_TLS_KEY}" in entrypoint  # envsubst renders them
    # The certificate names the gateway's service and loopback (the published port), and chains to the CA.
    assert {"gateway", "localhost", "127.0.0.1"} <= names_in(generated.server_cert)
    assert secrets["/run/secrets/tls-ca"] == "ca.pem"


def names_in(path: Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in alt}


def test_redis_requires_the_generated_password(compose: dict[str, Any], generated) -> None:
    redis = interpolate(compose)["services"]["redis"]
    secrets = {target: path.name for target, path in mounted(redis, compose).items()}
    assert secrets == {"/run/secrets/redis-conf": "redis.conf"}
    assert (generated.folder / "redis.conf").read_text() == f"requirepass {generated.redis_password}\n"
    image = (ROOT / "deploy/redis.Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["redis-server", "/run/secrets/redis-conf"', image, re.M)
    assert "--protected-mode" not in image
    # The health check authenticates from the file (never a password on a command line).
    assert "REDISCLI_AUTH=" in " ".join(redis["healthcheck"]["test"]) and "REDISCLI_AUTH=" in image


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
        assert not re.search(r"(models|\.venv|\.git|training|export|runs|\.podman|\.cluster|secrets)", allowed), allowed


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
