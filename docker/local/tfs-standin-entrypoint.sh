#!/usr/bin/env bash
# Entrypoint of the TF Serving stand-in image (docker/local/tfs-standin.Dockerfile): the flags of the
# real image's entrypoint (docker/tfserving-entrypoint.sh), given to python -m serving.tfs_standin:
# gRPC on TFS_GRPC_PORT and TF Serving's REST API on TFS_REST_PORT, as the real image; all but the one
# the stand-in refuses, --monitoring_config_file (it serves no Prometheus metrics).
# tests/test_compose_local_static.py checks that the rest agree.
# Arguments are appended after the defaults, and a later flag wins, as with the real image.
set -euo pipefail

exec python -m serving.tfs_standin \
  --port="${TFS_GRPC_PORT:?TFS_GRPC_PORT must be set (the gRPC port)}" \
  --rest_api_port="${TFS_REST_PORT:?TFS_REST_PORT must be set (the REST port)}" \
  --model_config_file=/etc/tfserving/models.config \
  --enable_batching=true \
  --batching_parameters_file="${TFS_BATCHING_PARAMETERS_FILE:?TFS_BATCHING_PARAMETERS_FILE must be set (the batching file)}" \
  --file_system_poll_wait_seconds=5 \
  --grpc_channel_arguments="${TFS_GRPC_CHANNEL_ARGUMENTS:-grpc.max_concurrent_streams=100,grpc.keepalive_time_ms=60000,grpc.keepalive_timeout_ms=20000,grpc.max_connection_idle_ms=300000,grpc.max_connection_age_ms=1800000,grpc.max_connection_age_grace_ms=30000}" \
  "$@"
