#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the baseline of bench/serve.py) and cache it; print its path.
#
# Source: the llama.cpp vendored in the llama-cpp-python sdist on PyPI, at the version installed here, so
# the baseline runs the same llama.cpp commit as our gguf engine. CPU build flags are llama.cpp's
# defaults (GGML_NATIVE, OpenMP), the same ones pip used to build llama-cpp-python. No curl, no web UI
# (nothing to fetch at build time). ~7 min on 2 cores; tests never need it.
#   bench/llama_server.sh [--force]     env: PYTHON (default .venv/bin/python), JOBS (default 2)
# LLAMA_CMAKE_ARGS (default none) adds cmake flags, e.g. an AVX2-only build into its own cache (README, AVX2):
#   GEARSHIFT_CACHE=/tmp/avx2 LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
#     -DGGML_F16C=ON -DGGML_BMI2=ON" bench/llama_server.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${GEARSHIFT_CACHE:-$HOME/.cache/gearshift}/llama-server"
BIN="$CACHE/bin/llama-server"
if [ -x "$BIN" ] && [ "${1:-}" != "--force" ]; then
  echo "$BIN"
  exit 0
fi
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
VERSION="$(PYTHONSAFEPATH=1 "$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "llama-server: fetching the llama-cpp-python ${VERSION:-latest} sdist" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python${VERSION:+==$VERSION}" >&2
tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
echo "llama-server: building from $SRC (-j${JOBS:-2})" >&2
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF ${LLAMA_CMAKE_ARGS:-} >"$WORK/cmake.log" 2>&1 \
  || { tail -30 "$WORK/cmake.log" >&2; exit 1; }
cmake --build "$WORK/build" --target llama-server -j "${JOBS:-2}" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$CACHE/bin"
cp "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "${VERSION:-unknown}" >"$CACHE/VERSION"
echo "$BIN"
