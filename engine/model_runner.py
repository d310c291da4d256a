"""ModelRunner: the only device code of the paged engine. Loads model + tokenizer, owns the KV cache,
executes one SchedulerOutput per step.

Interface the engine (llm_engine / scheduler / sampler) relies on (runner_protocol.Runner states the part
LLMEngine reads):

    runner = ModelRunner(config: EngineConfig)     # raises ModelLoadError / GearshiftError naming the problem
    runner.tokenizer        -> gearshift.engine.tokenizer.Tokenizer (encode/decode/apply_chat_template/eos_token_ids)
    runner.model_config     -> gearshift.engine.model.config.ModelConfig
    runner.device           -> torch.device (cpu | cuda)
    runner.dtype            -> torch.dtype chosen (auto: CUDA bf16 (fp16 without bf16); CPU bf16 only with
                               AVX512-BF16/AMX, else fp32 -- on AVX2-only CPUs bf16 matmuls run ~5x slower)
    runner.kv_dtype         -> torch.dtype of the KV cache (runner.dtype; bf16 under int8 on CPUs with native bf16)
    runner.prepacked        -> bool  CPU matmul weights pre-packed for oneDNN
    runner.num_kv_blocks    -> int   blocks in the preallocated cache (block ids 0 .. num_kv_blocks-1)
    runner.block_size       -> int   tokens per block (= config.block_size)
    runner.max_model_len    -> int   prompt + output tokens one sequence may hold
    runner.vocab_size       -> int   logits width
    runner.execute(out: SchedulerOutput) -> torch.Tensor
        float32 logits [number of seqs with sample=True, vocab_size], rows in out.seqs order, on
        runner.device. out.seqs may mix decodes and prefill chunks; each ScheduledSeq.block_table must
        cover positions [0, start_pos + len(token_ids)). An empty out (no seqs) returns [0, vocab_size].

Speed notes (CPU): one flat varlen batch per step; matmul weights pre-packed for oneDNN; RoPE tables and
the attention gather plan built once per step; torch.compile is not used (matmuls are >75% of a prefill
step and ~55% of a decode step, so fusing the elementwise rest buys little for its compile time).
GPU: Triton kernels from gearshift.engine.kernels, CUDA graphs for decode batches (cuda_graphs.py).

Contract on K/V: after execute, the cache holds K/V for every scheduled token at its slot
(block_table[pos // block_size] * block_size + pos % block_size); nothing else is written.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.config import EngineConfig, usable_cpus
from gearshift.engine.cpu_malloc import keep_large_buffers, release_free_heap
from gearshift.engine.device_copy import to_device
from gearshift.engine.dtypes import cpu_has_fast_bf16, kv_cache_dtype, resolve_device, resolve_dtype
from gearshift.engine.errors import GearshiftError
from gearshift.engine.kv_cache import allocate_kv_cache, block_bytes, kv_budget, plan_kv_cache
from gearshift.engine.load_progress import reported
from gearshift.engine.loader import open_model
from gearshift.engine.model.llama import LlamaForCausalLM
from gearshift.engine.model.quant_int4 import INT4_MAX_ROWS, int4_activation_dtype
from gearshift.engine.model.quant_int8 import CALIBRATION_TEXT, input_absmax
from gearshift.engine.scheduler_output import SchedulerOutput
from gearshift.engine.sequence import PLACEHOLDER
from gearshift.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gearshift.engine.cuda_graphs import DecodeGraphs, MixedGraphs
    from gearshift.engine.loader import GGUFModel, HFModel

log = logging.getLogger(__name__)

def with_previous_ids(input_ids: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [T] with its first len(prev_ids) entries taken from prev_ids where they are PLACEHOLDERs;
    all on the device, nothing read on the host."""
    nd = prev_ids.shape[0]
    if nd > input_ids.shape[0]:
        raise ValueError(f"{nd} previous ids for a step of {input_ids.shape[0]} tokens")
    head = input_ids[:nd]
    head = torch.where(head == PLACEHOLDER, prev_ids, head)
    return head if nd == input_ids.shape[0] else torch.cat([head, input_ids[nd:]])


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.quantization == "int8":  # int8 weights, fp32 activations (what the int8 matmuls take)
            if self.device.type != "cpu" or config.dtype not in ("auto", "float32"):
                raise GearshiftError("quantization int8 runs on CPU with float32 activations: use --device cpu "
                                     f"and --dtype auto or float32 (got device {self.device.type}, dtype {config.dtype})")
            self.dtype = torch.float32
        if config.quantization == "int4":  # 4-bit weights, bf16 activations (what ATen's int4 kernel takes)
            self.dtype = int4_activation_dtype(self.device.type, config.dtype, cpu_has_fast_bf16())
        self.kv_dtype = kv_cache_dtype(self.dtype, config.quantization, self.device.type, cpu_has_fast_bf16())
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or usable_cpus())
        log.info("reading %s (configuration, tokenizer), then its weights", config.model)
        src = open_model(config.model)
        self.model_config = cfg = src.config
        self.tokenizer = Tokenizer.from_model(src, extra_eos_ids=cfg.eos_token_ids)
        self.vocab_size = cfg.vocab_size
        self.block_size = config.block_size
        model_len = cfg.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_len:
            raise GearshiftError(
                f"max_model_len {config.max_model_len} exceeds the model's context length {model_len}"
            )
        wanted_len = config.max_model_len or model_len
        self.prepacked = False  # CPU: matmul weights pre-packed for oneDNN (set by _load_model)
        self.model = self._load_model(src, wanted_len)
        self._allocate_kv_cache(wanted_len)
        if config.quantization == "int8":  # calibrated by a prefill through the fp32 model and this KV cache
            self.model.quantize_int8_for_cpu(self.config.max_num_seqs, self._int8_calibration())
            release_free_heap()  # the fp32 weights and quantization temporaries: RSS after load -200 MiB on SmolLM2
        self.graphs: DecodeGraphs | None = None  # CUDA graphs for pure-decode batches (GPU, unless enforce_eager)
        self.mixed_graphs: MixedGraphs | None = None  # and for mixed steps of few tokens (cuda_graphs.py)
        if self.device.type == "cpu":  # a step's [B, V] logits reused from the heap (cpu_malloc.py says why)
            keep_large_buffers(2 * config.max_num_seqs * self.vocab_size * 4)
        self._warmup()
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()

    # ---- setup ----------------------------------------------------------------------------------
    def _load_model(self, src: GGUFModel | HFModel, max_positions: int) -> LlamaForCausalLM:
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device("meta"):  # no random init: every weight is about to be overwritten
                model = LlamaForCausalLM(self.model_config, max_positions)
        finally:
            torch.set_default_dtype(default)
        model.to_empty(device=self.device)
        model.materialize()
        total = sum(p.numel() for p in model.parameters())  # tied weights once, as checkpoints hold them
        model.load_weights(reported(src.weights(), total, self.model_config.num_layers, log.info))
        if self.config.quantization == "int4":
            blocks = src.q4_blocks() if hasattr(src, "q4_blocks") else ()  # a GGUF's own Q4_0/Q4_1 blocks
            counts = model.quantize_int4_for_cpu(blocks, INT4_MAX_ROWS, batch_hint=self.config.max_num_seqs)
            self.prepacked = True
            release_free_heap()  # the repacking's temporaries: RSS after load 1076 -> 806 MiB on SmolLM2
            log.info("int4 weights: %(kept)d matrices keep the checkpoint's Q4 blocks, %(quantized)d quantized "
                     "by group min/max, %(dense)d stay dense", counts)
        elif self.config.quantization == "int8":
            pass  # quantized once the KV cache exists: its calibration prefill runs the plain fp32 weights
        elif self.device.type == "cpu" and (self.dtype == torch.float32 or
                                          (self.dtype == torch.bfloat16 and cpu_has_fast_bf16())):
            try:
                model.prepack_for_cpu(batch_hint=self.config.max_num_seqs)
                self.prepacked = True
            except (RuntimeError, AttributeError) as e:  # a torch without oneDNN: plain matmuls
                for m in model.modules():
                    if hasattr(m, "packed"):
                        m.packed = None
                log.warning("oneDNN weight pre-packing unavailable (%s); using plain matmuls", e)
        return model.eval()

    def _kv_budget(self) -> int:  # distributed/runner.py takes the smallest over the ranks
        return kv_budget(self.config.kv_cache_memory, self.device)

    def _allocate_kv_cache(self, wanted_len: int) -> None:
        """The cache (engine/kv_cache.py) the budget holds, and the context length it leaves."""
        plan = plan_kv_cache(self._kv_budget(), block_bytes(self.model_config, self.block_size, self.kv_dtype),
                             self.block_size, self.config.max_model_len, wanted_len)
        self.num_kv_blocks, self.max_model_len = plan.num_blocks, plan.max_model_len
        self.kv_cache, self.kv_caches = allocate_kv_cache(self.model_config, plan.num_blocks, self.block_size,
                                                          self.kv_dtype, self.device)
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s), max_model_len %d", self.num_kv_blocks,
                 self.block_size, self.kv_cache.nbytes / 2**20, str(self.kv_dtype)[6:], self.max_model_len)

    def _int8_calibration(self) -> dict[str, torch.Tensor]:
        """Per-channel max |input| of every smoothable matmul over one prefill of quant_int8's calibration
        text (at most the KV cache and the step budget), logits at every row; the cache it wrote is free."""
        from gearshift.engine.scheduler_output import ScheduledSeq

        n_max = min(self.max_model_len, self.num_kv_blocks * self.block_size, self.config.max_num_batched_tokens)
        ids = self.tokenizer.encode(CALIBRATION_TEXT)[:n_max]
        out = SchedulerOutput(seqs=[ScheduledSeq(0, ids, 0, list(range(-(-len(ids) // self.block_size))), True)])
        names = dict(self.model.smoothable_int8())
        modules = {n: m for n, m in self.model.named_modules() if n in names}

        def run() -> None:
            input_ids, positions, meta, _ = self.prepare(out)
            with torch.inference_mode():
                self.model.compute_logits(self.model(input_ids, positions, meta, self.kv_caches))

        return input_absmax(modules, run)

    def _warmup(self) -> None:
        """One small forward so first-call costs (oneDNN/JIT setup) do not land on a user request."""
        from gearshift.engine.scheduler_output import ScheduledSeq

        n = min(8, self.max_model_len)
        blocks = list(range((n + self.block_size - 1) // self.block_size))
        self.execute(SchedulerOutput(seqs=[ScheduledSeq(0, [0] * n, 0, blocks, True)]))
        if self.device.type == "cuda":
            self._warmup_kernels()

    def _warmup_kernels(self) -> None:
        """Compile every Triton variant a step can pick now, so that no request pays the JIT (~1 s each):
        the unified kernel's q-block heights (chosen by query length x GQA group), its variant that skips
        long prefills attended by flash SDPA (kernels/prefill_route.py) and, without CUDA
        graphs (whose capture compiles its own), the decode kernel's split count for each batch bucket."""
        from gearshift.engine.cuda_graphs import batch_buckets
        from gearshift.engine.kernels.prefill_route import DENSE_MIN_QUERY_LEN
        from gearshift.engine.scheduler_output import ScheduledSeq

        bs = self.block_size
        cap = min(self.config.max_num_batched_tokens, self.max_model_len, self.num_kv_blocks * bs)
        group = self.model_config.num_heads // self.model_config.num_kv_heads
        for n in sorted({min(cap, q) for q in (2, max(2, 64 // group))}):
            blocks = list(range(-(-n // bs)))
            self.execute(SchedulerOutput(seqs=[ScheduledSeq(0, [0] * n, 0, blocks, True)]))
        n = DENSE_MIN_QUERY_LEN  # a long fresh prompt beside a decode: the unified kernel's seq_skip variant
        if n < cap and -(-n // bs) < self.num_kv_blocks:
            blocks = list(range(-(-n // bs)))
            self.execute(SchedulerOutput(seqs=[ScheduledSeq(1, [0], 0, [len(blocks)], True),
                                               ScheduledSeq(0, [0] * n, 0, blocks, True)]))
        if self.config.enforce_eager:
            for b in batch_buckets(self.config.max_num_seqs):
                if b > self.num_kv_blocks:
                    break
                seqs = [ScheduledSeq(i, [0], 0, [i], True) for i in range(b)]  # one block each
                self.execute(SchedulerOutput(seqs=seqs))
        torch.cuda.synchronize(self.device)

    def _capture_graphs(self) -> None:
        from gearshift.engine.cuda_graphs import DecodeGraphs  # lazy: CPU never captures

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
            return self.model.compute_logits(self.model(input_ids, positions, meta, self.kv_caches))

        try:
            graphs = DecodeGraphs(forward, self.device, self.config.max_num_seqs,
                                  max_blocks=-(-self.max_model_len // self.block_size), block_size=self.block_size)
            graphs.capture()
            self.graphs = graphs
        except Exception as e:  # a capture failure costs speed, not correctness: run eager
            log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
            self.graphs = None
        self._capture_mixed_graphs()

    def _capture_mixed_graphs(self) -> None:
        """Graphs for mixed prefill + decode steps of few tokens (cuda_graphs.MixedGraphs); on any failure
        (a model whose forward reads the device, out of memory) those steps run eager, as before."""
        from gearshift.engine.cuda_graphs import MixedGraphs, batch_buckets, mixed_token_buckets
        from gearshift.engine.kernels.prefill_route import DENSE_MIN_QUERY_LEN

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    rows: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids, positions, meta, self.kv_caches)  # [T, D]
            return self.model.compute_logits(hidden.index_select(0, rows))  # [S, vocab]

        tokens = mixed_token_buckets(self.config.max_num_batched_tokens, DENSE_MIN_QUERY_LEN)
        if not tokens:
            return
        try:
            graphs = MixedGraphs(forward, self.device, tokens, batch_buckets(self.config.max_num_seqs),
                                 max_blocks=-(-self.max_model_len // self.block_size), block_size=self.block_size)
            graphs.capture()
            self.mixed_graphs = graphs
        except Exception as e:
            log.warning("CUDA graph capture for mixed steps failed (%s); running them eagerly", e)
            self.mixed_graphs = None

    # ---- one step -------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        """prev_ids: async scheduling's previous argmax [num_decodes] on the device, aligned with the decode
        rows (first in the flat batch); where out holds a PLACEHOLDER (engine/async_step.py) it is the id."""
        if not out.seqs:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        input_ids, positions, meta, sample_rows = self.prepare(out)
        if prev_ids is not None:
            input_ids = with_previous_ids(input_ids, prev_ids)
        sampled = meta.num_seqs if sample_rows is None else sample_rows.shape[0]
        if self.graphs is not None and self.graphs.can_run(input_ids, meta, sampled):
            return self.graphs.run(input_ids, positions, meta)
        if self.mixed_graphs is not None and self.mixed_graphs.can_run(input_ids, meta, sample_rows):
            return self.mixed_graphs.run(input_ids, positions, meta, sample_rows)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden if sample_rows is None else hidden[sample_rows])

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        """Flatten the step: input_ids [T], positions [T], attention metadata, rows to sample [N] (None: all
        rows, a pure-decode step). The schedule is trusted: the scheduler's tests hold its invariants, and
        checking every block of every sequence here would cost more host time than the rest of this."""
        if out.num_decodes == len(out.seqs):
            decode = self._prepare_decode(out)
            if decode is not None:
                return decode
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for s in out.seqs:
            toks, start, bt = s.token_ids, s.start_pos, s.block_table
            n = len(toks)
            end = start + n
            ids += toks
            if n == 1:
                pos.append(start)
                slots.append(bt[start // bs] * bs + start % bs)
            else:
                pos += range(start, end)
                slots += [bt[p // bs] * bs + p % bs for p in range(start, end)]
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if s.sample:
                sample_rows.append(qsl[-1] - 1)
        max_seq_len = max(seq_lens)
        max_blocks = (max_seq_len + bs - 1) // bs
        tables: list[int] = []  # [B * max_blocks], each row padded with 0
        pad = [0] * max_blocks
        for s in out.seqs:
            bt = s.block_table
            if len(bt) >= max_blocks:
                tables += bt[:max_blocks]  # callers may pass tables longer than this step's context
            else:
                tables += bt
                tables += pad[:max_blocks - len(bt)]
        dev = self.device

        def to_dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), dev)  # no wait for the step still running

        meta = AttentionMetadata(
            slot_mapping=to_dev(slots, torch.int64),
            query_start_loc=to_dev(qsl, torch.int32),
            seq_lens=to_dev(seq_lens, torch.int32),
            block_tables=to_dev(tables, torch.int32).view(len(out.seqs), max_blocks),
            max_query_len=max((len(s.token_ids) for s in out.seqs[out.num_decodes:]), default=1),
            max_seq_len=max_seq_len,
            query_start_loc_host=qsl,  # the lists themselves: routing reads these, never the device copies
            seq_lens_host=seq_lens,
        )
        rows = None if len(sample_rows) == len(ids) else to_dev(sample_rows, torch.int64)
        return to_dev(ids, torch.int64), to_dev(pos, torch.int64), meta, rows

    def _prepare_decode(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, None] | None:
        """prepare() for a pure-decode step (B sequences, one token each, all sampled), in numpy: one pass
        over the sequences to read their token, position and table, the rest vectorised. None when a
        table is longer than its context needs (hand-built outputs): the general path pads those."""
        seqs = out.seqs
        b, bs = len(seqs), self.block_size
        ids = np.fromiter((s.token_ids[0] for s in seqs), np.int64, b)  # [B]
        pos = np.fromiter((s.start_pos for s in seqs), np.int64, b)  # [B]
        tables = [s.block_table for s in seqs]
        lens = np.fromiter(map(len, tables), np.int64, b)  # [B] blocks each sequence holds
        max_seq_len = int(pos.max()) + 1
        max_blocks = -(-max_seq_len // bs)
        if int(lens.max()) > max_blocks:
            return None
        flat = np.fromiter(chain.from_iterable(tables), np.int32, int(lens.sum()))
        block_tables = np.zeros((b, max_blocks), np.int32)  # [B, max_blocks], each row padded with 0
        block_tables[np.arange(max_blocks) < lens[:, None]] = flat  # row-major fill: row i gets its own table
        slots = block_tables[np.arange(b), pos // bs].astype(np.int64) * bs + pos % bs  # [B]
        dev = self.device
        meta = AttentionMetadata(  # to_device: no wait for the step still running
            slot_mapping=to_device(torch.from_numpy(slots), dev),
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=dev),
            seq_lens=to_device(torch.from_numpy((pos + 1).astype(np.int32)), dev),
            block_tables=to_device(torch.from_numpy(block_tables), dev),
            max_query_len=1,
            max_seq_len=max_seq_len,
            query_start_loc_host=list(range(b + 1)),
            seq_lens_host=(pos + 1).tolist(),
        )
        return to_device(torch.from_numpy(ids), dev), to_device(torch.from_numpy(pos), dev), meta, None
