"""Qwen3 (Qwen3ForCausalLM): the shared decoder with an RMSNorm over each q and k head before RoPE, and a
head_dim of its own (not hidden / heads)."""
from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .base import Attention, DecoderConfig, DecoderForCausalLM
from .qwen2 import sliding_window_of


class Qwen3Config(DecoderConfig):
    @classmethod
    def hf_fields(cls, cfg: dict, source: str) -> dict:
        return {**super().hf_fields(cfg, source), "attention_bias": bool(cfg.get("attention_bias", False)),
                "sliding_window": sliding_window_of(cfg)}


class Qwen3Attention(Attention):
    def __init__(self, cfg: DecoderConfig, dtype: str, kv_dtype: str | None = None):
        super().__init__(cfg, dtype, kv_dtype)
        self.q_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.k_norm = nn.RMSNorm(cfg.head_dim, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)

    def heads(self, qkv: Tensor) -> Tensor:
        q, k, v = op.split(qkv, [self.hq, self.hq + self.hkv], axis=2)
        return op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)


class Qwen3ForCausalLM(DecoderForCausalLM):
    attention = Qwen3Attention
