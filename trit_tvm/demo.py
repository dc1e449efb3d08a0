"""The embedded demo model: a small seeded Qwen2 checkpoint with its own tokenizer, built offline.

Tests use the same builder with other sizes; nothing is ever downloaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

_CORPUS = """Balanced ternary writes every number with the digits minus one, zero and plus one.
A trit holds log2 of three bits of information, about one point five eight five bits.
Quantized language models store each weight as a step times a small integer.
The compiler reads the packed trits directly and never expands them to floating point.
Tokens per second on a small machine depend on how many bytes each token has to read.
""" * 4


@dataclass(frozen=True)
class TinyQwen2Spec:
    """Shape of a tiny Qwen2 (all dims multiples of 16, GQA when kv_heads < heads)."""
    hidden: int = 64
    intermediate: int = 176
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 384
    tie_embeddings: bool = True
    max_positions: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.08
    seed: int = 0


DEMO_SPEC = TinyQwen2Spec(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=384, seed=1234)


def build_tokenizer(out_dir: Path, vocab: int) -> int:
    """Train a byte-level BPE on the embedded corpus, save it as a fast tokenizer; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return len(fast)


def build_tiny_qwen2(out_dir: str | Path, spec: TinyQwen2Spec = TinyQwen2Spec(), dtype: str = "float32",
                     tokenizer: bool = True) -> Path:
    """Write a seeded Qwen2ForCausalLM (safetensors) and, optionally, a tokenizer to out_dir."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        n = build_tokenizer(out_dir, spec.vocab)
        assert n <= spec.vocab, f"tokenizer has {n} tokens, more than the model's vocab {spec.vocab}"
    cfg = Qwen2Config(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                      rope_theta=spec.rope_theta, rms_norm_eps=spec.rms_norm_eps,
                      tie_word_embeddings=spec.tie_embeddings, initializer_range=spec.init_std,
                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # Qwen2 inits biases to zero; give them values so the test covers them
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, spec.init_std)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "tiny_spec.json").write_text(__import__("json").dumps(asdict(spec)))
    return out_dir
