"""The decoder layer of the families beyond plain Llama: the same residual stream and fused add + norm
chain as llama.DecoderLayer, with Gemma's sandwich norms and a mixture-of-experts MLP where the config
asks for them (attention quirks live in layers.Attention).

Sandwich (Gemma 2/3): x += post_attention_norm(attn(input_norm(x))); x += post_ffw_norm(mlp(pre_ffw_norm(x))).
Plain: x += attn(input_norm(x)); x += mlp(post_attention_norm(x)).
"""

from __future__ import annotations

import torch
from gearshift.engine.model.config import ModelConfig
from gearshift.engine.model.layers import Attention, RMSNorm, SwiGLU
from gearshift.engine.model.moe import SparseMoE
from torch import nn


class FamilyDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.window = cfg.layer_window(layer)  # picks this layer's attention plan and RoPE table
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
            self.post_feedforward_layernorm = RMSNorm(d, eps)
        if cfg.is_moe_layer(layer):
            self.mlp: nn.Module = SparseMoE(d, cfg.moe_intermediate_size, cfg.num_experts, cfg.experts_per_token,
                                            cfg.norm_topk_prob, cfg.hidden_act)
        else:
            self.mlp = SwiGLU(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, rope, x, h, kv_cache, meta, plan, next_norm: RMSNorm) -> torch.Tensor:
        """As llama.DecoderLayer.forward: x [T, D] updated in place, h its input norm; returns x
        normalized by next_norm."""
        a = self.self_attn(rope, h, kv_cache, meta, plan)
        if not self.sandwich:
            h = self.post_attention_layernorm.add_(x, a)
            return next_norm.add_(x, self.mlp(h))
        h = self.pre_feedforward_layernorm.add_(x, self.post_attention_layernorm(a))
        return next_norm.add_(x, self.post_feedforward_layernorm(self.mlp(h)))
