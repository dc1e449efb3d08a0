"""trit checkpoint (or HF checkpoint, quantized on the fly) → compiled artifact dir.

Artifact dir:
  model.so            the compiled Relax VM library for the target (host code + device code)
  params.safetensors  parameters in the order the VM expects: the packed trits in the kernels' layout
                      (docs/FORMAT.md: 32 rows interleaved; on CPUs digit planes paired into base-9
                      words; the same bytes count), kept tensors in the target's
                      model dtype
  manifest.json       target, weight layout, formats, model config, input hash, byte counts
  tokenizer files     copied from the source when present
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import tvm

from codec.checkpoint import MANIFEST as TRIT_MANIFEST
from codec.checkpoint import DTYPE_NAMES, FORMAT_VERSION, TritCheckpoint, atomic_output_dir, copy_side_files, \
    load_trit_checkpoint, write_trit_checkpoint
from codec.errors import read_json
from codec.format import CODES, SCALES
from codec.safetensors_io import ShardWriter, dtype_name, from_float, to_float32

from .attention_cpu import use_cpu_prefill_attention
from .artifact import ARTIFACT_FORMAT, ARTIFACT_MANIFEST, ARTIFACT_VERSION, LIBRARY, PARAMS
from .errors import CompileError
from .model import Qwen2Config, TritQwen2ForCausalLM, checkpoint_tensor_names
from .operator import WeightLayout, layout_for_target
from .pipeline import trit_pipeline
from .targets import target_arch, target_device_kind, target_to_json
from .tuning import DEFAULT_LOGS, apply_records_pass, logs_dir

log = logging.getLogger("trit")

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LINEAR_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

Stage = Callable[[str], None]


def model_dtype_for(target: tvm.target.Target) -> str:
    """Activations and kept tensors: float16 on GPUs, float32 on CPUs (no fast fp16 math there)."""
    return "float16" if target_device_kind(target) == "cuda" else "float32"


def _layer_depths(ckpt: TritCheckpoint, cfg: Qwen2Config) -> list[dict[str, int]]:
    quantized = ckpt.manifest["quantized"]
    depths = []
    for i in range(cfg.num_hidden_layers):
        layer = {}
        for lin in LINEAR_NAMES:
            name = f"model.layers.{i}.{_LINEAR_PARENT[lin]}.{lin}.weight"
            if name not in quantized:
                raise CompileError(f"{ckpt.path}: quantized tensor '{name}' is missing from {TRIT_MANIFEST}")
            layer[lin] = quantized[name]["depth"]
        depths.append(layer)
    return depths


def _input_hash(ckpt: TritCheckpoint) -> str:
    """sha256 over the trit manifest (which pins every shard's sha256) and config.json."""
    h = hashlib.sha256((ckpt.path / TRIT_MANIFEST).read_bytes())
    cfg = ckpt.path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    return h.hexdigest()


EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def embed_dtype_for(ckpt: TritCheckpoint, target: tvm.target.Target) -> str:
    """16-bit embeddings stay 16-bit on CPUs (half the bytes the logits read per token); else model dtype."""
    stored = ckpt.manifest["kept"].get("model.embed_tokens.weight", {}).get("dtype")
    if target_device_kind(target) == "cpu" and stored in ("F16", "BF16"):
        return next(name for name, st in DTYPE_NAMES.items() if st == stored)
    return model_dtype_for(target)


def _param_array(ckpt: TritCheckpoint, param: str, shape: tuple[int, ...], dtype: str, embed_dtype: str,
                 layout: WeightLayout) -> tuple[np.ndarray, str]:
    """The checkpoint tensor(s) behind one exported parameter (several stacked along rows for qkv_proj and
    gate_up_proj), in the layout and dtype the VM expects."""
    names, suffix = checkpoint_tensor_names(param)
    if suffix is not None:
        arr = np.concatenate([np.asarray(ckpt.packed(name)[suffix]) for name in names])
        info = ckpt.manifest["quantized"][names[0]]
        n_in = int(info["shape"][1])
        if suffix == CODES:
            arr = layout.repack_codes(arr, n_in)
        elif suffix == SCALES:
            arr = layout.repack_scales(arr, n_in, int(info["depth"]))
        else:
            arr = layout.repack_codebook(arr)
        st = dtype_name(arr)
    else:
        missing = [name for name in names if name not in ckpt.manifest["kept"]]
        if missing:
            raise CompileError(f"{ckpt.path}: tensor '{missing[0]}' is missing (needed by the {param} parameter)")
        st = DTYPE_NAMES[embed_dtype if names[0] in EMBEDDING_TENSORS else dtype]
        parts = []
        for name in names:
            stored, st_dtype = ckpt.kept(name)
            parts.append(stored if st == st_dtype else from_float(to_float32(stored, st_dtype), st))
        arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if tuple(arr.shape) != tuple(shape):
        what = names[0] if len(names) == 1 else " + ".join(names)
        raise CompileError(f"{ckpt.path}: tensor '{what}' has shape {list(arr.shape)}, the model config needs "
                           f"{list(shape)} for {param}")
    return arr, st


def open_model(model_dir: Path, workdir: Path, depth: int, mode: str, stage: Stage) -> TritCheckpoint:
    """A trit checkpoint as is, or a Hugging Face checkpoint quantized into workdir first."""
    model_dir = Path(model_dir)
    if (model_dir / TRIT_MANIFEST).exists():
        return load_trit_checkpoint(model_dir)
    if not (model_dir / "config.json").exists():
        raise CompileError(f"{model_dir}: neither a trit checkpoint ({TRIT_MANIFEST}) nor a Hugging Face "
                           "checkpoint (config.json)")
    Qwen2Config.from_hf(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    stage(f"quantizing {model_dir} at depth {depth} ({mode})")
    write_trit_checkpoint(model_dir, workdir / "trit", depth=depth, mode=mode)
    return load_trit_checkpoint(workdir / "trit")


def export_model(cfg: Qwen2Config, layer_depths: list[dict[str, int]], target: tvm.target.Target,
                 embed_dtype: str | None = None):
    """The Relax module of the model for `target` -> (module, named params, weight layout, model dtype)."""
    dtype = model_dtype_for(target)
    layout = layout_for_target(target)
    model = TritQwen2ForCausalLM(cfg, layer_depths, dtype, target, layout, embed_dtype)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    if target_device_kind(target) == "cpu":
        mod = use_cpu_prefill_attention(mod, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, dtype)
    return mod, named_params, layout, dtype


def build_library(cfg: Qwen2Config, layer_depths: list[dict[str, int]], target: tvm.target.Target,
                  embed_dtype: str | None = None, tuning_logs: Path | None = DEFAULT_LOGS,
                  stage: Stage = log.info) -> dict:
    """Relax import + compile for `target`: {exe, named_params, layout, dtype, tuned, n_trit, compile_s}.
    Tuning records under tuning_logs/<target key>/ schedule the kernels they match; hand rules do the rest."""
    mod, named_params, layout, dtype = export_model(cfg, layer_depths, target, embed_dtype)
    stage(f"imported Qwen2 ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) into Relax, {dtype}, "
          f"weights as {layout.name}")
    n_trit = sum(1 for gv, f in mod.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "trit.op" in f.attrs)
    records = logs_dir(tuning_logs, target) if tuning_logs is not None else None
    tuned: list[str] = []
    stage(f"compiling for {target.kind.name} ({n_trit} trit_decode_matmul kernels"
          + (f"; tuning records from {records}" if records is not None and records.exists() else "") + ")")
    t0 = time.perf_counter()
    with target:
        exe = tvm.compile(mod, target, relax_pipeline=trit_pipeline(target, apply_records_pass(records, tuned)))
    return {"exe": exe, "named_params": named_params, "layout": layout, "dtype": dtype, "tuned": tuned,
            "n_trit": n_trit, "compile_s": time.perf_counter() - t0}


def export_library(exe, target: tvm.target.Target, path: Path) -> None:
    """model.so for the target's host: cross-compiled with aarch64-linux-gnu-g++ for aarch64."""
    fcompile = None
    if target_arch(target) == "aarch64":
        from tvm.support import cc
        fcompile = cc.cross_compiler("aarch64-linux-gnu-g++")
    exe.export_library(str(path), fcompile=fcompile)


def _target_fields(target: tvm.target.Target) -> dict:
    return {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION,
            "target": target_to_json(target), "target_kind": target.kind.name,
            "device": target_device_kind(target), "arch": target_arch(target)}


def compile_model(model_dir: Path, target: tvm.target.Target, out_dir: Path, depth: int = 3, mode: str = "mse",
                  force: bool = False, stage: Stage = log.info, tuning_logs: Path | None = DEFAULT_LOGS) -> dict:
    """Build the artifact dir for `target`; returns its manifest."""
    with tempfile.TemporaryDirectory(prefix="trit-compile-") as work:
        ckpt = open_model(model_dir, Path(work), depth, mode, stage)
        cfg = Qwen2Config.from_hf(ckpt.config, str(ckpt.path / "config.json"))
        embed_dtype = embed_dtype_for(ckpt, target)
        built = build_library(cfg, _layer_depths(ckpt, cfg), target, embed_dtype, tuning_logs, stage)
        named_params, layout, dtype = built["named_params"], built["layout"], built["dtype"]
        with atomic_output_dir(out_dir, force) as tmp:
            stage("exporting library and parameters")
            export_library(built["exe"], target, tmp / LIBRARY)
            writer = ShardWriter(tmp / PARAMS)
            resident = {"trit": 0, "kept": 0}
            for param, p in named_params:
                arr, st = _param_array(ckpt, param, tuple(int(s) for s in p.shape), dtype, embed_dtype, layout)
                writer.add(param, arr, st)
                resident["trit" if checkpoint_tensor_names(param)[1] else "kept"] += arr.nbytes
            writer.close()
            copy_side_files(ckpt.path, tmp)
            manifest = {
                **_target_fields(target),
                "model_dtype": dtype, "embedding_dtype": embed_dtype, "weight_layout": layout.name,
                "trit_format_version": FORMAT_VERSION,
                "codec_mode": ckpt.manifest["codec_mode"], "depth": ckpt.manifest["depth"],
                "config": asdict(cfg), "input_hash": _input_hash(ckpt),
                "params": [n for n, _ in named_params],
                "resident_trit_bytes": resident["trit"], "resident_kept_bytes": resident["kept"],
                "packed_checkpoint_bytes": ckpt.packed_bytes(),
                "trit_kernels": built["n_trit"], "tuned_kernels": built["tuned"],
                "compile_seconds": round(built["compile_s"], 2),
            }
            (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def compile_shape_only(cfg: Qwen2Config, depth: int, target: tvm.target.Target, out_dir: Path,
                       force: bool = False, stage: Stage = log.info) -> dict:
    """An artifact without weights, for benchmarks at real model sizes: the library and a manifest whose
    `param_shapes` say what to fill (TritModel(..., params=...)). depth 0: dense linears in the model
    dtype (the same pipeline's dense baseline)."""
    depths = [dict.fromkeys(LINEAR_NAMES, depth) for _ in range(cfg.num_hidden_layers)]
    built = build_library(cfg, depths, target, stage=stage)
    with atomic_output_dir(out_dir, force) as tmp:
        export_library(built["exe"], target, tmp / LIBRARY)
        manifest = {
            **_target_fields(target), "model_dtype": built["dtype"], "embedding_dtype": built["dtype"],
            "weight_layout": built["layout"].name, "depth": depth, "config": asdict(cfg),
            "params": [n for n, _ in built["named_params"]],
            "param_shapes": [[int(s) for s in p.shape] for _, p in built["named_params"]],
            "param_dtypes": [str(p.dtype) for _, p in built["named_params"]],
            "trit_kernels": built["n_trit"], "tuned_kernels": built["tuned"],
            "compile_seconds": round(built["compile_s"], 2),
        }
        (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
