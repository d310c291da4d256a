"""The native CPU kernels: loading (a build is reused only for the exact source, flags, torch and Python;
GEARSHIFT_CPU_KERNELS=0 turns the path off), the fused elementwise ops against their torch forms, and the
bf16 variants (elementwise ops and paged decode over a bf16 cache) against fp32/fp64 references computed
from the same bf16 inputs. (The fp32 decode-attention kernel's numbers: tests/test_attention.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gearshift.engine import cpu_kernels
from gearshift.engine.attention import build_plan, paged_attention_torch
from gearshift.engine.model.rope import apply_rope
from paged_steps import scattered_decodes

# A bf16 result is the fp32 result rounded once (2^-9 relative) or, for rms_norm's normalize-then-scale,
# twice, as the torch path and HF round it: 2^-7 relative leaves room for fp32 summation order only.
BF16_RTOL = 2**-7


def test_build_is_reused_only_with_a_matching_fingerprint(tmp_path: Path) -> None:
    module = cpu_kernels.kernels()
    assert module is not None, "the native CPU kernels failed to build (see the log)"
    built = Path(module.__file__)
    name = cpu_kernels.module_name()
    shutil.copy(built, tmp_path / f"{name}.so")
    assert cpu_kernels._import_built(tmp_path) is None  # no fingerprint: never trusted
    (tmp_path / f"{name}.fingerprint").write_text("0123456789abcdef")
    assert cpu_kernels._import_built(tmp_path) is None  # another source or torch: rebuild
    (tmp_path / f"{name}.fingerprint").write_text(cpu_kernels._fingerprint())
    again = cpu_kernels._import_built(tmp_path)
    assert again is not None and hasattr(again, "paged_decode")


def test_switch_off_and_default_dir() -> None:
    code = ("from gearshift.engine import cpu_kernels as c, LLM; print(c.kernels() is None, c.default_dir())")
    env = {**os.environ, "GEARSHIFT_CPU_KERNELS": "0", "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    off, directory = out.stdout.split()
    assert off == "True"
    assert Path(directory) == Path(sys.prefix) / "share" / "gearshift" / "cpu-kernels"


@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 rows of 576: above the one-thread threshold
def test_fused_ops_match_torch(rows: int) -> None:
    native = cpu_kernels.kernels()
    assert native is not None
    gen = torch.Generator().manual_seed(rows)
    d, f, heads, hd = 576, 1536, 12, 64
    w = torch.randn(d, generator=gen)
    x = torch.randn(rows, d, generator=gen)
    delta = torch.randn(rows, d, generator=gen)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5), F.rms_norm(x, (d,), w, 1e-5))
    expect_x = x + delta
    expect = F.rms_norm(expect_x, (d,), w, 1e-5)
    got = native.add_rms_norm_(x, delta, w, 1e-5)
    torch.testing.assert_close(x, expect_x)  # the residual stream was updated in place
    torch.testing.assert_close(got, expect)
    gate_up = torch.randn(rows, 2 * f, generator=gen) * 4
    torch.testing.assert_close(native.silu_mul(gate_up), F.silu(gate_up[:, :f]) * gate_up[:, f:])
    # RoPE in place on a strided view: Q and K heads inside a fused QKV projection's output.
    qkv = torch.randn(rows, (heads + 3) * hd, generator=gen)
    qk = qkv[:, : heads * hd].view(rows, heads, hd)
    angles = torch.rand(rows, hd // 2, generator=gen) * 6.3
    cos, sin = angles.cos(), angles.sin()
    expect_qk = apply_rope(qk.clone(), cos[:, None], sin[:, None])
    untouched = qkv[:, heads * hd :].clone()
    native.rope_(qk, cos, sin)
    torch.testing.assert_close(qk, expect_qk)
    assert torch.equal(qkv[:, heads * hd :], untouched)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_bf16_fused_ops_match_fp32_torch_on_the_same_inputs(rows: int) -> None:
    """bf16 in, bf16 out, fp32 inside: each result within bf16 rounding of torch's fp32 op on the same
    (bf16-valued) inputs; the residual stream is updated in place and holds bf16(x + delta) exactly."""
    native = cpu_kernels.kernels()
    assert native is not None
    gen = torch.Generator().manual_seed(rows)
    d, f, heads, hd = 576, 1536, 12, 64

    def bf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=BF16_RTOL, atol=1e-6)

    w, x, delta = bf(d), bf(rows, d), bf(rows, d)
    close(native.rms_norm(x, w, 1e-5), F.rms_norm(x.float(), (d,), w.float(), 1e-5))
    summed = (x.float() + delta.float()).bfloat16()  # what x.add_(delta) leaves in a bf16 tensor
    got = native.add_rms_norm_(x, delta, w, 1e-5)
    assert torch.equal(x, summed)
    close(got, F.rms_norm(summed.float(), (d,), w.float(), 1e-5))
    gate_up = bf(rows, 2 * f, scale=4)
    g32, u32 = gate_up.float().split(f, dim=-1)
    close(native.silu_mul(gate_up), F.silu(g32) * u32)
    # RoPE in place on the Q/K heads inside a fused QKV output; bf16 cos/sin, as the model's tables are.
    qkv = bf(rows, (heads + 3) * hd)
    qk = qkv[:, : heads * hd].view(rows, heads, hd)
    angles = torch.rand(rows, hd // 2, generator=gen) * 6.3
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    want = apply_rope(qk.float(), cos.float()[:, None], sin.float()[:, None])
    untouched = qkv[:, heads * hd :].clone()
    native.rope_(qk, cos, sin)
    close(qk, want)
    assert torch.equal(qkv[:, heads * hd :], untouched)


def test_fused_ops_refuse_other_and_mixed_dtypes() -> None:
    native = cpu_kernels.kernels()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.rms_norm(torch.ones(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.float16), 1e-5)
    with pytest.raises(RuntimeError, match="dtype of x"):
        native.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-5)
    q = torch.ones(1, 2, 8, dtype=torch.bfloat16)
    cache = torch.ones(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="one dtype"):
        native.paged_decode(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                            torch.zeros(1, dtype=torch.long), torch.empty_like(q), 1.0, 0)


def _decode_step(ctx: list[int], hq: int, hkv: int, d: int, bs: int, gen: torch.Generator,
                 dtype: torch.dtype = torch.bfloat16):
    """Decodes of the given context lengths over scattered cache blocks, each decode row followed by a
    2-token prefill chunk (decode rows 0, 3, 6, ...: not contiguous). Returns q, k, v, caches and meta."""
    meta, tables, num_blocks = scattered_decodes(ctx, bs, gen)
    caches = [torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype) for _ in range(2)]
    t = int(meta.query_start_loc[-1])
    q, k, v = (torch.randn(t, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v, caches, meta, tables


def _reference_decode(q, kc, vc, table: list[int], c: int, scale: float, window: int) -> torch.Tensor:
    """One decode query [Hq, D] over its context's c positions (the last `window` when window > 0), fp64."""
    bs, hkv = kc.shape[1], kc.shape[2]
    g = q.shape[0] // hkv
    blocks = torch.tensor(table[: -(-c // bs)])
    k = kc[blocks].reshape(-1, hkv, kc.shape[3])[:c].double().repeat_interleave(g, 1)  # [c, Hq, D]
    v = vc[blocks].reshape(-1, hkv, vc.shape[3])[:c].double().repeat_interleave(g, 1)
    lo = max(0, c - window) if window else 0
    s = torch.einsum("hd,khd->hk", q.double(), k[lo:]) * scale
    return torch.einsum("hk,khd->hd", s.softmax(-1), v[lo:])


# (Hq, Hkv, head_dim): GQA groups 3, 4, 1, 8 (two batches of 4 query heads), 6 (4 + 2) and 2; head_dims with
# a vector kernel (64, 128, 96, 256; 80: 5 vectors of 16 in fp32, the 8-wide path in bf16) and without one
# (72, 40: the plain loop).
DECODE_SHAPES = [(9, 3, 64), (8, 2, 128), (4, 4, 80), (8, 1, 96), (12, 2, 256), (6, 3, 72), (2, 1, 40)]


def _check_native_decode(dtype: torch.dtype, hq: int, hkv: int, d: int, window: int, seqs: int,
                         bs: int = 16, kv_dtype: torch.dtype | None = None) -> None:
    """The native decode through the engine's plan (scattered blocks, partial last blocks, decode rows
    between prefill chunks, sliding windows with the blocks outside them NaN-poisoned, so never read):
    each decode row within rounding of fp64 attention over the same K/V. seqs 2: one KV head a task;
    16: all of a sequence's heads a task. kv_dtype: the caches' dtype when not q's (bf16 under fp32 q, as
    --quantization int8 runs; this step's K/V are rounded into it as written, the reference reads them back)."""
    gen = torch.Generator().manual_seed(hq * d + window + seqs + bs)
    scale = d**-0.5
    ctx = ([1, 2, 15, 16, 17, 300] + torch.randint(1, 300, (10,), generator=gen).tolist())[-seqs:]
    q, k, v, (kc, vc), meta, tables = _decode_step(ctx, hq, hkv, d, bs, gen, dtype)
    if kv_dtype is not None:
        kc, vc = kc.to(kv_dtype), vc.to(kv_dtype)
    if window:
        for t, c in zip(tables, ctx, strict=True):
            for b in range(max(0, c - window) // bs):  # wholly before the window
                kc[t[b]], vc[t[b]] = float("nan"), float("nan")
    plan = build_plan(meta, bs, q.device, native=True, window=window or None)
    assert plan.native is not None and not plan.decodes
    out = paged_attention_torch(q, k, v, kc, vc, meta, scale, plan, window or None)
    assert out.dtype == dtype
    rtol, atol = (BF16_RTOL, 1e-3) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    for i, (t, c) in enumerate(zip(tables, ctx, strict=True)):
        want = _reference_decode(q[3 * i], kc, vc, t, c, scale, window)
        got = out[3 * i].double()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"{dtype} {hq}/{hkv}x{d} window {window} "
                                   f"decode {i} (context {c})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "d"), DECODE_SHAPES)
@pytest.mark.parametrize("window", [0, 5, 37])
@pytest.mark.parametrize("seqs", [2, 16])
def test_paged_decode_matches_fp64_reference(dtype, hq: int, hkv: int, d: int, window: int, seqs: int) -> None:
    assert cpu_kernels.kernels() is not None
    _check_native_decode(dtype, hq, hkv, d, window, seqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [1, 8, 32, 48])  # a block shorter or longer than one 16-key score tile
@pytest.mark.parametrize(("hq", "hkv", "d"), DECODE_SHAPES[:3])
def test_paged_decode_other_block_sizes(dtype, bs: int, hq: int, hkv: int, d: int) -> None:
    assert cpu_kernels.kernels() is not None
    for window, seqs in ((0, 16), (37, 16), (5, 2)):
        _check_native_decode(dtype, hq, hkv, d, window, seqs, bs)


@pytest.mark.parametrize(("hq", "hkv", "d"), DECODE_SHAPES)
@pytest.mark.parametrize("window", [0, 5, 37])
@pytest.mark.parametrize("seqs", [2, 16])
def test_paged_decode_fp32_q_over_bf16_cache_matches_fp64_reference(hq: int, hkv: int, d: int, window: int,
                                                                   seqs: int) -> None:
    """fp32 q and out over bf16 caches (the 16-wide path loads q in the bf16 lanes' shuffled order and puts
    the output back in place): fp32 accuracy against fp64 over the cache's bf16 values."""
    assert cpu_kernels.kernels() is not None
    _check_native_decode(torch.float32, hq, hkv, d, window, seqs, kv_dtype=torch.bfloat16)
    if window == 0 and seqs == 16:
        for bs in (1, 8, 48):
            _check_native_decode(torch.float32, hq, hkv, d, 37, seqs, bs, kv_dtype=torch.bfloat16)


def test_paged_decode_refuses_other_dtype_pairs() -> None:
    """Over bf16 caches, out must be q's fp32 (a clear error, not wrong numbers); bf16 q over fp32 caches
    is refused too (test_refuses_unsupported_dtypes) and never planned."""
    native = cpu_kernels.kernels()
    assert native is not None
    cache = torch.zeros(1, 16, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="share one dtype"):
        native.paged_decode(torch.zeros(1, 1, 64), cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                            torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.long),
                            torch.zeros(1, 1, 64, dtype=torch.bfloat16), 1.0, 0)
    assert cpu_kernels.handles_decode(torch.float32, torch.bfloat16)
    assert not cpu_kernels.handles_decode(torch.bfloat16, torch.float32)


def test_paged_decode_8_wide_path_matches_fp64_reference() -> None:
    """The x86-64-v3 kernels (8 lanes), which an AVX-512 CPU skips unless GEARSHIFT_CPU_AVX512=0: the same
    checks in a process started with it (the choice is made once a process)."""
    assert cpu_kernels.kernels() is not None
    code = ("import torch, test_cpu_kernels as t\n"
            "for dtype, kv in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)):\n"
            "    for shape in t.DECODE_SHAPES:\n"
            "        for window, seqs, bs in ((0, 16, 16), (37, 2, 16), (5, 16, 16), (37, 16, 8), (0, 2, 32)):\n"
            "            t._check_native_decode(dtype, *shape, window, seqs, bs, kv)\n"
            "print('ok')\n")
    env = {**os.environ, "GEARSHIFT_CPU_AVX512": "0", "PYTHONSAFEPATH": "1",
           "PYTHONPATH": os.pathsep.join(x for x in [str(Path(__file__).parent), os.environ.get("PYTHONPATH")] if x)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bf16_native_decode_matches_torch_bf16_path() -> None:
    """SmolLM2's shape: the native bf16 decode and the gathered bf16 SDPA path it replaces agree to within
    bf16 rounding (both accumulate in fp32 and round the output once)."""
    assert cpu_kernels.kernels() is not None
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randint(1, 700, (24,), generator=gen).tolist()
    q, k, v, caches, meta, _ = _decode_step(ctx, 9, 3, 64, 16, gen)
    outs = []
    for native in (False, True):
        kc, vc = (c.clone() for c in caches)
        outs.append(paged_attention_torch(q, k, v, kc, vc, meta, 0.125, build_plan(meta, 16, q.device, native)))
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2 * BF16_RTOL, atol=2e-3)


def _model_logits(gguf: Path, dtype: str, native: bool) -> list[torch.Tensor]:
    """Logits [2, V] of three steps (a chunked prefill beside a decode, then decodes), native ops on or off."""
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    prompt = list(range(300, 340))
    steps = [
        [ScheduledSeq(0, prompt[:25], 0, [3, 1, 7], False), ScheduledSeq(1, prompt[:9], 0, [5], True)],
        [ScheduledSeq(0, prompt[25:], 25, [3, 1, 7], True), ScheduledSeq(1, [11], 9, [5], True)],
        [ScheduledSeq(0, [12], 40, [3, 1, 7], True), ScheduledSeq(1, [13], 10, [5], True)],
    ]
    cpu_kernels.set_enabled(native)
    try:
        runner = ModelRunner(EngineConfig(model=str(gguf), device="cpu", dtype=dtype, kv_cache_memory="16Mi"))
        return [runner.execute(SchedulerOutput(seqs=s)).float() for s in steps]
    finally:
        cpu_kernels.set_enabled(True)


def test_model_with_and_without_native_kernels_agree(smollm2_gguf) -> None:
    """The same steps through the native ops and through the torch ops (the path GPUs take, with the same
    in-place residual stream): fp32 logits agree after a chunked prefill and decodes."""
    assert cpu_kernels.kernels() is not None
    for a, b in zip(_model_logits(smollm2_gguf, "float32", True), _model_logits(smollm2_gguf, "float32", False),
                    strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-3


def _many_decodes(gguf: Path, dtype: str, native: bool, seqs: int = 16, decodes: int = 4) -> torch.Tensor:
    """Logits [seqs * (1 + decodes), V]: `seqs` different 24-token prompts prefilled in one step, then
    `decodes` decode steps of all of them (teacher-forced tokens), native ops on or off."""
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(300, 20000, (seqs, 24 + decodes), generator=gen).tolist()
    blocks = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(seqs)]  # 48 slots a sequence
    cpu_kernels.set_enabled(native)
    try:
        runner = ModelRunner(EngineConfig(model=str(gguf), device="cpu", dtype=dtype, kv_cache_memory="128Mi",
                                          max_num_seqs=seqs))
        assert runner.block_size == 16
        out = [runner.execute(SchedulerOutput(seqs=[ScheduledSeq(i, t[:24], 0, b, True)
                                                    for i, (t, b) in enumerate(zip(tokens, blocks, strict=True))]))]
        for j in range(decodes):
            out.append(runner.execute(SchedulerOutput(seqs=[ScheduledSeq(i, [t[24 + j]], 24 + j, b, True)
                                                            for i, (t, b) in enumerate(zip(tokens, blocks, strict=True))])))
        return torch.cat(out).float()
    finally:
        cpu_kernels.set_enabled(True)


def test_bf16_model_native_is_as_close_to_fp32_as_the_torch_path(smollm2_gguf) -> None:
    """bf16 through the native ops (one rounding per op) and through the torch ops (the path they replace)
    land apart by a few bf16 steps of the logits, and which of the two one logit's error favours is
    rounding luck; so each is held to the fp32 model by its RMS error over 80 rows of logits (16
    sequences: a prefill and 4 decodes): the native path's is at most 1.25x the torch path's, and it picks
    fp32's top token wherever fp32's top two are not a near-tie (closer than twice the RMS error)."""
    assert cpu_kernels.kernels() is not None
    ref = _many_decodes(smollm2_gguf, "float32", False)
    native = _many_decodes(smollm2_gguf, "bfloat16", True)
    torch_path = _many_decodes(smollm2_gguf, "bfloat16", False)
    rms_n, rms_t = ((native - ref).pow(2).mean().sqrt().item(), (torch_path - ref).pow(2).mean().sqrt().item())
    print(f"RMS logit error vs fp32: native bf16 {rms_n:.4f}, torch bf16 {rms_t:.4f}")
    assert rms_n <= 1.25 * rms_t
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * rms_n
    print(f"top token = fp32's on {int((native.argmax(-1) == ref.argmax(-1)).sum())} of {len(ref)} rows, "
          f"{int(clear.sum())} without a near-tie")
    assert torch.equal(native.argmax(-1)[clear], ref.argmax(-1)[clear])
