# syntax=docker/dockerfile:1.7
#
# featurewatch images.
#
#   docker build -t featurewatch:0.1.0 .                      # the sidecar (default: last stage)
#   docker build -t featurewatch:0.1.0-cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .   # sidecar, GPU encode
#   docker build -t vllm-featurewatch:0.1.0 --target vllm \
#       --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0 .    # a vLLM image with the plugin added
#
# VLLM_IMAGE defaults to the vLLM release this project tests (0.32; the plugin supports
# >=0.28.0,<0.33.0, docs/plugin.md). The plugin needs nothing but `pip install featurewatch` inside
# vLLM's Python (it never installs vLLM or torch): it registers via
# the `vllm.general_plugins` / `vllm.endpoint_plugins` entry points and reads FEATUREWATCH_ADDRESS.
# The `vllm` stage installs it against the image's own torch (pinned, never replaced). To add it
# to any other vLLM image, the same two lines work:
#     COPY --from=ghcr.io/featurewatch/featurewatch:0.1.0 /wheels /wheels
#     RUN pip freeze | grep -iE '^(torch|vllm)==' > /tmp/pins && pip install -c /tmp/pins /wheels/*.whl
# Then run vLLM with FEATUREWATCH_ADDRESS=unix:///run/featurewatch/featurewatch.sock and
# VLLM_PLUGINS=featurewatch,featurewatch_routes (see docs/deploy.md).

ARG PYTHON_VERSION=3.11
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---- build: the featurewatch wheel ----------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir "setuptools>=68" wheel
COPY pyproject.toml README.md ./
COPY monitor ./monitor
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

# ---- vllm: vLLM with the featurewatch plugin ------------------------------------------------
FROM ${VLLM_IMAGE} AS vllm
COPY --from=build /wheels /wheels
RUN pip freeze | grep -iE '^(torch|vllm)==' > /tmp/pins \
 && pip install --no-cache-dir -c /tmp/pins /wheels/*.whl \
 && rm -rf /wheels /tmp/pins
ENV FEATUREWATCH_ADDRESS=unix:///run/featurewatch/featurewatch.sock \
    VLLM_PLUGINS=featurewatch,featurewatch_routes

# ---- sidecar: `featurewatch serve` (default target) -----------------------------------------
FROM python:${PYTHON_VERSION}-slim AS sidecar
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch>=2.4"
COPY --from=build /wheels /wheels
# [tokenizer]: `tokenizer:` in the config (alert context as text) reads the model's tokenizer.json
RUN pip install --no-cache-dir "$(echo /wheels/featurewatch-*.whl)[tokenizer]" \
 && python -c "import tokenizers" \
 && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin featurewatch \
 && mkdir -p /run/featurewatch /etc/featurewatch/rules /models/featurewatch \
 && chown featurewatch:featurewatch /run/featurewatch
# The wheel stays in the image for vLLM images that add the plugin (see above).
USER 1000:1000
# 50051: gRPC ingest/admin + grpc.health.v1 (TCP); 9400: /metrics. The Unix socket lives in
# /run/featurewatch, a volume shared with the vLLM container.
EXPOSE 50051 9400
VOLUME ["/run/featurewatch"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:50051'); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2).status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["featurewatch"]
CMD ["serve", "--config", "/etc/featurewatch/featurewatch.yaml"]
