#!/usr/bin/env bash
# Entrypoint of the load-test image: mnist-loadtest with the given arguments, after checking that the
# reports folder (the ./reports bind mount of docker-compose.yml) is writable, so a permission
# problem stops the service at once with the fix instead of failing after the whole run.
set -euo pipefail

reports="${LOADTEST_REPORTS_DIR:-/reports}"
if [[ -d "$reports" && ! -w "$reports" ]]; then
  owner="$(stat -c '%u:%g' "$reports")"
  echo "loadtest: cannot write reports into $reports (./reports on the host, owned by $owner) as $(id -u):$(id -g)." >&2
  echo "loadtest: run as the folder's owner: export LOADTEST_USER=\"\$(id -u):\$(id -g)\" with a ./reports you created" >&2
  echo "loadtest: (mkdir -p reports before the first run; Docker creates a missing one as root)." >&2
  exit 2
fi
exec mnist-loadtest "$@"
