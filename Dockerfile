# AnomalyMatch ML backend image: `amls serve`, `amls worker` and the other `amls` commands.
#
# CPU (default):   docker build -t amls .
# NVIDIA GPU:      docker build -t amls-cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#                  (the CUDA wheels bundle the CUDA runtime, so the slim base works; run with
#                  the NVIDIA container toolkit, `--gpus all`, and AMLS_DEVICE=cuda or auto)
# Other base:      --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 works too
#                  if that image provides python3.11 and pip as `python3`.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Torch first, from the chosen wheel index, so `pip install .` finds it satisfied and does
# not pull the multi-GB default CUDA build from PyPI.
RUN python3 -m pip install --index-url "${TORCH_INDEX_URL}" torch torchvision

COPY pyproject.toml README.md ./
COPY ml_backend ./ml_backend
COPY import_tools ./import_tools
RUN python3 -m pip install .

# Label configs stay in the working directory: `amls setup-project` defaults to
# ./label_config/anomaly_binary.xml.
COPY label_config ./label_config

# Runs as root on purpose: the shared named volume is created by whichever container mounts
# it first, and Label Studio only needs to read it. Add `user:` in compose to change this.
RUN mkdir -p /amls-data

EXPOSE 9090
CMD ["amls", "serve", "--host", "0.0.0.0", "--port", "9090"]
