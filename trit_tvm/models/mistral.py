"""Mistral (MistralForCausalLM): the shared decoder; v0.3 has no sliding window. With a window, sequences are
capped at its length (attention within it is the full attention; beyond it is not implemented)."""
from __future__ import annotations

from .base import DecoderConfig, DecoderForCausalLM


class MistralConfig(DecoderConfig):
    @classmethod
    def hf_fields(cls, cfg: dict, source: str) -> dict:
        window = cfg.get("sliding_window")
        return {**super().hf_fields(cfg, source), "sliding_window": int(window) if window else None}


class MistralForCausalLM(DecoderForCausalLM):
    pass
