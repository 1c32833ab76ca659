"""The docker-compose topology as local processes on loopback (``make cluster``, ``make cluster-down``).

    python deploy/cluster.py up [--dir .cluster] [--replicas 2] [--models models] [--gateway-port 0]
    python deploy/cluster.py env [--dir .cluster]     # shell exports for lstm-client: eval "$(...)"
    python deploy/cluster.py down [--dir .cluster]

``up`` makes (or completes) the secrets in ``<dir>/secrets`` (``credentials.py``: a CA and the gateway's
certificate, a bearer token for the tenant ``dev``, the replicas' shared state keys, the Redis password), then
starts redis-server with that password, the replicas (``lstm-server`` with the Redis session store,
``--auth-tokens`` and ``--state-keys-file``) and the nginx gateway rendered from
``deploy/nginx/gateway.conf.template`` (TLS: gRPC over HTTP/2, and the HTTP port), each on a free loopback port,
waits until each answers,
and writes ``<dir>/state.json`` (mode 0600): the gateway address, the CA file, the tenant and its token, and each
process's name, address, pid and log file. ``down`` stops what ``state.json`` names and removes it (the secrets
stay, so the token does not change from one ``up`` to the next). nginx and redis-server come from Debian's
packages and are installed when missing. The tests import this module to run the same topology under their
control (kill a replica, stop Redis).

Standard library only outside ``up``, so ``down`` works without the project's virtualenv (``up`` needs
``cryptography`` for the certificates).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "nginx" / "gateway.conf.template"
PACKAGES = {"redis-server": "redis-server", "nginx": "nginx"}  # binary: Debian package
SBIN = ["/usr/sbin", "/usr/bin", "/sbin"]
# How long the gateway skips a replica after a failed connection (nginx's fail_timeout, as entrypoint.sh's
# default; 1 to 2 s on nginx's clock of whole seconds): short, because while every replica is skipped each call
# fails ("no live upstreams"), and a replica that restarts (a few seconds) is then used again at once.
FAIL_TIMEOUT = "1s"


class ClusterError(RuntimeError):
    pass


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def find_packages() -> dict[str, str | None]:
    """Paths of redis-server and nginx (None for one that is missing); installs nothing (the tests use this)."""
    return {binary: find_binary(binary) for binary in PACKAGES}


def install_command(binaries: Sequence[str] = tuple(PACKAGES)) -> str:
    """The command that installs ``binaries`` from Debian's packages (as root)."""
    return f"apt-get install -y {' '.join(PACKAGES[binary] for binary in binaries)}"


def ensure_packages() -> dict[str, str]:
    """Paths of redis-server and nginx, installing Debian's packages when they are missing (``make cluster``)."""
    missing = [PACKAGES[binary] for binary, path in find_packages().items() if path is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ClusterError(f"{' and '.join(missing)} missing; install them with apt-get (needs root)")
        print(f"cluster: installing {' '.join(missing)} from Debian's packages", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return {binary: find_binary(binary) for binary in PACKAGES}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, what: str, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise ClusterError(f"{what} did not come up within {timeout_s:g} s\n{tail}")
        time.sleep(0.05)


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Process:
    name: str
    address: str
    pid: int
    log: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def spawn(name: str, command: list[str], port: int, workdir: Path, env: dict[str, str] | None = None) -> Process:
    """Start ``command`` in its own session (it outlives this script), output to ``<workdir>/<name>.log``."""
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:
        child = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Process(name, f"127.0.0.1:{port}", child.pid, str(log), command, env or {})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a child of ours that exited is a zombie until reaped
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def is_running(process: Process) -> bool:
    """Alive, and still the program we started (not another process that got its pid since)."""
    if not alive(process.pid):
        return False
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    # the whole command line: a Python entry point's argv[0] is the interpreter; nginx and redis retitle themselves
    return not process.command or Path(process.command[0]).name in cmdline


def stop(process: Process, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    """Signal the process and wait for it to exit (SIGKILL after ``timeout_s``)."""
    if not is_running(process):
        return
    os.kill(process.pid, sig)
    deadline = time.monotonic() + timeout_s
    while alive(process.pid):
        if time.monotonic() > deadline:
            os.kill(process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.02)


def start_redis(
    workdir: Path, port: int, binary: str, *, config: Path | None = None, extra_args: Sequence[str] = ()
) -> Process:
    """redis-server on loopback; appendonly with an fsync per write, so a restart keeps every saved session.

    ``config``: a redis.conf read first (the cluster's holds ``requirepass``: a password never goes on a command
    line, which every user of the machine can read); ``extra_args`` come last and override the rest (TLS:
    ``--port 0 --tls-port PORT --tls-cert-file ...``)."""
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    command = [binary, *([str(config)] if config else []), "--bind", "127.0.0.1", "--port", str(port)]
    command += ["--dir", str(data), "--save", "", "--appendonly", "yes", "--appendfsync", "always", *extra_args]
    process = spawn("redis", command, port, workdir)
    wait_for(lambda: accepts(port), "redis-server", 20, Path(process.log))
    return process


def start_replica(
    workdir: Path, name: str, port: int, models: Path, *, config: Path | None = None, **settings: Any
) -> Process:
    """One ``lstm-server`` with the Redis session store, configured like the compose service: ``config`` (a TOML
    file: the cluster's holds the Redis URL with its password), then ``LSTM_SERVER_*`` variables from
    ``settings`` (started, not yet serving: see ``wait_until_serving``)."""
    env = {
        "LSTM_SERVER_REPLICA_NAME": name,
        "LSTM_SERVER_HOST": "127.0.0.1",
        "LSTM_SERVER_PORT": str(port),
        "LSTM_SERVER_MODELS": str(models),
        "LSTM_SERVER_METRICS_PORT": "0",
        "LSTM_SERVER_HTTP_PORT": str(free_port()),  # one machine: each replica its own
        "LSTM_SERVER_SESSION_STORE": "redis",
        **{f"LSTM_SERVER_{key.upper()}": str(value) for key, value in settings.items()},
    }
    command = [sys.executable, "-m", "lstm_server.cli", *(["--config", str(config)] if config else [])]
    return spawn(name, command, port, workdir, env)


def restart(process: Process) -> Process:
    """Start a stopped process again with the same command, environment and port."""
    started = spawn(process.name, process.command, process.port, Path(process.log).parent, process.env)
    if process.name.startswith("redis"):
        wait_for(lambda: accepts(started.port), "redis-server", 20, Path(started.log))
    else:
        wait_until_serving(started)
    return started


def wait_until_serving(process: Process, timeout_s: float = 60) -> None:
    from lstm_server.healthcheck import check  # the project's venv: only replicas need it

    wait_for(
        lambda: alive(process.pid) and check(process.address, timeout_s=1) == "SERVING",
        process.name,
        timeout_s,
        Path(process.log),
    )


def http_address(replica: Process) -> str:
    """A replica's HTTP address (its --http-port)."""
    return f"127.0.0.1:{replica.env['LSTM_SERVER_HTTP_PORT']}"


def _upstreams(addresses: list[str]) -> str:
    return "\n        ".join(f"server {address} max_fails=1 fail_timeout={FAIL_TIMEOUT};" for address in addresses)


def render_gateway(
    workdir: Path, listen: str, replicas: list[Process], tls_cert: Path, tls_key: Path, http_listen: str
) -> Path:
    """The gateway's nginx.conf: the compose gateway's template with loopback upstreams (gRPC and HTTP) and the
    cluster's certificate."""
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    text = string.Template(TEMPLATE.read_text()).safe_substitute(
        GATEWAY_LISTEN=listen,
        GATEWAY_UPSTREAMS_BLOCK=_upstreams([r.address for r in replicas]),
        GATEWAY_HTTP_LISTEN=http_listen,
        GATEWAY_HTTP_UPSTREAMS_BLOCK=_upstreams([http_address(r) for r in replicas]),
        GATEWAY_PREFIX=str(prefix),
        GATEWAY_TLS_CERT=str(tls_cert),
        GATEWAY_TLS_KEY=str(tls_key),
    )
    conf = workdir / "nginx.conf"
    conf.write_text(text)
    return conf


def start_gateway(
    workdir: Path, port: int, replicas: list[Process], binary: str, tls_cert: Path, tls_key: Path, http_port: int
) -> Process:
    """nginx terminating TLS on ``port`` (gRPC) and ``http_port`` (HTTP), loopback, in front of ``replicas``."""
    conf = render_gateway(workdir, f"127.0.0.1:{port}", replicas, tls_cert, tls_key, f"127.0.0.1:{http_port}")
    command = [binary, "-c", str(conf), "-g", "daemon off;"]
    process = spawn("gateway", command, port, workdir, {"GATEWAY_HTTP_PORT": str(http_port)})
    try:
        wait_for(lambda: accepts(port) and accepts(http_port), "nginx gateway", 20, Path(process.log))
    except BaseException:
        stop(process)
        raise
    return process


@dataclass
class Cluster:
    gateway: Process
    redis: Process
    replicas: list[Process]
    ca: str = ""  # the CA that signed the gateway's certificate (clients: --ca)
    tenant: str = ""
    token: str = ""  # the tenant's bearer token
    secrets: str = ""  # the folder of credentials.py's files

    @property
    def processes(self) -> list[Process]:
        return [self.gateway, *self.replicas, self.redis]

    @property
    def http(self) -> str:
        """The gateway's HTTPS base URL (docs/http.md's endpoints, the cluster's CA)."""
        return f"https://127.0.0.1:{self.gateway.env['GATEWAY_HTTP_PORT']}"

    def replica(self, name: str) -> Process:
        return next(r for r in self.replicas if r.name == name)

    def client(self, address: str | None = None, **settings: Any):
        """An ``lstm_client.Client`` with the cluster's token: to the gateway over TLS, or to one replica's
        ``address`` (plaintext on loopback)."""
        from lstm_client import Client, TlsConfig  # the project's venv: only clients need it

        if address is None:
            return Client(self.gateway.address, token=self.token, tls=TlsConfig(ca=self.ca), **settings)
        return Client(address, token=self.token, **settings)

    def save(self, path: Path) -> None:
        """``state.json``, readable by its owner only: it holds the token."""
        text = json.dumps(asdict(self), indent=2) + "\n"
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.unlink(missing_ok=True)
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(text)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> Cluster:
        state = json.loads(path.read_text())
        extra = {key: state.get(key, "") for key in ("ca", "tenant", "token", "secrets")}
        return cls(
            Process(**state["gateway"]),
            Process(**state["redis"]),
            [Process(**r) for r in state["replicas"]],
            **extra,
        )

    def down(self) -> None:
        for process in self.processes:
            stop(process)


def up(workdir: Path, models: Path, replicas: int = 2, gateway_port: int = 0, **settings: Any) -> Cluster:
    """Start the whole topology; on any failure, stop what was started and raise. Unless ``settings`` say
    otherwise, the replicas share the cores: ``threads`` = cores // replicas (bench/RESULTS.md: two replicas of
    two onnxruntime threads each on two cores are slower than one). ``settings`` are the replicas' options."""
    import credentials  # needs cryptography (the project's venv), unlike the rest of this module

    settings.setdefault("threads", max(1, (os.cpu_count() or 1) // replicas))
    binaries = ensure_packages()
    workdir.mkdir(parents=True, exist_ok=True)
    redis_port = free_port()
    made = credentials.write_stack_secrets(workdir / "secrets", redis_address=f"127.0.0.1:{redis_port}")
    settings = {"auth_tokens": made.auth_tokens, "state_keys_file": made.state_keys, **settings}
    started: list[Process] = []
    try:
        redis = start_redis(workdir, redis_port, binaries["redis-server"], config=made.redis_conf)
        started.append(redis)
        for i in range(1, replicas + 1):
            name = f"replica-{i}"
            started.append(start_replica(workdir, name, free_port(), models, config=made.replica_config, **settings))
        for replica in started[1:]:  # started together, waited for one by one
            wait_until_serving(replica)
        gateway = start_gateway(
            workdir,
            gateway_port or free_port(),
            started[1:],
            binaries["nginx"],
            made.server_cert,
            made.server_key,
            free_port(),
        )
    except BaseException:
        for process in started:
            stop(process)
        raise
    cluster = Cluster(gateway, redis, started[1:], str(made.ca), made.tenant, made.token, str(made.folder))
    cluster.save(workdir / "state.json")
    return cluster


def shell_exports(cluster: Cluster) -> str:
    """``export`` lines that point lstm-client at the cluster's gateway (``eval "$(cluster.py env)"``)."""
    values = {"LSTM_CLIENT_SERVER": cluster.gateway.address, "LSTM_CLIENT_CA": cluster.ca}
    values["LSTM_CLIENT_TOKEN"] = cluster.token
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "env"])
    parser.add_argument("--dir", type=Path, default=REPO / ".cluster", help="state and logs (default .cluster)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--gateway-port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    state = args.dir / "state.json"
    if args.action == "env":
        if not state.exists():
            print(f"cluster: not up ({state} not found); run make cluster", file=sys.stderr)
            return 1
        sys.stdout.write(shell_exports(Cluster.load(state)))
        return 0
    if args.action == "down":
        if not state.exists():
            print(f"cluster: nothing to stop ({state} not found)", file=sys.stderr)
            return 0
        Cluster.load(state).down()
        state.unlink()
        print("cluster: stopped", file=sys.stderr)
        return 0
    if state.exists():
        print(f"cluster: already up ({state}); run make cluster-down first", file=sys.stderr)
        return 1
    try:
        cluster = up(args.dir.resolve(), args.models.resolve(), args.replicas, args.gateway_port)
    except ClusterError as error:
        print(f"cluster: {error}", file=sys.stderr)
        return 1
    print(
        f"cluster: gateway at {cluster.gateway.address} (gRPC, TLS) and {cluster.http} (HTTP), CA {cluster.ca}; "
        f"state in {state}",
        file=sys.stderr,
    )
    print(f"cluster: tenant {cluster.tenant!r}, token in {state}; for lstm-client:", file=sys.stderr)
    print(f'  eval "$(python3 deploy/cluster.py env --dir {args.dir})"', file=sys.stderr)
    for process in cluster.processes:
        print(f"  {process.name:10} {process.address:22} pid {process.pid}  log {process.log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
