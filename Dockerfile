# The sidecar image: `dagcast sidecar` with the [sidecar] extra and nothing else.
#
#   docker build -t dagcast-sidecar .
#   docker run --read-only -v dags:/var/lib/dagcast -e DAGCAST_API_URL -e DAGCAST_TOKEN \
#     -e DAGCAST_DEPLOYMENT dagcast-sidecar --name worker-0 --root /var/lib/dagcast/versions \
#     --link /var/lib/dagcast/dags
#
# Runs as an unprivileged user and works with a read-only root filesystem: it writes only under
# /var/lib/dagcast (versions, the live link, its secret), a volume shared with Airflow. The base
# is pinned by tag; add its digest (python:3.11.7-slim-bookworm@sha256:...) where you build.
# Dockerfile.airflow is the same sidecar on the Airflow image, for the parse check.

FROM python:3.11.7-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md app.py ./
COPY chalicelib ./chalicelib
COPY dagcast ./dagcast
COPY constraints ./constraints
RUN python -m venv /opt/dagcast \
 && /opt/dagcast/bin/pip install --no-cache-dir --constraint /src/constraints/sidecar.txt "/src[sidecar]"

FROM python:3.11.7-slim-bookworm
LABEL org.opencontainers.image.title="dagcast sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 dagcast \
 && useradd --system --uid 10001 --gid dagcast --home-dir /var/lib/dagcast --no-create-home dagcast \
 && mkdir -p /var/lib/dagcast \
 && chown dagcast:dagcast /var/lib/dagcast
COPY --from=build /opt/dagcast /opt/dagcast
ENV PATH=/opt/dagcast/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DAGCAST_METRICS_ADDR=0.0.0.0:9108
USER 10001:10001
WORKDIR /var/lib/dagcast
VOLUME ["/var/lib/dagcast"]
EXPOSE 9108
# /healthz answers 200 once a version is live, 503 before; it listens on DAGCAST_METRICS_ADDR.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('DAGCAST_METRICS_ADDR', ':9108').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["dagcast", "sidecar"]
