# The client-only images (the client package mnist-serving-client, no torch, no TensorFlow):
# - stage loadtest: its console script `mnist-loadtest`; docker-compose.yml's `loadtest` service;
# - stage web: the draw-a-digit page (serving/web, docs/web.md), which reaches the servers through
#   the client package and draws the load tester's charts; docker-compose.yml's `web` service.
#
# Build arguments:
#   PYTHON_IMAGE  the base image: any Debian-based image with python3 (3.11+) and python3-venv.
# Build context inputs besides the code: extra CA certificates (*.crt) in docker/ca-certificates/,
# local wheels in docker/wheels/. Versions come from requirements/constraints.txt (docker/pip_install.py).
# Needs BuildKit (RUN --mount).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
# Trust the extra CA certificates (TLS-inspecting proxies) for pip now and at run time;
# one unprivileged user (uid 10001, as in deploy/k8s) runs everything.
RUN --mount=type=bind,source=docker/ca-certificates,target=/tmp/extra-ca \
    find /tmp/extra-ca -maxdepth 1 -type f -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
 && update-ca-certificates \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && python3 -m venv /opt/venv

FROM python-base AS loadtest
# The client's dependencies first (they change less often than its code).
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements,target=/tmp/requirements \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    --mount=type=bind,source=docker/pip_install.py,target=/tmp/pip_install.py \
    --mount=type=bind,source=clients/pyproject.toml,target=/tmp/clients/pyproject.toml \
    python3 /tmp/pip_install.py --project-dependencies /tmp/clients/pyproject.toml setuptools \
 && install -d -o 10001 -g 10001 /reports /data/mnist
RUN --mount=type=bind,source=clients,target=/tmp/clients,rw \
    pip install --no-cache-dir --no-deps --no-build-isolation /tmp/clients
COPY docker/loadtest-entrypoint.sh /usr/local/bin/loadtest-entrypoint
# The MNIST test images come from the /data/mnist mount (MNIST_CACHE_DIR/mnist).
ENV MNIST_CACHE_DIR=/data
WORKDIR /reports
USER 10001:10001
# A client, not a server: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["bash", "/usr/local/bin/loadtest-entrypoint"]
CMD ["--help"]

FROM python-base AS web
# The client (the report view draws the load tester's charts; its MNIST reader picks the test images),
# Flask and gunicorn.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements,target=/tmp/requirements \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    --mount=type=bind,source=docker/pip_install.py,target=/tmp/pip_install.py \
    --mount=type=bind,source=clients/pyproject.toml,target=/tmp/clients/pyproject.toml \
    python3 /tmp/pip_install.py --project-dependencies /tmp/clients/pyproject.toml \
        flask gunicorn setuptools
RUN --mount=type=bind,source=clients,target=/tmp/clients,rw \
    pip install --no-cache-dir --no-deps --no-build-isolation /tmp/clients
WORKDIR /app
# The page (nothing else of serving/, nothing of training/).
COPY serving/__init__.py serving/
COPY serving/web/ serving/web/
ENV PYTHONPATH=/app \
    MNIST_WEB_PORT=8000 \
    MNIST_WEB_DATA_DIR=/data/mnist \
    MNIST_WEB_REPORTS_DIR=/reports
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "serving.web.healthcheck"]
CMD ["python", "-m", "serving.web"]
