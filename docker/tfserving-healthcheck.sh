#!/usr/bin/env bash
# Healthcheck of the TF Serving image: healthy when GET /v1/models/$TFS_MODEL_NAME on the REST port
# answers 200 and reports a version AVAILABLE (TF Serving answers 404 while no version is loaded).
# The official image has neither curl nor wget, so this speaks HTTP/1.1 over bash's /dev/tcp.
set -uo pipefail

port="${TFS_REST_PORT:?TFS_REST_PORT must be set (the REST port)}"
model="${TFS_MODEL_NAME:?TFS_MODEL_NAME must be set (the served model name)}"
host="${TFS_HEALTHCHECK_HOST:-127.0.0.1}"
timeout_s="${TFS_HEALTHCHECK_TIMEOUT_S:-4}"

if ! { exec 3<>"/dev/tcp/${host}/${port}"; } 2>/dev/null; then
  echo "unhealthy: nothing listens on ${host}:${port}" >&2
  exit 1
fi
printf 'GET /v1/models/%s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$model" "$host" "$port" >&3

# Read the whole answer (the server closes the connection); read returns non-zero at end of input.
response=""
IFS= read -r -d '' -t "$timeout_s" response <&3
exec 3<&-

status_line="${response%%$'\r'*}"
if [[ "$status_line" != "HTTP/1."[01]" 200"* ]]; then
  echo "unhealthy: GET /v1/models/${model} answered '${status_line:-nothing}'" >&2
  exit 1
fi
if [[ "$response" != *'"AVAILABLE"'* ]]; then
  echo "unhealthy: model ${model} has no version AVAILABLE yet" >&2
  exit 1
fi
echo "healthy: model ${model} has a version AVAILABLE"
