# One image for the operator and both engines. CPU by default; a CUDA build with --build-arg VARIANT=cuda:
#   docker build -t gearshift:cpu .
#   docker build -t gearshift:cuda --build-arg VARIANT=cuda .
# The pods run `gearshift serve|fetch|operator ...` with argument lists; there is no entrypoint script.
#
# Build arguments for machines without Docker Hub or the PyTorch index (the defaults are right with both;
# `make image` sets them to build this same file with podman, see e2e/image/build.sh):
#   BASE_IMAGE      both stages start from it; any Debian bookworm works (one made by debootstrap has no
#                   Python: python3.11 comes from Debian then).
#   TORCH_INDEX_CPU / TORCH_INDEX_CUDA  where torch comes from; empty = pip's own settings (below).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT, PIP_CONSTRAINT  pip's settings during
#                   the build only (RUN sees build arguments as environment variables; not in the image).
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

# Stage deps: Python, torch, llama.cpp and every dependency; changes only with pyproject.toml or the args.
FROM ${BASE_IMAGE} AS deps
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# The wheel index for torch: CPU-only wheels by default (small), CUDA 12.8 wheels for VARIANT=cuda.
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu128
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_CONSTRAINT
# A base without Python (plain Debian) gets Debian's python3 (3.11 on bookworm) with its headers and venv.
RUN py="" && { command -v python3 >/dev/null || py="python3 python3-dev python3-venv"; } \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential cmake git $py \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/gearshift
ENV PATH=/opt/gearshift/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --upgrade pip wheel \
 && if [ "$VARIANT" = "cuda" ]; then index="$TORCH_INDEX_CUDA"; else index="$TORCH_INDEX_CPU"; fi \
 && pip install "torch==${TORCH_VERSION}" ${index:+--index-url "$index"}
# llama.cpp is always a CPU build (the gguf engine serves CPU nodes); portable, no -march=native.
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF" pip install "llama-cpp-python>=0.3"
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to the code or README reuses this layer.
COPY pyproject.toml ./
# The build requirements too (setuptools >= 77 for the SPDX license): the build stage installs without isolation.
RUN python -c 'import tomllib; t = tomllib.load(open("pyproject.toml", "rb")); p = t["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["gguf"] + t["build-system"]["requires"]))' \
    > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Stage build: the project itself on top (a code change rebuilds from here, in seconds, not the deps).
FROM deps AS build
COPY README.md ./
COPY engine engine
COPY operator operator
# No build isolation: setuptools and wheel are in the venv already (the deps stage's pip settings do not
# reach this stage, and nothing needs fetching).
RUN pip install --no-deps --no-build-isolation ".[gguf]" && pip check
# The native CPU attention kernel, compiled here (x86-64-v3: AVX2/FMA) since the runtime image has no compiler.
# Lands in /opt/gearshift/share/gearshift/cpu-kernels, where the engine imports it without a compiler.
# PYTHONSAFEPATH: /src/operator would shadow the stdlib's `operator` module from the working directory.
RUN PYTHONSAFEPATH=1 python -m gearshift.engine.cpu_kernels
# What this stage added to the venv, alone: the runtime stage copies it as a small layer of its own.
RUN mkdir /layer && cd / && tar -c opt/gearshift/bin/gearshift opt/gearshift/share/gearshift \
      opt/gearshift/lib/python3*/site-packages/gearshift opt/gearshift/lib/python3*/site-packages/gearshift-*.dist-info \
    | tar -C /layer -x

FROM ${BASE_IMAGE}
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="gearshift" \
      org.opencontainers.image.description="InferenceService operator with the paged and gguf engines (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
# CUDA: Triton compiles a small C launcher per kernel signature (and its driver stub) with a C compiler on
# first use, against Python.h; without gcc here a GPU pod fails at warm-up. The compiled launchers go to
# TRITON_CACHE_DIR (the operator points it at the pod's /tmp volume). The CPU image needs no compiler.
RUN py="" && { command -v python3 >/dev/null || py="python3"; } \
 && cc="" && if [ "$VARIANT" = "cuda" ]; then \
      cc="gcc libc6-dev"; command -v python3 >/dev/null || cc="$cc python3-dev"; fi \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1 ca-certificates $py $cc \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 gearshift && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp gearshift
COPY --from=deps /opt/gearshift /opt/gearshift
COPY --from=build /layer/ /
# PYTHONSAFEPATH: never put the working directory on sys.path. HOME=/tmp: the root FS is read-only.
ENV PATH=/opt/gearshift/bin:$PATH PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HOME=/tmp
USER 1000:1000
WORKDIR /tmp
EXPOSE 8000
CMD ["gearshift", "--help"]
