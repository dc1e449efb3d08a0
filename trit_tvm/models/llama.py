"""Llama 2/3.x and SmolLM (LlamaForCausalLM): the shared decoder, with Llama 3's RoPE scaling."""
from __future__ import annotations

from ..errors import CompileError
from .base import DecoderConfig, DecoderForCausalLM, rope_settings


class LlamaConfig(DecoderConfig):
    @classmethod
    def hf_fields(cls, cfg: dict, source: str) -> dict:
        if cfg.get("mlp_bias"):
            raise CompileError(f"{source}: mlp_bias is not supported")
        theta, scaling = rope_settings(cfg, source, ("default", "llama3"))
        return {**super().hf_fields({**cfg, "rope_scaling": None, "rope_parameters": None, "rope_theta": theta},
                                    source),
                "rope_scaling": scaling, "attention_bias": bool(cfg.get("attention_bias", False))}


class LlamaForCausalLM(DecoderForCausalLM):
    pass
