"""The architecture registry: config.json `architectures` -> (config class, model class).

Adding an architecture is one module beside these (its config fields, what its layers do differently from
models.base) and one line in MODELS. The compiler, tuner and runtime never name an architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CompileError
from .base import DecoderConfig, DecoderForCausalLM, source_names
from .llama import LlamaConfig, LlamaForCausalLM
from .mistral import MistralConfig, MistralForCausalLM
from .qwen2 import Qwen2Config, Qwen2ForCausalLM
from .qwen3 import Qwen3Config, Qwen3ForCausalLM


@dataclass(frozen=True)
class Architecture:
    name: str
    config: type[DecoderConfig]
    model: type[DecoderForCausalLM]


MODELS = {a.name: a for a in (
    Architecture("Qwen2ForCausalLM", Qwen2Config, Qwen2ForCausalLM),
    Architecture("LlamaForCausalLM", LlamaConfig, LlamaForCausalLM),
    Architecture("MistralForCausalLM", MistralConfig, MistralForCausalLM),
    Architecture("Qwen3ForCausalLM", Qwen3Config, Qwen3ForCausalLM),
)}


def architecture_of(cfg: dict, source: str = "config.json") -> tuple[Architecture, DecoderConfig]:
    """The registered architecture a config.json dict names, and its parsed config."""
    names = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if not isinstance(names, list):
        raise CompileError(f"{source}: field 'architectures' must be a list, got {names!r}")
    arch = next((MODELS[n] for n in names if n in MODELS), None)
    if arch is None:
        raise CompileError(f"{source}: unsupported architecture {', '.join(map(str, names))} "
                           f"(supported: {', '.join(MODELS)})")
    return arch, arch.config.from_hf(cfg, source)


__all__ = ["MODELS", "Architecture", "DecoderConfig", "architecture_of", "source_names"]
