# syntax=docker/dockerfile:1
#
# The processor's server image.
#
#   docker build -t ductape-processor .
#   docker run --rm -p 50051:50051 \
#     -v /path/to/tls:/etc/ductape/tls:ro -v /path/to/manifests:/etc/ductape/manifests:ro \
#     -e PROCESSOR_TLS_CERT=/etc/ductape/tls/tls.crt -e PROCESSOR_TLS_KEY=/etc/ductape/tls/tls.key \
#     -e PROCESSOR_API_KEY_HASHES=<output of `ductape-processor hash-key`> \
#     -e PROCESSOR_SESSION_KEYS=<output of `ductape-processor new-session-key --id k1`> \
#     -e PROCESSOR_MANIFESTS=/etc/ductape/manifests \
#     -e DUCTAPE_HEALTHCHECK_SERVER_NAME=processor.example.internal \
#     --stop-timeout 25 ductape-processor
#
# SECURITY: the image listens on 0.0.0.0:50051 (PROCESSOR_ADDRESS below) so that it can be reached from outside the
# container. The server refuses a non-loopback bind unless it has both
#   - TLS:                   PROCESSOR_TLS_CERT and PROCESSOR_TLS_KEY (PEM files), and
#   - client authentication: PROCESSOR_API_KEY_HASHES (comma-separated hex SHA-256 hashes from
#                            `ductape-processor hash-key`) and/or PROCESSOR_TLS_CLIENT_CA (mTLS),
# and, whatever the transport, PROCESSOR_SESSION_KEYS (session tokens must open on every replica),
# so a container started with no configuration exits with "refusing to serve: ...". That is deliberate.
# `serve --insecure` lifts the transport rule (not the session-key one); pass it only when nothing but trusted callers can reach the port. A sidecar,
# where only the application container in the same pod talks to the processor, should instead bind loopback
# (PROCESSOR_ADDRESS=127.0.0.1:50051), which needs neither TLS nor --insecure: see deploy/kubernetes/sidecar.yaml.
#
# Configure the container through PROCESSOR_* environment variables rather than `serve` flags: the health check
# below reads the same variables (the port of PROCESSOR_ADDRESS, PROCESSOR_TLS_CERT) to reach the server. With TLS
# it dials 127.0.0.1 but checks the certificate for DUCTAPE_HEALTHCHECK_SERVER_NAME: set it to a name the
# certificate is issued for (as above), or the container never becomes healthy.
#
# Shutdown: SIGTERM makes the server report NOT_SERVING and give calls in flight PROCESSOR_SHUTDOWN_GRACE_S seconds
# (default 15) to finish, then the telemetry flush takes at most 5 s more. `docker stop` waits only 10 s before
# SIGKILL, so run with --stop-timeout (or `docker stop -t`) above grace + 5 s, as in the example above.
#
# Building needs BuildKit (the default builder since Docker 23): it uses a heredoc and a bind mount.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: wheels for the client, the server and every dependency -------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the two packages are built from (README.md is the server package's long description);
# .dockerignore keeps local venvs, data and caches out of the context.
COPY clients/python/ clients/python/
COPY pyproject.toml README.md ./
COPY server/ server/

# `pip wheel` with both local projects in one call resolves the server's dependency on ductape-processor-client
# from the local source and puts every third-party wheel into /wheels too, so the final stage installs offline.
RUN pip wheel --wheel-dir /wheels ./clients/python .

# ---- final: a venv with the wheels, running as a non-root user -------------------------------------------------
FROM ${PYTHON_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The wheels are bind-mounted from the builder, not copied, so they are not left in a layer. pip compiles the
# bytecode at install time, which matters with a read-only root filesystem.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links=/wheels ductape-processor \
    && /opt/venv/bin/ductape-processor --version

# A numeric UID/GID, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 ductape \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/ductape-processor --shell /usr/sbin/nologin ductape \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/ductape-processor

# The health check, used by HEALTHCHECK below and by the Kubernetes exec probes in deploy/kubernetes/.
COPY --chmod=0755 <<'EOF' /usr/local/bin/ductape-healthcheck
#!/opt/venv/bin/python
"""Ask the processor in this container for its gRPC health (grpc.health.v1.Health/Check, overall service "").

  ductape-healthcheck          exit 0 when the status is SERVING, 1 otherwise (not listening, NOT_SERVING, error).
                               For HEALTHCHECK and for readiness and startup probes.
  ductape-healthcheck --live   exit 0 when the server answers at all, SERVING or NOT_SERVING. For liveness probes:
                               a server draining after SIGTERM is alive, it is only no longer ready.

It reads the server's own environment. It dials the port of PROCESSOR_ADDRESS, on 127.0.0.1 when the host is a
wildcard (0.0.0.0, ::). When PROCESSOR_TLS_CERT is set it speaks TLS: it trusts the server's own certificate (or
the CA bundle in DUCTAPE_HEALTHCHECK_CA) and checks that the certificate is issued for
DUCTAPE_HEALTHCHECK_SERVER_NAME, which must be one of the certificate's names (without it, the dialled host, e.g.
127.0.0.1, must be). With mTLS (PROCESSOR_TLS_CLIENT_CA) it presents DUCTAPE_HEALTHCHECK_CLIENT_CERT and
DUCTAPE_HEALTHCHECK_CLIENT_KEY. The health service needs no API key.
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def read(name):
    path = os.environ.get(name)
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def main():
    live = sys.argv[1:] == ["--live"]
    host, _, port = os.environ.get("PROCESSOR_ADDRESS", "127.0.0.1:50051").rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if os.environ.get("PROCESSOR_TLS_CERT"):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read("DUCTAPE_HEALTHCHECK_CA") or read("PROCESSOR_TLS_CERT"),
            private_key=read("DUCTAPE_HEALTHCHECK_CLIENT_KEY"),
            certificate_chain=read("DUCTAPE_HEALTHCHECK_CLIENT_CERT"),
        )
        name = os.environ.get("DUCTAPE_HEALTHCHECK_SERVER_NAME")
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target}: {status}")
    ok = response.status == health_pb2.HealthCheckResponse.SERVING
    ok = ok or (live and response.status == health_pb2.HealthCheckResponse.NOT_SERVING)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # e.g. an unreadable certificate file: report unhealthy, not a traceback
        print(f"health check failed: {exc}", file=sys.stderr)
        sys.exit(1)
EOF

# Listen on every interface of the container; see SECURITY above: TLS + client auth, or a conscious --insecure.
ENV PROCESSOR_ADDRESS=0.0.0.0:50051 \
    PROCESSOR_DATA_DIR=/var/lib/ductape-processor

USER 10001:10001
WORKDIR /var/lib/ductape-processor
EXPOSE 50051

# Exit codes: 0 healthy, 1 unhealthy. --start-period covers the store migration and manifests applied at start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["ductape-healthcheck"]

# The exec form makes the server PID 1, so it receives `docker stop`'s SIGTERM itself and drains.
ENTRYPOINT ["ductape-processor"]
CMD ["serve"]
