# M2 service image with the bundled demo checkpoint (checkpoints/m2-demo).
#
#   docker build -t m2 .                    # CPU image (python:3.11-slim + torch)
#   docker run -p 8000:8000 m2              # then open http://127.0.0.1:8000
#
# CUDA: build FROM a PyTorch CUDA runtime image, which already has torch, and skip the
# torch install with an empty TORCH_SPEC; run with the GPUs passed through:
#   docker build --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                --build-arg TORCH_SPEC= -t m2:cuda .
#   docker run --gpus all -p 8000:8000 m2:cuda
#
# On x86_64 the default package index serves torch as a CUDA build (several GB). For a small
# CPU-only image, pass the PyTorch CPU wheel index: --build-arg TORCH_INDEX_URL=<that index>.
# Settings come from M2_* variables (docker run -e M2_API_KEY=... m2), as with `m2 serve`.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, on its own layer: `pip install .` then finds it and pulls no other build.
# With a CUDA base image torch is already there: set TORCH_SPEC= (empty) to skip this.
# TORCH_SPEC carries the version pin, which hadolint cannot see through the variable:
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_SPEC" ]; then \
        pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; \
    fi

WORKDIR /app
COPY . .
# Non-editable install: the code runs from site-packages; /app keeps the checkpoint.
# a+rX: checkpoints are written atomically through mkdtemp/mkstemp (0700 / 0600), and a
# build from a working tree keeps those modes; the non-root user must read them.
RUN groupadd --gid 10001 m2 \
    && useradd --create-home --no-log-init --uid 10001 --gid m2 m2 \
    && chmod -R a+rX /app \
    && pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

USER 10001:10001
ENV M2_CHECKPOINT=/app/checkpoints/m2-demo
EXPOSE 8000
# Python, not curl: slim images have no curl. /healthz needs no API key.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('M2_PORT', '8000'), timeout=3)"]
CMD ["m2", "serve", "--host", "0.0.0.0"]
