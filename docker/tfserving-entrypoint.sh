#!/usr/bin/env bash
# Entrypoint of the TF Serving image (Dockerfile.tf, target server): tensorflow_model_server with the
# stack's configuration from /etc/tfserving (copied from serving/tfserving/), on the ports given by
# TFS_GRPC_PORT and TFS_REST_PORT, batching as TFS_BATCHING_PARAMETERS_FILE says (the GPU or the CPU
# file, set by the image variant). Arguments are appended after the defaults, and a later flag wins,
# so `docker compose` or `docker run` can add or override any flag (e.g. --file_system_poll_wait_seconds=30).
# TFS_GRPC_CHANNEL_ARGUMENTS replaces the gRPC connection limits below (docs/reliability.md lists them).
set -euo pipefail

exec tensorflow_model_server \
  --port="${TFS_GRPC_PORT:?TFS_GRPC_PORT must be set (the gRPC port)}" \
  --rest_api_port="${TFS_REST_PORT:?TFS_REST_PORT must be set (the REST port)}" \
  --model_config_file=/etc/tfserving/models.config \
  --enable_batching=true \
  --batching_parameters_file="${TFS_BATCHING_PARAMETERS_FILE:?TFS_BATCHING_PARAMETERS_FILE must be set (set by the image variant)}" \
  --monitoring_config_file=/etc/tfserving/monitoring.config \
  --file_system_poll_wait_seconds=5 \
  --grpc_channel_arguments="${TFS_GRPC_CHANNEL_ARGUMENTS:-grpc.max_concurrent_streams=100,grpc.keepalive_time_ms=60000,grpc.keepalive_timeout_ms=20000,grpc.max_connection_idle_ms=300000,grpc.max_connection_age_ms=1800000,grpc.max_connection_age_grace_ms=30000}" \
  "$@"
