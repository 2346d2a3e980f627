# The TF Serving stand-in image for docker-compose.local.yml (service tf-serving on machines where the
# official tensorflow/serving image cannot be pulled): python -m serving.tfs_standin, TensorFlow
# Serving's gRPC API (PredictionService, ModelService, grpc.health.v1) on 8500 and its REST API on
# 8501, serving the SavedModel from the models volume with the same /etc/tfserving files as the real
# image (Dockerfile.tf, target server). It is a development tool, not TensorFlow Serving.
#
# Build argument:
#   TF_TRAIN_IMAGE  the TensorFlow training image (Dockerfile.tf, target train) this one extends: it
#                   already holds TensorFlow, tensorflow-serving-api, the client package and the
#                   unprivileged user. Compose builds it first (tf-serving depends on tf-train).
# Needs BuildKit (RUN --mount).

ARG TF_TRAIN_IMAGE=mnist-tf-train:0.1.0-local

# The image is one of this stack's own, tagged by docker-compose.local.yml.
# hadolint ignore=DL3006
FROM ${TF_TRAIN_IMAGE} AS standin
USER 0:0
# The packages the stand-in needs beyond the training image's: the gRPC health service, and the HTTP
# server and JSON codec of its REST API.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements,target=/tmp/requirements \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    --mount=type=bind,source=docker/pip_install.py,target=/tmp/pip_install.py \
    python3 /tmp/pip_install.py --variant cpu grpcio-health-checking cheroot orjson
COPY serving/tfserving/models.config serving/tfserving/batching_parameters_cpu.txt /etc/tfserving/
COPY docker/local/tfs-standin-entrypoint.sh /usr/local/bin/tfs-standin-entrypoint
COPY docker/local/tfs-standin-healthcheck.py /usr/local/bin/tfs-standin-healthcheck
WORKDIR /app
COPY serving/tfs_standin/ serving/tfs_standin/
# Read by the entrypoint and the healthcheck, as in the real image; the stand-in runs on the CPU,
# so it batches with the CPU file.
ENV TFS_GRPC_PORT=8500 \
    TFS_REST_PORT=8501 \
    TFS_MODEL_NAME=mnist \
    TFS_BATCHING_PARAMETERS_FILE=/etc/tfserving/batching_parameters_cpu.txt
USER 10001:10001
EXPOSE 8500 8501
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python", "/usr/local/bin/tfs-standin-healthcheck"]
ENTRYPOINT ["bash", "/usr/local/bin/tfs-standin-entrypoint"]
CMD []
