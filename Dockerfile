# One image for the operator and both engines. CPU by default; a CUDA build with --build-arg VARIANT=cuda:
#   docker build -t gearshift:cpu .
#   docker build -t gearshift:cuda --build-arg VARIANT=cuda .
# The pods run `gearshift serve|fetch|operator ...` with argument lists; there is no entrypoint script.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# The wheel index for torch: CPU-only wheels by default (small), CUDA 12.8 wheels for VARIANT=cuda.
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu128
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/gearshift
ENV PATH=/opt/gearshift/bin:$PATH PIP_NO_CACHE_DIR=1
RUN pip install --upgrade pip wheel \
 && if [ "$VARIANT" = "cuda" ]; then index="$TORCH_INDEX_CUDA"; else index="$TORCH_INDEX_CPU"; fi \
 && pip install "torch==${TORCH_VERSION}" --index-url "$index"
# llama.cpp is always a CPU build (the gguf engine serves CPU nodes); portable, no -march=native.
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF" pip install "llama-cpp-python>=0.3"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY operator operator
COPY e2e e2e
RUN pip install ".[gguf]" && pip check
# The native CPU attention kernel, compiled here (x86-64-v3: AVX2/FMA) since the runtime image has no compiler.
# Lands in /opt/gearshift/share/gearshift/cpu-kernels, where the engine imports it without a compiler.
RUN python -m gearshift.engine.cpu_kernels

FROM python:${PYTHON_VERSION}-slim
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="gearshift" \
      org.opencontainers.image.description="InferenceService operator with the paged and gguf engines (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 gearshift && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp gearshift
COPY --from=build /opt/gearshift /opt/gearshift
# PYTHONSAFEPATH: never put the working directory on sys.path. HOME=/tmp: the root FS is read-only.
ENV PATH=/opt/gearshift/bin:$PATH PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HOME=/tmp
USER 1000:1000
WORKDIR /tmp
EXPOSE 8000
CMD ["gearshift", "--help"]
