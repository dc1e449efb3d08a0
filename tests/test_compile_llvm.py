"""The compiled llvm model against transformers on the same (dequantized) weights."""
import json

import numpy as np
import pytest
import torch

from codec.checkpoint import load_trit_checkpoint
from helpers import compile_with_reference, hf_greedy
from trit_tvm.models.base import STACKED_LINEARS
from trit_tvm.operator import layout_for_target
from trit_tvm.targets import parse_target

NEW_TOKENS = 40
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], list(range(20, 61))]


@pytest.fixture(scope="module", params=[("untied", 2), ("untied", 3), ("tied", 3), ("tied", 2), ("bf16", 3)],
                ids=lambda p: f"{p[0]}-d{p[1]}")
def built(request, tiny_hf, tiny_hf_tied, tiny_hf_bf16, tmp_path_factory):
    kind, depth = request.param
    src = {"untied": tiny_hf, "tied": tiny_hf_tied, "bf16": tiny_hf_bf16}[kind]
    root = tmp_path_factory.mktemp(f"{kind}{depth}")
    return (*compile_with_reference(src, root, depth), root)


def test_greedy_tokens_equal_transformers(built):
    model, hf, _ = built
    for prompt in PROMPTS:
        assert model.generate(prompt, NEW_TOKENS).tokens == hf_greedy(hf, prompt, NEW_TOKENS)


def test_prefill_logits_within_1e_3(built):
    model, hf, _ = built
    for prompt in PROMPTS + [[1]]:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert np.abs(model.prefill_logits(prompt) - ref).max() < 1e-3


def test_chunked_prefill_matches_transformers(built, monkeypatch):
    """A prompt longer than the prefill chunk: later chunks attend to the cache's pages and to themselves
    (trit_tvm.attention_cpu's paged and ragged prefill kernels), merged by their lse."""
    import trit_tvm.runtime
    model, hf, _ = built
    monkeypatch.setattr(trit_tvm.runtime, "PREFILL_CHUNK", 16)
    prompt = list(range(3, 3 + 53))  # chunks of 16, 16, 16, 5
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    assert np.abs(model.prefill_logits(prompt) - ref).max() < 1e-3
    assert model.generate(prompt, 8).tokens == hf_greedy(hf, prompt, 8)


def test_decode_after_prefill_matches_one_longer_prefill(built):
    model, _, _ = built
    prompt, cont = PROMPTS[0], [11, 12, 13, 14, 15]
    steps = model.decode_logits(prompt, cont)
    for i in range(len(cont) + 1):
        np.testing.assert_allclose(steps[i], model.prefill_logits(prompt + cont[:i]), atol=1e-4)


def test_resident_weights_are_the_packed_checkpoint(built):
    model, _, root = built
    m = json.loads((root / "art" / "manifest.json").read_text())
    # the checkpoint's packed weights re-encoded for the kernels (16-bit words of whole weights: at d=2 the
    # checkpoint's density, at d=3 11% more), rows padded to a panel (32 with AVX-512, 16 with AVX2), K to whole
    # blocks: exactly the layout's sizes
    layout = layout_for_target(parse_target("llvm"))
    assert m["weight_layout"] == layout.name and layout.name in ("trit-rows32-words-v1", "trit-rows16-words-v1")
    quantized = load_trit_checkpoint(root / "trit").manifest["quantized"]
    expected = 0
    for i in range(m["config"]["num_hidden_layers"]):
        for group, parent in ((STACKED_LINEARS["qkv_proj"], "self_attn"), (("o_proj",), "self_attn"),
                              (STACKED_LINEARS["gate_up_proj"], "mlp"), (("down_proj",), "mlp")):
            infos = [quantized[f"model.layers.{i}.{parent}.{n}.weight"] for n in group]
            n_out, (n_in, depth) = sum(t["shape"][0] for t in infos), (infos[0]["shape"][1], infos[0]["depth"])
            units = np.prod(layout.code_shape(n_out, n_in, depth)) + np.prod(layout.scale_shape(n_out, n_in, depth))
            expected += 2 * units + 4 * layout.codebook_size(len(group))
    assert m["resident_trit_bytes"] == expected and m["packed_checkpoint_bytes"] <= expected
    assert model.resident_weight_bytes == m["resident_trit_bytes"] + m["resident_kept_bytes"]
    # nothing float-sized for the quantized matrices: kept = embeddings (+ lm_head) + norms + biases only
    cfg = m["config"]
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    emb = v * h * (2 if m["embedding_dtype"] == "bfloat16" else 4) * (1 if cfg["tie_word_embeddings"] else 2)
    assert emb <= m["resident_kept_bytes"] < emb + 64 * h * cfg["num_hidden_layers"] * 4


def test_float16_kv_cache_stays_near_transformers(tiny_hf, tmp_path, monkeypatch):
    """--kv-cache-dtype float16: keys and values rounded to 16 bits in the cache move the logits (not at all
    would mean the option did nothing), within 1e-2 of transformers; prefill in chunks of 16 so later chunks
    read the float16 pages, and decode steps after it."""
    import trit_tvm.runtime
    from trit_tvm.cli import compile_main
    from trit_tvm.runtime import TritModel
    exact, hf = compile_with_reference(tiny_hf, tmp_path, 3)
    assert compile_main([str(tmp_path / "trit"), "--target", "llvm", "--kv-cache-dtype", "float16",
                         "-o", str(tmp_path / "art16")]) == 0
    half = TritModel(tmp_path / "art16")
    assert half.manifest["kv_cache_dtype"] == "float16" and exact.manifest["kv_cache_dtype"] == "float32"
    monkeypatch.setattr(trit_tvm.runtime, "PREFILL_CHUNK", 16)
    prompt, cont = list(range(3, 3 + 53)), [11, 12, 13]
    with torch.no_grad():
        ref = [hf(torch.tensor([prompt + cont[:i]])).logits[0, -1].numpy() for i in range(len(cont) + 1)]
    rounded = half.decode_logits(prompt, cont)
    moved = [np.abs(r - e).max() for r, e in zip(rounded, exact.decode_logits(prompt, cont))]
    off = [np.abs(r - x).max() for r, x in zip(rounded, ref)]
    assert min(moved) > 0 and max(off) < 1e-2, (moved, off)
