#!/usr/bin/env bash
# Everything the paged engine's GPU path must show, in one run on a lent GPU machine (one call of the
# device tool; its image brings torch, triton and transformers but can fetch nothing):
#   1. the `gpu` tests (Triton kernels compiled, CUDA-graph decode, GPU engine == CPU engine);
#   2. bench/kernels.py: Triton attention against the torch path, per layer-step;
#   3. bench/offline.py on CUDA: paged engine vs HF transformers (naive, static batches), graphs vs eager,
#      on SmolLM2's first 10 blocks (real weights) and on random-weight Llama-3.2-1B / Llama-3-8B shapes.
#
# Prepare here (the transfer is capped at 64 MiB; both folders are git-ignored and carried):
#   .venv/bin/python bench/gguf_trim.py "$(.venv/bin/python -m gearshift.engine.bundled)" .dev/smollm2-10l.gguf --layers 10
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
#   # the HTTP server's dependencies, for serve_8b (the image has torch/triton/transformers only; ~4 MiB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl fastapi starlette uvicorn h11 click pydantic pydantic-core annotated-types typing-inspection \
#     typing_extensions anyio sniffio idna prometheus-client httpx httpcore certifi
# Run there:  bash bench/gpu_check.sh   (carry .dev and .whl; logs land in $OUT, default ./out)
# BUDGET (seconds, default 420) bounds the whole run: a step that would not fit is skipped, not cut.
# STEPS (default: all) names the steps to run, e.g. STEPS="tests offline_8b".
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-420}
END=$(( $(date +%s) + BUDGET ))
MODEL=.dev/smollm2-10l.gguf
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

# The project as an importable package without a build: gearshift.<name> -> the repo's folders.
mkdir -p /tmp/gs/gearshift/e2e
ln -sfn "$PWD/engine" /tmp/gs/gearshift/engine
ln -sfn "$PWD/operator" /tmp/gs/gearshift/operator
ln -sfn "$PWD/e2e/cluster" /tmp/gs/gearshift/e2e/cluster
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/gs:/tmp/site

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
# step NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log, unless fewer than LIMIT_S remain.
step() {
  local name=$1 limit=$2 left
  shift 2
  [[ " ${STEPS:-tests kernels offline_smollm2 offline_1b offline_8b async_8b serve_8b cuda_launcher moe} " == *" $name "* ]] || return 0
  left=$(( END - $(date +%s) ))
  if (( left < limit )); then
    echo "== $name: skipped ($left s left of the budget, needs $limit)" | tee -a "$SUMMARY"
    return
  fi
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - t0 )) s" | tee -a "$SUMMARY"
  # Tables, results and failures only; the whole log stays in $OUT.
  grep -E '^\||^paged |passed|failed|error|Error|FAILED|machine:|device:|model:|out tok/s|resident|after load' "$OUT/$name.log" \
    | grep -v -E '^\s*$' | tail -n 60 >>"$SUMMARY"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log" >>"$SUMMARY"

# Among the tests: routing a long prefill makes no CUDA sync (test_prefill_route.py::test_plan_route_makes_no_cuda_sync,
# set_sync_debug_mode "error"), async scheduling's steady-state steps make none (test_async_scheduling.py), nor does
# sampling a drawn, penalized, biased batch on the device (test_sampler_device.py; its noise equals the CPU's).
step tests 260 env GEARSHIFT_TEST_GGUF=$MODEL python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_kernels.py tests/test_prefill_route.py tests/test_model_fidelity.py tests/test_gpu_engine.py tests/test_async_scheduling.py \
  tests/test_sampler_device.py
step kernels 150 python3 bench/kernels.py --dtype bfloat16 --iters 30
step offline_smollm2 150 python3 bench/offline.py --device cuda --model $MODEL --dtype bfloat16,float32 \
  --naive-requests 4 --compare-eager
step offline_1b 100 bash -c "python3 bench/random_model.py /tmp/l1b --shape llama-3.2-1b --tokenizer-from $MODEL &&
  python3 bench/offline.py --device cuda --model /tmp/l1b --dtype bfloat16 --naive-requests 4 --compare-eager \
  --kv-cache-memory 8Gi"
step offline_8b 160 bash -c "python3 bench/random_model.py /tmp/l8b --shape llama-3-8b --tokenizer-from $MODEL &&
  python3 bench/offline.py --device cuda --model /tmp/l8b --dtype bfloat16 --naive-requests 2 --compare-eager \
  --kv-cache-memory 16Gi"
# Async scheduling (issue 15 item 2: step N+1 launched while step N runs): the 8B shape, bf16, async on (the
# CUDA default) against off in one process, same workload; prints "async scheduling on/off: R x".
#   STEPS=async_8b bash bench/gpu_check.sh
step async_8b 200 bash -c "{ [ -f /tmp/l8b/config.json ] || python3 bench/random_model.py /tmp/l8b --shape llama-3-8b \
  --tokenizer-from $MODEL; } && python3 bench/offline.py --device cuda --model /tmp/l8b --dtype bfloat16 --skip-hf \
  --compare-async --kv-cache-memory 16Gi"
# GPU serving (issue 15): bench/serve.py's closed loop against `gearshift serve` on CUDA (the HTTP path users hit),
# Llama-3-8B shape, bf16 random weights, 512-token prompts, 128 output tokens, concurrency 1/16/64/128. Targets:
# >= 8,000 output tok/s at 64 streams, ITL p50 <= 6 ms at 1. One device call for it and the offline table:
#   STEPS="offline_8b serve_8b" BUDGET=560 bash bench/gpu_check.sh
step serve_8b 330 bash -c "{ [ -f /tmp/l8b/config.json ] || python3 bench/random_model.py /tmp/l8b --shape llama-3-8b \
  --tokenizer-from $MODEL; } && python3 bench/serve.py --targets paged --model /tmp/l8b --concurrency 1,16,64,128 \
  --prompt-tokens 512 --max-tokens 128 --rounds 2 --level-timeout 90 --threads 8 \
  --paged-args '--device cuda --dtype bfloat16 --kv-cache-memory 40Gi --max-num-batched-tokens 8192'"
# Sampling on the device (engine/sampler.py) against the old host sampler (which copied [B, V] to the host), Llama-3's
# vocabulary, per sample() call; opt-in: STEPS=sampler bash bench/gpu_check.sh
# (prepare the baseline here: git show b20a687:engine/sampler.py >.dev/sampler_baseline.py)
step sampler 90 python3 bench/sampler_ab.py --device cuda --vocab 128256 --batches 1,16,64 --seconds 0.3 \
  --baseline-file .dev/sampler_baseline.py
# The CUDA image's runtime stage (Dockerfile): Triton's launcher needs a C compiler; fails without, serves with.
step cuda_launcher 150 bash bench/cuda_launcher_check.sh $MODEL
# MoE vs dense at equal active parameters (Qwen3-30B-A3B shape, 2 layers, bf16): expert GEMMs (Triton grouped
# GEMM) and offline out tok/s, with the MoE/Triton tests compiled (not interpreted) first.
step moe 240 bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_moe.py tests/test_sliding_window.py -k 'not native' &&
  python3 bench/moe.py --device cuda --shape qwen3-30b-a3b --layers 2 --tokenizer-from $MODEL"
echo "== total $(( $(date +%s) - END + BUDGET )) s" | tee -a "$SUMMARY"
cat "$SUMMARY"
