#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from proto/. `--check` fails when the committed stubs are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
python -m grpc_tools.protoc -Imonitor/protocol=proto --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" proto/featurewatch/v1/featurewatch.proto
for f in featurewatch_pb2.py featurewatch_pb2.pyi featurewatch_pb2_grpc.py; do
  src="$out/monitor/protocol/featurewatch/v1/$f"; dst="monitor/protocol/featurewatch/v1/$f"
  if [[ "${1:-}" == "--check" ]]; then
    cmp -s "$src" "$dst" || { echo "stale generated stub: $dst (run scripts/gen_proto.sh)" >&2; exit 1; }
  else
    cp "$src" "$dst"
  fi
done
rm -rf "$out"
