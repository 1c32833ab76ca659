"""python -m lstm_server.healthcheck [ADDRESS] [SERVICE]: exit 0 if the server reports SERVING through
grpc.health.v1, 1 otherwise (the container images' HEALTHCHECK). Without SERVICE, the whole server's status."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

NOT_CHECKED = ("grpc.health.v1.Health", "grpc.reflection.")  # listed by reflection, but without a health status


def services(channel: grpc.Channel, timeout_s: float) -> list[str]:
    """The services the server lists through reflection (less health and reflection); [] when it cannot tell."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([request]), timeout=timeout_s
        )
        names = [service.name for response in responses for service in response.list_services_response.service]
    except grpc.RpcError:
        return []
    return sorted(name for name in names if not name.startswith(NOT_CHECKED))


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The serving status's name, or the error that prevented asking (for an unknown service: which ones exist)."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                known = services(channel, timeout_s)
                listed = f"it knows {', '.join(known)}" if known else "it does not list its services"
                return (
                    f"NOT_FOUND: the server has no health status for the service {service!r} ({listed}); leave "
                    "SERVICE out for the whole server's"
                )
            return f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lstm_server.healthcheck", description=__doc__)
    parser.add_argument(
        "address", nargs="?", default="127.0.0.1:50051", help="host:port of the server (default: %(default)s)"
    )
    parser.add_argument(
        "service", nargs="?", default="", help="a service's full name, e.g. lstm.v1.Generation (default: the server)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
