"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM) in tvm.relax.frontend.nn, every quantized linear a TritLinear.

Methods exported: embed, prefill (last-position logits), decode, create_tir_paged_kv_cache. Attention,
RoPE and the KV cache are TVM's TIRPagedKVCache. q/k/v and gate/up are stacked into one operator each
(qkv_proj, gate_up_proj) when their depths agree; parameter names map to the trit checkpoint tensors
they are made of (see `checkpoint_tensor_names`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import relax, te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from codec.format import CODEBOOK, CODES, SCALES
from schedules.base import KERNEL_ATTR, LOGITS_KERNEL

from .errors import CompileError
from .operator import WeightLayout, trit_decode_matmul_te, trit_op_attrs

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
TRIT_PARAM_SUFFIXES = (CODES, SCALES, CODEBOOK)
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
STACKED = {"qkv_proj": QKV, "gate_up_proj": GATE_UP}  # stacked parameter -> checkpoint linears, in row order


@dataclass(frozen=True)
class Qwen2Config:
    """The config.json fields the compiled model depends on."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "Qwen2Config":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CompileError(f"{source}: unsupported architecture {', '.join(map(str, archs))} "
                               f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        try:
            heads = int(cfg["num_attention_heads"])
            rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
            scaling = cfg.get("rope_scaling") or {}
            if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
                raise CompileError(f"{source}: rope_scaling {scaling} is not supported (only default RoPE)")
            return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                       intermediate_size=int(cfg["intermediate_size"]),
                       num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
                       num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                       head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                       rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
                       tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)))
        except KeyError as e:
            raise CompileError(f"{source}: missing field {e}") from None


class TritLinear(nn.Module):
    """A linear layer stored as packed trits; forward is one trit_decode_matmul call.

    parts: output sizes of several matrices with the same input stacked into one (q/k/v, gate/up): one
    kernel reads x once and launches once for all of them; each keeps its own codebook."""

    def __init__(self, in_features: int, parts: tuple[int, ...], depth: int, bias: bool, dtype: str,
                 layout: WeightLayout):
        self.in_features, self.out_features = in_features, sum(parts)
        self.parts, self.depth, self.layout = tuple(parts), depth, layout
        self.trit_codes = nn.Parameter(layout.code_shape(self.out_features, in_features, depth), layout.unit_dtype)
        self.trit_scales = nn.Parameter(layout.scale_shape(self.out_features, in_features, depth), layout.unit_dtype)
        self.trit_codebook = nn.Parameter((layout.codebook_size(len(parts)),), "float32")
        self.bias = nn.Parameter((self.out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        args = [x, self.trit_codes, self.trit_scales, self.trit_codebook]
        if self.bias is not None:
            args.append(self.bias)
        te_func = functools.partial(trit_decode_matmul_te, n_out=self.out_features, depth=self.depth,
                                    layout=self.layout, parts=self.parts)
        return op.tensor_expr_op(te_func, "trit_decode_matmul", args,
                                 attrs=trit_op_attrs(self.out_features, self.in_features, self.depth,
                                                     self.bias is not None, self.layout))


def make_linear(in_features: int, parts: tuple[int, ...], depth: int, bias: bool, dtype: str,
                layout: WeightLayout) -> nn.Module:
    """A TritLinear, or at depth 0 a dense nn.Linear in the model dtype (the dense baseline benchmarks
    build with the same pipeline; stacked the same way)."""
    if depth == 0:
        return nn.Linear(in_features, sum(parts), bias=bias, dtype=dtype)
    return TritLinear(in_features, parts, depth, bias, dtype, layout)


def _stackable(depths: dict[str, int], names: tuple[str, ...]) -> bool:
    """Matrices with the same input stack into one operator when they share a depth (the packed planes)."""
    return len({depths[n] for n in names}) == 1


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, depths: dict[str, int], dtype: str, layout: WeightLayout):
        h, d = cfg.hidden_size, cfg.head_dim
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        sizes = {"q_proj": self.hq * d, "k_proj": self.hkv * d, "v_proj": self.hkv * d}
        if _stackable(depths, QKV):
            self.qkv_proj = make_linear(h, tuple(sizes[n] for n in QKV), depths["q_proj"], True, dtype, layout)
        else:
            self.qkv_proj = None
            self.q_proj, self.k_proj, self.v_proj = (make_linear(h, (sizes[n],), depths[n], True, dtype, layout)
                                                     for n in QKV)
        self.o_proj = make_linear(self.hq * d, (h,), depths["o_proj"], False, dtype, layout)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = op.reshape(qkv, (b, s, self.hq + 2 * self.hkv, self.d))
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.hq, sm_scale=self.d ** -0.5)
        return self.o_proj(op.reshape(out, (b, s, self.hq * self.d)))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config, depths: dict[str, int], dtype: str, layout: WeightLayout):
        h, i = cfg.hidden_size, cfg.intermediate_size
        if _stackable(depths, GATE_UP):
            self.gate_up_proj = make_linear(h, (i, i), depths["gate_proj"], False, dtype, layout)
        else:
            self.gate_up_proj = None
            self.gate_proj, self.up_proj = (make_linear(h, (i,), depths[n], False, dtype, layout) for n in GATE_UP)
        self.down_proj = make_linear(i, (h,), depths["down_proj"], False, dtype, layout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(op.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, depths: dict[str, int], dtype: str, layout: WeightLayout):
        self.self_attn = Qwen2Attention(cfg, depths, dtype, layout)
        self.mlp = Qwen2MLP(cfg, depths, dtype, layout)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_depths: list[dict[str, int]], dtype: str, layout: WeightLayout,
                 embed_dtype: str):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=embed_dtype)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(cfg, d, dtype, layout) for d in layer_depths])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, kv, i)
        return self.norm(x)


def logits_nt(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """float32 logits [b, s, vocab] = x [b, s, hidden] @ w[vocab, hidden]ᵀ, widened inside the kernel."""
    k = te.reduce_axis((0, w.shape[1]), "k")
    return te.compute(tuple(x.shape[:-1]) + (w.shape[0],), lambda b, s, v: te.sum(
        x[b, s, k].astype("float32") * w[v, k].astype("float32"), axis=k), name="logits")


class TritQwen2ForCausalLM(nn.Module):
    """The compiled model's interface: embed → prefill/decode with a paged KV cache → float32 logits."""

    def __init__(self, cfg: Qwen2Config, layer_depths: list[dict[str, int]], dtype: str, target,
                 layout: WeightLayout, embed_dtype: str | None = None):
        """embed_dtype: storage of the [vocab, hidden] matrices (default: dtype). The biggest tensors of a
        small model; kept 16-bit where the checkpoint is, and widened inside the kernels that read them."""
        self.cfg, self.dtype, self.target = cfg, dtype, target
        embed_dtype = embed_dtype or dtype
        self.model = Qwen2Model(cfg, layer_depths, dtype, layout, embed_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                     dtype=embed_dtype)

    def _logits(self, h: Tensor) -> Tensor:
        """h @ Wᵀ read straight from the [vocab, hidden] matrix (no transposed copy of it per call)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return op.tensor_expr_op(logits_nt, "lm_head", [h, weight], attrs={KERNEL_ATTR: LOGITS_KERNEL})

    def embed(self, input_ids: Tensor) -> Tensor:
        h = self.model.embed_tokens(input_ids)
        return h if h.dtype == self.dtype else h.astype(self.dtype)

    def prefill(self, input_embed: Tensor, kv: PagedKVCache):
        def last_position(x: te.Tensor) -> te.Tensor:
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_position")

        h = self.model(input_embed, kv)
        h = op.tensor_expr_op(last_position, "last_position", [h])
        return self._logits(h), kv

    def decode(self, input_embed: Tensor, kv: PagedKVCache):
        return self._logits(self.model(input_embed, kv)), kv

    def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size):
        c = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=0,
            layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]), num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim, v_head_dim=c.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_theta, rope_scaling={},
            rope_ext_factors=relax.prim_value(0), rotary_dim=c.head_dim, enable_disaggregation=False,
            dtype=self.dtype, target=self.target)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, packed = self.cfg.hidden_size, {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        return nn.spec.ModuleSpec.from_raw({
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], self.dtype), "kv": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, h], self.dtype), "kv": kv, "$": packed},
            "create_tir_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int,
                                          "prefill_chunk_size": int, "page_size": int,
                                          "$": {"param_mode": "none", "effect_mode": "none"}},
        }, self)


def checkpoint_tensor_names(param: str) -> tuple[list[str], str | None]:
    """Exported parameter name -> (checkpoint tensors stacked along rows in it, packed suffix or None for
    kept tensors). `...self_attn.qkv_proj.trit_codes` -> the q/k/v_proj weights' trit_codes, in order."""
    head, _, last = param.rpartition(".")
    parent, _, linear = head.rpartition(".")
    sources = [f"{parent}.{name}" for name in STACKED[linear]] if linear in STACKED else [head]
    if last in TRIT_PARAM_SUFFIXES:
        return [f"{src}.weight" for src in sources], last
    return [f"{src}.{last}" for src in sources], None
