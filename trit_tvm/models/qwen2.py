"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): the shared decoder with q/k/v biases."""
from __future__ import annotations

from .base import DecoderConfig, DecoderForCausalLM


def sliding_window_of(cfg: dict) -> int | None:
    """The window Qwen configs apply only when `use_sliding_window` is set."""
    return int(cfg["sliding_window"]) if cfg.get("use_sliding_window") and cfg.get("sliding_window") else None


class Qwen2Config(DecoderConfig):
    @classmethod
    def hf_fields(cls, cfg: dict, source: str) -> dict:
        return {**super().hf_fields(cfg, source), "attention_bias": True, "sliding_window": sliding_window_of(cfg)}


class Qwen2ForCausalLM(DecoderForCausalLM):
    pass
