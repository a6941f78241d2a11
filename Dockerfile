# qzoom-service GPU image: what the Helm chart (helm/qzoom) runs on every Ray node.
#
# Base: rayproject/ray:2.60.0-py311-gpu, Ray's own CUDA 12 image (Ubuntu, CUDA runtime, Python 3.11
# under /home/ray/anaconda3, Ray 2.60.0, user `ray` = uid 1000 / gid 100). Keep its Ray version equal
# to the chart's `rayVersion`; KubeRay starts `ray` from this image on the head and the workers.
#   docker build -t qzoom-service:0.1.0 .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# PyPI's manylinux x86_64 torch wheel is the CUDA build (it pulls the nvidia-* CUDA runtime wheels).
# To pick another CUDA variant: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""

# QZOOM_SERVE_HOST: `qzoom serve` in a container binds every interface (on a laptop: loopback).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/home/ray/.cache \
    HF_HOME=/home/ray/.cache/huggingface \
    TRITON_CACHE_DIR=/home/ray/.cache/triton \
    QZOOM_SERVE_HOST=0.0.0.0

# Non-root from the first layer on: the base image's `ray` user owns its Python environment.
USER 1000:100
WORKDIR /home/ray

RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"

# Install the packages themselves (not editable): qzoom-client, which holds the one copy of the generated
# gRPC code (importable by the Serve proxies on every node), then qzoom-service, which depends on it.
# Sources are removed after the install.
COPY --chown=1000:100 pyproject.toml README.md /tmp/qzoom-src/
COPY --chown=1000:100 qzoom_service /tmp/qzoom-src/qzoom_service
COPY --chown=1000:100 clients/python/pyproject.toml clients/python/README.md /tmp/qzoom-src/clients/python/
COPY --chown=1000:100 clients/python/qzoom_client /tmp/qzoom-src/clients/python/qzoom_client
RUN pip install /tmp/qzoom-src/clients/python /tmp/qzoom-src \
    && rm -rf /tmp/qzoom-src \
    && mkdir -p "$HF_HOME" \
    && python -c "import qzoom_client._proto.qzoom.v1.qzoom_pb2_grpc, qzoom_service.serve.app"

# Ray GCS, Serve HTTP (KubeRay's readiness probe), Serve gRPC, dashboard, Ray client, metrics.
EXPOSE 6379 8000 9000 8265 10001 8080

CMD ["bash"]
