# TensorFlow images of the MNIST stack (docker-compose.yml builds both targets):
#   train   one-shot trainer: python -m training.train_tf (service tf-train)
#   server  the official TensorFlow Serving with our model, batching and monitoring configuration,
#           gRPC on 8500 and REST on 8501 (service tf-serving; the default target)
#
# Build arguments (defaults build the GPU images from the official pinned images):
#   VARIANT                      gpu: tensorflow[and-cuda] for training (CUDA libraries as wheels)
#                                and the -gpu TF Serving image; cpu: tensorflow-cpu and the CPU image.
#   PYTHON_IMAGE                 the training base: any Debian-based image with python3 (3.11+) and python3-venv.
#   TFSERVING_GPU_IMAGE, TFSERVING_CPU_IMAGE
#                                TF Serving at the TensorFlow version the models are exported with.
# Build context inputs besides the code: extra CA certificates (*.crt) in docker/ca-certificates/,
# local wheels in docker/wheels/. Versions come from requirements/constraints.txt (docker/pip_install.py).
# Needs BuildKit (RUN --mount; it also skips the TF Serving stage of the other variant).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TFSERVING_GPU_IMAGE=tensorflow/serving:2.21.0-gpu
ARG TFSERVING_CPU_IMAGE=tensorflow/serving:2.21.0
ARG VARIANT=gpu

FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
# Trust the extra CA certificates (TLS-inspecting proxies) for pip now and for downloads at run time;
# one unprivileged user (uid 10001, as in deploy/k8s) runs everything.
RUN --mount=type=bind,source=docker/ca-certificates,target=/tmp/extra-ca \
    find /tmp/extra-ca -maxdepth 1 -type f -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
 && update-ca-certificates \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && python3 -m venv /opt/venv

FROM python-base AS train
ARG VARIANT
# tensorflow-serving-api (installed without dependencies) writes the SavedModel's warm-up requests;
# TensorBoard is not a dependency of TensorFlow any more, but tf.summary needs it.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements,target=/tmp/requirements \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    --mount=type=bind,source=docker/pip_install.py,target=/tmp/pip_install.py \
    --mount=type=bind,source=clients/pyproject.toml,target=/tmp/clients/pyproject.toml \
    python3 /tmp/pip_install.py --project-dependencies /tmp/clients/pyproject.toml tensorflow tensorflow-serving-api tensorboard tqdm setuptools \
 && install -d -o 10001 -g 10001 /models /runs /data/mnist
WORKDIR /app
# The client package (its dependencies are in the layer above) carries the model contract.
RUN --mount=type=bind,source=clients,target=/tmp/clients,rw \
    pip install --no-cache-dir --no-deps --no-build-isolation /tmp/clients
COPY serving/__init__.py serving/model_repository.py serving/
COPY training/ training/
# MNIST comes from the /data/mnist mount, or is downloaded there (MNIST_CACHE_DIR/mnist) when absent.
# Allocate GPU memory as needed, not all of it up front: the PyTorch trainer shares the GPU.
ENV MNIST_CACHE_DIR=/data \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    TF_CPP_MIN_LOG_LEVEL=1
USER 10001:10001
CMD ["python", "-m", "training.train_tf", "--output-dir", "/models", "--log-dir", "/runs", "--skip-if-exists"]

# Only the stage of the chosen VARIANT is built (and pulled). Each variant batches its own way
# (serving/tfserving/batching_parameters*.txt explain why); the entrypoint reads the file named here.
FROM ${TFSERVING_GPU_IMAGE} AS tfserving-gpu
ENV TFS_BATCHING_PARAMETERS_FILE=/etc/tfserving/batching_parameters.txt
FROM ${TFSERVING_CPU_IMAGE} AS tfserving-cpu
ENV TFS_BATCHING_PARAMETERS_FILE=/etc/tfserving/batching_parameters_cpu.txt
# The stage name is chosen by VARIANT; both images are pinned above.
# hadolint ignore=DL3006
FROM tfserving-${VARIANT} AS server
RUN groupadd --system --gid 10001 tfserving \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tfserving
COPY serving/tfserving/models.config serving/tfserving/batching_parameters.txt serving/tfserving/batching_parameters_cpu.txt serving/tfserving/monitoring.config /etc/tfserving/
COPY docker/tfserving-entrypoint.sh /usr/local/bin/tfserving-entrypoint
COPY docker/tfserving-healthcheck.sh /usr/local/bin/tfserving-healthcheck
# Ports and model name read by the entrypoint and the healthcheck; share GPU memory with the
# PyTorch server instead of taking all of it.
ENV TFS_GRPC_PORT=8500 \
    TFS_REST_PORT=8501 \
    TFS_MODEL_NAME=mnist \
    TF_FORCE_GPU_ALLOW_GROWTH=true
USER 10001:10001
EXPOSE 8500 8501
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["bash", "/usr/local/bin/tfserving-healthcheck"]
ENTRYPOINT ["bash", "/usr/local/bin/tfserving-entrypoint"]
