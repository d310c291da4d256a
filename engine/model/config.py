"""ModelConfig: the architecture hyper-parameters of a decoder, whatever file they came from, and the
registry of the architectures the paged engine implements (by HF class name and by GGUF name).

No torch import: the operator reads the registry (`gearshift plan` decides before anything is loaded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gearshift.engine.errors import ModelLoadError

# HF `architectures[0]` -> our family name. The quirks each family switches on are in the loaders.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# GGUF `general.architecture` -> our family name (llama.cpp writes Mistral and Mixtral as "llama").
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                      "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "qwen3moe": "qwen3_moe"}
SUPPORTED_ARCHITECTURES = tuple(dict.fromkeys(HF_ARCHITECTURES.values()))

# The word a pod's termination message starts with when the paged engine cannot run a model; the operator
# turns it into Degraded/UnsupportedModel (and, for GGUF with engine auto, a fall back to gguf).
UNSUPPORTED_MODEL = "UnsupportedModel"
_REPORTED = re.compile(UNSUPPORTED_MODEL + r": architecture '([^']{1,128})'")


class UnsupportedArchitecture(ModelLoadError):
    """A well-formed model of an architecture the paged engine does not implement."""

    def __init__(self, architecture: str, source: str) -> None:
        supported = ", ".join(GGUF_ARCHITECTURES if source == "gguf" else HF_ARCHITECTURES)
        super().__init__(f"{UNSUPPORTED_MODEL}: architecture {architecture!r} is not implemented by the paged "
                         f"engine ({source}); supported: {supported}")
        self.architecture = architecture


def reported_architecture(text: str | None) -> str | None:
    """The architecture named by an UnsupportedArchitecture message inside `text` (a log tail), if any."""
    m = _REPORTED.search(text or "")
    return m.group(1) if m else None


def is_supported(architecture: str) -> bool:
    """Whether the paged engine runs this HF class name or GGUF architecture name."""
    return architecture in HF_ARCHITECTURES or architecture in GGUF_ARCHITECTURES


@dataclass
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}; None: plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # ---- family quirks (defaults: Llama) ----
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    norm_weight_offset: float = 0.0  # HF Gemma norms scale by (1 + w): the loader adds this to w once
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    sandwich_norm: bool = False  # norms after attention and MLP too (Gemma 2/3)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_softcap: float | None = None  # attention logits -> cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None  # LM-head logits, the same (Gemma 2)
    sliding_window: int | None = None  # a sliding layer attends to the last `sliding_window` positions
    sliding_layers: list[bool] | None = None  # per layer; None: every layer slides when sliding_window is set
    rope_local_theta: float | None = None  # sliding layers' RoPE base (Gemma 3), unscaled
    # ---- mixture of experts ----
    num_experts: int = 0  # 0: dense MLP in every layer
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1 (Mixtral: always)
    dense_layers: list[int] = field(default_factory=list)  # MoE models: layers with a dense MLP instead

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, or None for a layer that attends to the whole context."""
        if self.sliding_window is None:
            return None
        return self.sliding_window if self.sliding_layers is None or self.sliding_layers[i] else None

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Weights that take part in a forward pass (for FLOP accounting: 2 FLOPs per weight per token);
        for MoE layers the router and the experts_per_token experts a token runs through."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        n = d
        for i in range(self.num_layers):
            if self.is_moe_layer(i):
                mlp = d * self.num_experts + self.experts_per_token * 3 * d * self.moe_intermediate_size
            else:
                mlp = 3 * d * f
            n += attn + mlp + (4 if self.sandwich_norm else 2) * d
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n
