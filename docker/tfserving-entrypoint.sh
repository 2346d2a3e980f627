#!/usr/bin/env bash
# Entrypoint of the TF Serving image (Dockerfile.tf, target server): tensorflow_model_server with the
# stack's configuration from /etc/tfserving (copied from serving/tfserving/), on the ports given by
# TFS_GRPC_PORT and TFS_REST_PORT, batching as TFS_BATCHING_PARAMETERS_FILE says (the GPU or the CPU
# file, set by the image variant). Arguments are appended after the defaults, and a later flag wins,
# so `docker compose` or `docker run` can add or override any flag (e.g. --file_system_poll_wait_seconds=30).
set -euo pipefail

exec tensorflow_model_server \
  --port="${TFS_GRPC_PORT:?TFS_GRPC_PORT must be set (the gRPC port)}" \
  --rest_api_port="${TFS_REST_PORT:?TFS_REST_PORT must be set (the REST port)}" \
  --model_config_file=/etc/tfserving/models.config \
  --enable_batching=true \
  --batching_parameters_file="${TFS_BATCHING_PARAMETERS_FILE:?TFS_BATCHING_PARAMETERS_FILE must be set (set by the image variant)}" \
  --monitoring_config_file=/etc/tfserving/monitoring.config \
  --file_system_poll_wait_seconds=5 \
  "$@"
