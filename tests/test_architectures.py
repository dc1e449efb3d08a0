"""Every registered architecture, compiled for this CPU, against transformers on the same (dequantized) weights:
tiny seeded checkpoints of Qwen2, Llama (with Llama 3 RoPE scaling), Mistral and Qwen3 (head_dim ≠ hidden /
heads, per-head q/k norms), tied and untied, at depths 2 and 3."""
import numpy as np
import pytest
import torch

from helpers import compile_with_reference, hf_greedy
from trit_tvm.demo import TinySpec, build_tiny_model
from trit_tvm.errors import CompileError
from trit_tvm.models import MODELS, architecture_of

NEW_TOKENS = 32
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], list(range(20, 61))]  # the second runs past Llama 3's 64-token pivot
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
SPECS = {
    # head_dim 16, theta 1e4: wavelengths 6 (kept), 20 and 63 (blended), >= 199 (scaled): every branch of llama3
    "llama-untied-llama3": TinySpec(architecture="llama", tie_embeddings=False, seed=21, rope_scaling=LLAMA3_ROPE),
    # a window of 128 tokens: the prompts stay inside it (where it is full attention); longer requests are refused
    "mistral-tied": TinySpec(architecture="mistral", tie_embeddings=True, seed=22, intermediate=192,
                             sliding_window=128),
    "qwen3-untied": TinySpec(architecture="qwen3", tie_embeddings=False, seed=23, head_dim=32),
    "qwen2-tied": TinySpec(architecture="qwen2", tie_embeddings=True, seed=24, kv_heads=1),
}


@pytest.fixture(scope="module", params=[(name, depth) for name in SPECS for depth in (2, 3)],
                ids=lambda p: f"{p[0]}-d{p[1]}")
def built(request, tmp_path_factory):
    name, depth = request.param
    root = tmp_path_factory.mktemp(f"{name}{depth}")
    build_tiny_model(root / "hf", SPECS[name])
    return (*compile_with_reference(root / "hf", root, depth), name)


def test_greedy_tokens_and_prefill_logits_equal_transformers(built):
    model, hf, name = built
    assert model.manifest["architecture"] == hf.config.architectures[0]
    for prompt in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert np.abs(model.prefill_logits(prompt) - ref).max() < 1e-3, name
        assert model.generate(prompt, NEW_TOKENS).tokens == hf_greedy(hf, prompt, NEW_TOKENS), name


def test_every_architecture_is_tested():
    assert {s.architecture for s in SPECS.values()} == {n.removesuffix("ForCausalLM").lower() for n in MODELS}


def test_qwen3_head_dim_is_its_own():
    _, cfg = architecture_of({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "head_dim": 32})
    assert cfg.head_dim == 32 and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads


def test_sliding_window_caps_the_context_with_a_clear_error():
    base = {"architectures": ["MistralForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32768}
    assert architecture_of({**base, "sliding_window": None})[1].context_length == 32768  # v0.3
    assert architecture_of({**base, "sliding_window": 4096})[1].context_length == 4096   # v0.1
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096}
    assert architecture_of(qwen)[1].context_length == 32768  # Qwen: only with use_sliding_window
    assert architecture_of({**qwen, "use_sliding_window": True})[1].context_length == 4096


@pytest.mark.parametrize("built", [("mistral-tied", 3)], indirect=True, ids=["mistral-tied-d3"])
def test_request_beyond_the_window_names_it(built):
    model, _, _ = built
    assert model.max_seq_len == 128
    with pytest.raises(CompileError, match="sliding window of 128 tokens"):
        model.generate(PROMPTS[1], 100)


@pytest.mark.parametrize("cfg, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing field 'low_freq_factor'"),
    ({"num_attention_heads": 6}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": "wide"}, "malformed field"),
    ({"mlp_bias": True}, "mlp_bias is not supported"),
])
def test_bad_configs_are_one_line_errors(cfg, message):
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4}
    with pytest.raises(CompileError, match=message):
        architecture_of({**base, "num_key_value_heads": 4, **cfg}, "config.json")
