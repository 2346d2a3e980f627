#!/usr/bin/env bash
# Regenerates config_pb2.py (+ .pyi) from config.proto beside it. Needs grpcio-tools
# (requirements/main.txt); the generated module is committed. Usage: generate.sh [python]
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
python="${1:-${PYTHON:-python3}}"
cd "$repo_root"
"$python" -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. serving/tfs_standin/protos/config.proto
echo "generated serving/tfs_standin/protos/config_pb2.py"
