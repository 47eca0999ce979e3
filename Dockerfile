# syntax=docker/dockerfile:1
# ModelPress images. Targets:
#   api     FastAPI + the model inspector (CPU torch); also runs the migrations
#   worker  Celery worker, CUDA-capable: torch 2.13.0's default Linux wheel bundles the CUDA
#           runtime (cuDNN, cuBLAS ... as pip packages); the host's driver comes in through
#           the NVIDIA container toolkit. Without a GPU the same image runs on the CPU.
#
#   docker build --target api -t modelpress-api .
#   docker build --target worker -t modelpress-worker .
#   # a slimmer api image: pass the PyTorch CPU wheel index
#   docker build --target api --build-arg TORCH_INDEX_URL=<CPU wheel index> -t modelpress-api .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- base: OS packages, a non-root user, pip settings --------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# libgomp1: OpenMP for torch and ONNX Runtime kernels.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin modelpress
WORKDIR /srv

# --- deps: torch first (exact pin), then the lock without its torch line ---------------------
# The lock records the CPU build (torch==2.13.0+cpu); each image installs its own build first.
FROM base AS deps-cpu
ARG TORCH_INDEX_URL=""
COPY requirements.lock /tmp/requirements.lock
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
 && grep -v '^torch==' /tmp/requirements.lock > /tmp/req.txt \
 && pip install -r /tmp/req.txt

FROM base AS deps-cuda
COPY requirements.lock /tmp/requirements.lock
RUN pip install torch==2.13.0 \
 && grep -v '^torch==' /tmp/requirements.lock > /tmp/req.txt \
 && pip install -r /tmp/req.txt

# --- api ------------------------------------------------------------------------------------
FROM deps-cpu AS api
COPY pyproject.toml alembic.ini README.md ./
COPY app app
COPY workers workers
COPY migrations migrations
RUN pip install --no-deps -e . && mkdir -p /srv/var && chown -R modelpress /srv/var
USER modelpress
ENV MODELPRESS_TMP_DIR=/srv/var/tmp \
    API_WORKERS=2
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# --factory: create_app() reads MODELPRESS_* settings in each worker process.
CMD ["sh", "-c", "exec uvicorn --factory app.main:create_app --host 0.0.0.0 --port 8000 --workers ${API_WORKERS} --proxy-headers --no-access-log"]

# --- worker (CUDA-capable) ------------------------------------------------------------------
FROM deps-cuda AS worker
COPY pyproject.toml alembic.ini README.md ./
COPY app app
COPY workers workers
COPY migrations migrations
RUN pip install --no-deps -e . && mkdir -p /srv/var && chown -R modelpress /srv/var
USER modelpress
# Seen by the NVIDIA container toolkit: expose the GPUs and the compute driver libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MODELPRESS_TMP_DIR=/srv/var/tmp \
    WORKER_QUEUES=cpu,gpu \
    WORKER_CONCURRENCY=1
# prefork + concurrency 1: one job per container (scale with `--scale worker=N`); CUDA is
# only initialised inside the pool child, never in the parent that forks.
CMD ["sh", "-c", "exec celery -A workers.celery_app worker -Q ${WORKER_QUEUES} -c ${WORKER_CONCURRENCY} --pool prefork -l INFO --without-gossip --without-mingle"]
