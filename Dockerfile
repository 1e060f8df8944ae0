# summarizer: gRPC news summarisation service.
#
#   docker build -t summarizer .                                   # CPU, bakes in distilbart-cnn-12-6
#   docker run --rm -p 50051:50051 summarizer
#
# Build arguments:
#   BASE_IMAGE       Python 3.11+ base image (default: the official slim image).
#   TORCH_INDEX_URL  where torch comes from: the CPU wheel index by default; a CUDA index
#                    (e.g. https://download.pytorch.org/whl/cu128) for GPUs.
#   TORCH_SPEC       the torch requirement to install from it.
#   MODEL            hub id or manifest name to bake in at /models/default; empty: mount a model
#                    directory there at run time (-v /path/to/model:/models/default:ro).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
ARG MODEL=sshleifer/distilbart-cnn-12-6

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/hf

RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin summarizer

# torch first, from the chosen index, so `pip install .` below finds it already satisfied.
RUN python -m pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /opt/summarizer
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY models ./models
COPY service ./service
RUN python -m pip install . && rm -rf /opt/summarizer/build

# Bake the model in (safetensors only), or leave /models/default to be mounted.
RUN mkdir -p /models/default \
 && if [ -n "${MODEL}" ]; then summarizer fetch "${MODEL}" --out /models/default; fi \
 && rm -rf /models/default/.cache /tmp/hf

USER 10001:10001
ENV SUMMARIZER_MODEL=/models/default \
    SUMMARIZER_HOST=0.0.0.0 \
    SUMMARIZER_PORT=50051 \
    HF_HUB_OFFLINE=1
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["summarizer", "health"]
ENTRYPOINT ["summarizer"]
CMD ["serve"]
