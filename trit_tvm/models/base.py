"""The decoder every supported architecture shares, in tvm.relax.frontend.nn with plain nn.Linear layers.

Pre-norm RMSNorm blocks, grouped-query attention through TVM's paged KV cache (RoPE applied by the cache,
RopeMode.NORMAL, with the config's rope scaling), SwiGLU MLP, tied or untied output head. q/k/v and gate/up
are declared stacked (one nn.Linear each, `out_parts` says the stacked matrices' sizes); the trit
quantization (trit_tvm.quantization) swaps every linear whose checkpoint tensors are quantized for the trit
operator. An architecture module subclasses what differs (its config fields, its attention) and registers
itself in trit_tvm.models.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from tvm import relax, te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from schedules.base import KERNEL_ATTR, LOGITS_KERNEL

from .. import fastmath
from ..errors import CompileError

# stacked parameter -> the checkpoint linears it is made of, in row order (the loader's name mapping)
STACKED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def source_names(param: str) -> list[str]:
    """Model parameter name -> the checkpoint tensors it is made of (several for stacked linears, in row
    order): `model.layers.0.self_attn.qkv_proj.bias` -> the q/k/v_proj biases of that layer."""
    head, _, last = param.rpartition(".")
    parent, _, linear = head.rpartition(".")
    if linear in STACKED_LINEARS:
        return [f"{parent}.{name}.{last}" for name in STACKED_LINEARS[linear]]
    return [param]


def rope_settings(cfg: dict, source: str, supported: tuple[str, ...] = ("default",)) -> tuple[float, dict]:
    """(rope_theta, rope scaling for TVM's KV cache) from `rope_scaling` (config.json as published) or
    `rope_parameters` (transformers >= 5 writes that); an unsupported scaling type is an error naming it."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = dict(cfg.get("rope_scaling") or params)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in supported:
        raise CompileError(f"{source}: rope scaling type {kind!r} is not supported for {cfg.get('architectures')} "
                           f"(supported: {', '.join(supported)})")
    if kind == "default":
        return theta, {}
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise CompileError(f"{source}: rope scaling {kind!r} is missing field '{missing[0]}'")
    return theta, {"rope_type": kind, **{k: scaling[k] for k in keys}}


@dataclass(frozen=True)
class DecoderConfig:
    """The config.json fields the compiled model depends on. context_length: how many tokens a sequence may
    hold (max_position_embeddings, or less where the architecture's attention is only exact up to a window)."""
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
    attention_bias: bool = False
    rope_scaling: dict = field(default_factory=dict)
    sliding_window: int | None = None
    context_length: int = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value <= 0) and f.name != "context_length":
                raise CompileError(f"config field '{f.name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CompileError(f"config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                               f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CompileError(f"config: head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.context_length <= 0:
            window = self.sliding_window or self.max_position_embeddings
            object.__setattr__(self, "context_length", min(self.max_position_embeddings, window))

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "DecoderConfig":
        """Parse a Hugging Face config.json dict; a missing or malformed field is an error naming it."""
        try:
            return cls(**cls.hf_fields(cfg, source))
        except KeyError as e:
            raise CompileError(f"{source}: missing field {e}") from None
        except (TypeError, ValueError) as e:
            raise CompileError(f"{source}: malformed field ({e})") from None

    @classmethod
    def hf_fields(cls, cfg: dict, source: str) -> dict:
        """The fields every architecture reads alike; subclasses add or override theirs."""
        heads = int(cfg["num_attention_heads"])
        theta, scaling = rope_settings(cfg, source)
        return dict(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                    intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
                    num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                    head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                    rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                    max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)))


def stacked_linear(in_features: int, parts: tuple[int, ...], bias: bool, dtype: str) -> nn.Linear:
    """One nn.Linear for several matrices with the same input; `out_parts` tells the quantization their sizes."""
    linear = nn.Linear(in_features, sum(parts), bias=bias, dtype=dtype)
    linear.out_parts = tuple(parts)
    return linear


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype: str, kv_dtype: str | None = None):
        """kv_dtype: the KV cache's storage (default: dtype); q/k/v go to the cache in it, the output comes
        back in dtype."""
        h, d = cfg.hidden_size, cfg.head_dim
        self.dtype, self.kv_dtype = dtype, kv_dtype or dtype
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.qkv_proj = stacked_linear(h, (self.hq * d, self.hkv * d, self.hkv * d), cfg.attention_bias, dtype)
        self.o_proj = nn.Linear(self.hq * d, h, bias=False, dtype=dtype)

    def heads(self, qkv: Tensor) -> Tensor:
        """[b, s, hq + 2·hkv, d] q/k/v heads before RoPE; architectures with per-head norms apply them here."""
        return qkv

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = self.heads(op.reshape(self.qkv_proj(x), (b, s, self.hq + 2 * self.hkv, self.d)))
        if self.kv_dtype != self.dtype:  # TVM's cache takes q/k/v and gives the output in its own dtype
            qkv = qkv.astype(self.kv_dtype)
        out = kv.attention_with_fused_qkv(layer_id, qkv, self.hq, sm_scale=self.d ** -0.5)
        if self.kv_dtype != self.dtype:
            out = out.astype(self.dtype)
        return self.o_proj(op.reshape(out, (b, s, self.hq * self.d)))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype: str):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = stacked_linear(h, (i, i), False, dtype)
        self.down_proj = nn.Linear(i, h, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(op.tensor_expr_op(silu_mul, "silu_mul", [self.gate_up_proj(x)]))


def silu_mul(gate_up: te.Tensor) -> te.Tensor:
    """SwiGLU's silu(gate)·up from the stacked gate/up output [..., 2i] -> [..., i], the sigmoid's exp as
    arithmetic (trit_tvm.fastmath: relax's silu becomes one libm call per element on CPUs)."""
    *lead, width = gate_up.shape
    half = width // 2

    def value(*i):
        gate = gate_up[i].astype("float32")
        up = gate_up[tuple(i[:-1]) + (i[-1] + half,)].astype("float32")
        return (gate / (1.0 + fastmath.exp(-gate)) * up).astype(gate_up.dtype)
    return te.compute(tuple(lead) + (half,), value, name="silu_mul")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype: str, attention: type[Attention], kv_dtype: str):
        self.self_attn = attention(cfg, dtype, kv_dtype)
        self.mlp = MLP(cfg, dtype)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    """nn.Embedding whose lookup clamps ids instead of TVM's default "fast" take, which prints a warning at
    every build (ids are range-checked before they reach the model, so clamping never changes one)."""

    def forward(self, x: Tensor) -> Tensor:
        return op.wrap_nested(relax.op.take(self.weight._expr, x._expr, axis=0, mode="clip"), "take")


class DecoderModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype: str, embed_dtype: str, attention: type[Attention], kv_dtype: str):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=embed_dtype)
        self.layers = nn.ModuleList([DecoderLayer(cfg, dtype, attention, kv_dtype)
                                     for _ in range(cfg.num_hidden_layers)])
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


class DecoderForCausalLM(nn.Module):
    """The compiled model's interface: embed → prefill/decode (last position's logits) or score (every
    position's) with a paged KV cache → float32 logits.
    Subclasses set `attention` to their attention module."""

    attention: type[Attention] = Attention

    def __init__(self, cfg: DecoderConfig, dtype: str, target, embed_dtype: str | None = None,
                 kv_dtype: str | None = None):
        """embed_dtype: storage of the [vocab, hidden] matrices (default: dtype). The biggest tensors of a
        small model; kept 16-bit where the checkpoint is, and widened inside the kernels that read them.
        kv_dtype: the KV cache's storage (default: dtype); float16 halves the bytes a decode step reads from
        a long context."""
        self.cfg, self.dtype, self.target = cfg, dtype, target
        self.kv_dtype = kv_dtype or dtype
        embed_dtype = embed_dtype or dtype
        self.model = DecoderModel(cfg, dtype, embed_dtype, self.attention, self.kv_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                                                     dtype=embed_dtype)

    def _logits(self, h: Tensor) -> Tensor:
        """h @ Wᵀ read straight from the [vocab, hidden] matrix (no transposed copy of it per call), or by the
        head's own trit operator when the checkpoint quantized it (--quantize-head)."""
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            logits = self.lm_head(h)
            return logits if logits.dtype == "float32" else logits.astype("float32")
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

    def score(self, input_embed: Tensor, kv: PagedKVCache):
        """A prefill that returns the logits of every position (perplexity: trit-eval)."""
        return self._logits(self.model(input_embed, kv)), kv

    def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size):
        c = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=0,
            layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]), num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim, v_head_dim=c.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_theta, rope_scaling=dict(c.rope_scaling),
            rope_ext_factors=relax.prim_value(0), rotary_dim=c.head_dim, enable_disaggregation=False,
            dtype=self.kv_dtype, target=self.target)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, packed = self.cfg.hidden_size, {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        return nn.spec.ModuleSpec.from_raw({
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], self.dtype), "kv": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, h], self.dtype), "kv": kv, "$": packed},
            "score": {"input_embed": nn.spec.Tensor([1, "seq_len", h], self.dtype), "kv": kv, "$": packed},
            "create_tir_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int,
                                          "prefill_chunk_size": int, "page_size": int,
                                          "$": {"param_mode": "none", "effect_mode": "none"}},
        }, self)
