# sluice as a container sidecar: `flow consume /etc/sluice/pipeline.toml`.
#
#   docker build -t sluice .
#   docker run --rm -v $PWD/pipeline.toml:/etc/sluice/pipeline.toml:ro -p 9100:9100 sluice
#
# Every flag of `flow consume` can be set by environment (SLUICE_<FLAG>, see
# `flow consume --help`); the defaults below suit a sidecar: metrics and
# probes on 9100 (/metrics, /healthz, /readyz), JSON logs on stderr. SIGTERM
# finishes the batch in flight (write, flush, commit) and exits 0: give the
# pod a termination grace period longer than one batch's write (see
# deploy/kubernetes/sidecar.yaml). Tested without a container engine by
# tests/integration/test_sidecar.py, which runs this file's ENV, CMD and
# HEALTHCHECK as a script; linted by hadolint in `make lint`.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sluice
COPY pyproject.toml README.md ./
COPY src ./src
# The project itself, from its sources; its dependencies' lower bounds are in
# pyproject.toml (a constraints file can pin them further: pip -c). Byte-
# compiled here (pip's default): with PYTHONDONTWRITEBYTECODE every start
# would otherwise compile every module it imports again (~0.2 CPU-s a start).
# hadolint ignore=DL3013
RUN python -m pip install ".[all]" \
    && useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home sluice

USER 10001
ENV SLUICE_CONFIG=/etc/sluice/pipeline.toml \
    SLUICE_METRICS_PORT=9100 \
    SLUICE_LOG_FORMAT=json \
    SLUICE_STATE_DIR=/var/lib/sluice
WORKDIR /var/lib/sluice
EXPOSE 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SLUICE_METRICS_PORT', '9100'), timeout=2)"]
ENTRYPOINT ["flow", "consume"]
