#!/usr/bin/env bash
# The CUDA image's runtime stage must let Triton build its launchers: Triton compiles a small C stub per
# kernel signature (and its CUDA driver stub) with the C compiler it finds (CC, else clang or gcc on PATH)
# on first use, into TRITON_CACHE_DIR. The runtime stage used to have no compiler, so a GPU pod failed at
# warm-up. This check starts the paged engine on CUDA twice, each time with an empty Triton cache:
#   before: PATH without any C compiler (the old runtime stage's package set)  -> must FAIL to serve;
#   after:  PATH with gcc, as the fixed runtime stage installs it (gcc, libc6-dev) -> must SERVE a chat.
# Run on a GPU machine from the repo root (bench/gpu_check.sh runs it as its step `cuda_launcher`), with
# PYTHONPATH making `gearshift` importable. Usage: bench/cuda_launcher_check.sh MODEL [PORT]
set -u
MODEL=${1:?model path}; PORT=${2:-18123}
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=$(command -v python3)
NOCC=$(mktemp -d)/bin; mkdir -p "$NOCC"
ln -s "$PY" "$NOCC/python3"
for t in nvidia-smi ldconfig; do command -v $t >/dev/null && ln -s "$(command -v $t)" "$NOCC/$t"; done
# Triton locates libcuda with `ldconfig -p` (found via /sbin); /sbin holds no compiler.

serve() { # name PATH -> 0 when a chat completion is answered within the limit
  local name=$1 path=$2 cache; cache=$(mktemp -d)
  env -u CC -u CXX PATH="$path" TRITON_CACHE_DIR="$cache" "$PY" -m gearshift.engine.cli serve \
    --model "$MODEL" --engine paged --device cuda --served-model-name m --host 127.0.0.1 --port "$PORT" \
    >"$OUT/cuda_launcher_$name.log" 2>&1 &
  local pid=$! ok=1
  for _ in $(seq 1 240); do
    kill -0 $pid 2>/dev/null || break
    if curl -sf -m 60 "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
         -d '{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}' >"$OUT/cuda_launcher_$name.json"; then
      ok=0; break; fi
    sleep 1
  done
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "$name: $([[ $ok == 0 ]] && echo served || echo 'did not serve'); Triton cache entries: $(ls "$cache" | wc -l)"
  grep -m3 -iE 'compiler|cc1|Python.h|RuntimeError' "$OUT/cuda_launcher_$name.log" | sed 's/^/  /'
  return $ok
}

serve before "$NOCC:/sbin:/usr/sbin"; before=$?
serve after "$NOCC:/sbin:/usr/sbin:/usr/bin:/bin"; after=$?
if [[ $before != 0 && $after == 0 ]]; then echo "CUDA launcher check: OK (fails without a compiler, serves with gcc)"; exit 0; fi
echo "CUDA launcher check: FAILED (before: rc $before, expected non-zero; after: rc $after, expected 0)"; exit 1
