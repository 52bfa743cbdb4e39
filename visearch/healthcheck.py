"""Exit 0 when a gRPC service reports SERVING: `python -m visearch.healthcheck HOST:PORT [SERVICE]`.

Used by container health checks, where no grpc_health_probe binary is shipped.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m visearch.healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    service = argv[1] if len(argv) > 1 else ""
    try:
        with grpc.insecure_channel(argv[0]) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as exc:
        print(f"{argv[0]}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{argv[0]}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
