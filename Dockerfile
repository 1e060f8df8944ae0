# summarizer: gRPC news summarisation service.
#
#   docker build -t summarizer .                       # CPU torch, bakes in distilbart-cnn-12-6
#   docker run --rm -p 50051:50051 summarizer
#
# Build arguments (docs/deployment.md, "Docker", has examples):
#   BASE_IMAGE       any image with Python 3.11+ (with venv) and useradd; default: official slim.
#   TORCH_INDEX_URL  the index torch comes from: CPU wheels by default, a CUDA index for GPUs.
#   TORCH_SPEC       the torch requirement taken from it; empty: use the base image's own torch.
#   TORCH_WHEEL      file name of a torch wheel put in wheels/ of the build context: installed
#                    instead of any index (air-gapped builds).
#   MODEL            what /models/default holds: a hub id or manifest name (fetched, safetensors
#                    only), a directory in the build context (copied), or empty (mount one at run
#                    time: -v /path/to/model:/models/default:ro).
#   ENGINE           what the runtime stage can serve (docs/container.md):
#                    ctranslate2 (default: what `--engine auto` picks for the supported models on
#                      a CPU): the model is converted here, in the build, which needs torch and
#                      transformers; the image leaves both out (about 1 GB less) and serves the
#                      converted model. A model ctranslate2 cannot take fails the build; a mounted
#                      model must be converted before (`summarizer convert DIR --in-place`).
#                    torch: the whole build environment, torch and transformers included; serves
#                      any model (--engine torch, or auto for the models ctranslate2 cannot take)
#                      and converts a mounted model at start-up.
# Build secret (optional):
#   pip_ca           an extra CA bundle (PEM) trusted by the build's downloads, e.g. a corporate
#                    TLS proxy's: --secret id=pip_ca,src=proxy-ca.pem. It is mounted only for the
#                    steps that download and never written to a layer.

ARG BASE_IMAGE=python:3.11-slim
ARG ENGINE=ctranslate2

# ---- build: a virtual environment with torch and the service -----------------------------------
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_WHEEL=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

# --system-site-packages: a base image that ships torch (a CUDA image) can lend it (TORCH_SPEC="").
RUN python3 -m venv --system-site-packages /opt/venv

# torch first, in its own layer: code changes below do not reinstall it.
# Each downloading step trusts the system CAs plus the pip_ca secret, when one was passed.
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,source=wheels,target=/wheels \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/pip_ca > /tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; \
    fi; \
    if [ -n "${TORCH_WHEEL}" ]; then pip install "/wheels/${TORCH_WHEEL}"; \
    elif [ -n "${TORCH_SPEC}" ]; then pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"; \
    fi; \
    rm -f /tmp/pip-ca.pem

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY models ./models
COPY service ./service
COPY clients ./clients
RUN --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/pip_ca > /tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; \
    fi; \
    pip install ./clients/python .; \
    rm -f /tmp/pip-ca.pem

# ---- model: /models/default, baked in or left empty for a mount --------------------------------
FROM build AS model

ARG MODEL=sshleifer/distilbart-cnn-12-6
ARG ENGINE

RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,target=/context \
    set -eu; \
    case "${ENGINE}" in ctranslate2|torch) ;; \
        *) echo "ENGINE=${ENGINE}: use ctranslate2 or torch" >&2; exit 1 ;; esac; \
    mkdir -p /models/default; \
    if [ -z "${MODEL}" ]; then \
        echo "no model baked in: mount one at /models/default"; \
    elif [ -d "/context/${MODEL}" ]; then \
        cp -R "/context/${MODEL}/." /models/default/; \
        test -f /models/default/config.json \
            || { echo "MODEL=${MODEL}: the directory has no config.json" >&2; exit 1; }; \
    else \
        if [ -s /run/secrets/pip_ca ]; then \
            cat /etc/ssl/certs/ca-certificates.crt /run/secrets/pip_ca > /tmp/pip-ca.pem; \
            export SSL_CERT_FILE=/tmp/pip-ca.pem REQUESTS_CA_BUNDLE=/tmp/pip-ca.pem; \
        fi; \
        HF_HOME=/tmp/hf summarizer fetch "${MODEL}" --out /models/default; \
        rm -rf /models/default/.cache /tmp/hf /tmp/pip-ca.pem; \
    fi; \
    # Convert now for the engine auto picks, so that a container never converts at start-up
    # (and, with ENGINE=ctranslate2, because only this stage has torch and transformers): the
    # CTranslate2 model (int8, what --compute-type auto picks on a CPU) goes into the checkpoint
    # directory itself, which torch (--engine torch) still loads as before.
    if [ -f /models/default/config.json ]; then \
        if python -m service.engines.choice /models/default; then \
            HF_HOME=/tmp/hf summarizer convert /models/default --in-place --compute-type int8 \
                --offline; \
            rm -rf /tmp/hf; \
        elif [ "${ENGINE}" = ctranslate2 ]; then \
            echo "MODEL=${MODEL}: --engine auto serves it with torch, which an ENGINE=ctranslate2" \
                 "image leaves out: build with --build-arg ENGINE=torch" >&2; \
            exit 1; \
        fi; \
    fi; \
    chmod -R a+rX /models

# ---- serve: the environment the runtime stage copies: all of build's for ENGINE=torch; for
# ENGINE=ctranslate2 the same less torch and transformers (and what only torch needs), which the
# ctranslate2 engine never imports when serving (tests/test_container_engine.py) ---------------
FROM build AS serve

ARG ENGINE

RUN set -eu; \
    if [ "${ENGINE}" = ctranslate2 ]; then \
        pip uninstall --yes torch transformers sympy mpmath networkx; \
        python -c "import service.api.server, service.engines.ct2_engine, service.workers.child"; \
    fi

# ---- runtime: the base image, the virtual environment, the model; no build tools, no secrets ---
FROM ${BASE_IMAGE}

ARG ENGINE
# /var/cache/summarizer: where a mounted, unconverted model is converted for the default engine
# (SUMMARIZER_CONVERT_CACHE_DIR in compose.yaml and the Deployment, which mount a volume there;
# the image's own directory gives a new named volume the right owner).
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin summarizer \
    && install -d -o 10001 -g 10001 /var/cache/summarizer

COPY --from=serve /opt/venv /opt/venv
COPY --from=model /models /models

LABEL org.opencontainers.image.description="summarizer, serving with ENGINE=${ENGINE}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    SUMMARIZER_MODEL=/models/default \
    SUMMARIZER_HOST=0.0.0.0 \
    SUMMARIZER_PORT=50051

USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["summarizer", "health"]
ENTRYPOINT ["summarizer"]
CMD ["serve"]
