"""trit checkpoint (or HF checkpoint or GGUF file, quantized on the fly) → compiled artifact dir.

Artifact dir:
  model.so            the compiled Relax VM library for the target (host code + device code)
  params.safetensors  parameters in the order the VM expects: the packed trits in the kernels' run-time
                      layout (docs/FORMAT.md#run-time-layout: rows interleaved; on CPUs 16-bit words of
                      whole weights, 11% more bytes than the checkpoint at d=3), kept tensors in the
                      target's model dtype
  manifest.json       target, weight layout, formats, architecture and config, input hash, byte counts
  tokenizer files     copied from the source when present
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tvm

from codec.checkpoint import MANIFEST as TRIT_MANIFEST
from codec.atomic import atomic_output_dir
from codec.checkpoint import DTYPE_NAMES, HEAD, TritCheckpoint, copy_side_files, load_trit_checkpoint, \
    sha256_file, write_trit_checkpoint
from codec.errors import read_json
from codec.format import CODEBOOK, CODES, SCALES
from codec.gguf_source import is_gguf
from codec.safetensors_io import ShardWriter, dtype_name, from_float, to_float32
from schedules import is_trit_decode_matmul
from schedules.base import kernel_key

from .attention_cpu import use_cpu_attention
from .artifact import (ARTIFACT_FORMAT, ARTIFACT_MANIFEST, ARTIFACT_VERSION, KV_CACHE_DTYPES, LIBRARY,
                       PARAMS)
from .errors import CompileError
from .models import Architecture, DecoderConfig, architecture_of, source_names
from .operator import WeightLayout, layout_for_target
from .pipeline import trit_pipeline
from .quantization import DepthOf, ParamSource, RowBlock, TritQuantizer, uniform_depth
from .targets import host_arch, target_arch, target_device_kind, target_to_json
from .tuning import DEFAULT_LOGS, apply_records_pass, logs_dir
from .variant_tuning import load_choices

log = logging.getLogger("trit")

Stage = Callable[[str], None]
EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")




def model_dtype_for(target: tvm.target.Target) -> str:
    """Activations and kept tensors: float16 on GPUs, float32 on CPUs (no fast fp16 math there)."""
    return "float16" if target_device_kind(target) == "cuda" else "float32"


def checkpoint_depths(ckpt: TritCheckpoint) -> DepthOf:
    """The depth of each quantized tensor of the checkpoint, or its row blocks (None: kept); a tensor the model
    needs that the checkpoint lacks altogether is an error naming it."""
    quantized, kept = ckpt.manifest["quantized"], ckpt.manifest["kept"]

    def depth_of(name: str) -> int | tuple[RowBlock, ...] | None:
        if name in ckpt.row_blocks:
            return tuple(RowBlock(b, int(quantized[b]["shape"][0]), int(quantized[b]["depth"]),
                                  np.asarray(ckpt.packed(b, (CODEBOOK,))[CODEBOOK]).tobytes())
                         for b in ckpt.row_blocks[name])
        if name in quantized:
            return int(quantized[name]["depth"])
        if name in kept:
            return None
        raise CompileError(f"{ckpt.path}: tensor '{name}' is missing from {TRIT_MANIFEST}")
    return depth_of


def _input_hash(ckpt: TritCheckpoint) -> str:
    """sha256 over the trit manifest (which pins every shard's sha256) and config.json."""
    h = hashlib.sha256((ckpt.path / TRIT_MANIFEST).read_bytes())
    cfg = ckpt.path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    return h.hexdigest()


def embed_dtype_for(ckpt: TritCheckpoint, target: tvm.target.Target) -> str:
    """16-bit embeddings stay 16-bit on CPUs (half the bytes the logits read per token); else model dtype."""
    stored = ckpt.manifest["kept"].get("model.embed_tokens.weight", {}).get("dtype")
    if target_device_kind(target) == "cpu" and stored in ("F16", "BF16"):
        return next(name for name, st in DTYPE_NAMES.items() if st == stored)
    return model_dtype_for(target)


def _param_array(ckpt: TritCheckpoint, param: str, source: ParamSource, shape: tuple[int, ...], dtype: str,
                 embed_dtype: str, layout: WeightLayout) -> tuple[np.ndarray, str]:
    """The checkpoint tensor(s) behind one exported parameter (several stacked along rows for stacked
    linears), in the layout and dtype the VM expects."""
    names, suffix = list(source.tensors), source.packed
    if suffix is not None:
        arr = np.concatenate([np.asarray(ckpt.packed(name, (suffix,))[suffix]) for name in names])
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
        raise CompileError(f"{ckpt.path}: tensor '{' + '.join(names)}' has shape {list(arr.shape)}, the model "
                           f"config needs {list(shape)} for {param}")
    return arr, st


def open_model(model: Path, workdir: Path, depth: int, mode: str, stage: Stage,
               quantize_head: bool = False) -> TritCheckpoint:
    """A trit checkpoint as is, or a Hugging Face checkpoint dir or GGUF file quantized into workdir first."""
    model = Path(model)
    if (model / TRIT_MANIFEST).exists():
        ckpt = load_trit_checkpoint(model)
        if quantize_head and HEAD not in ckpt.manifest["quantized"]:
            raise CompileError(f"{model}: --quantize-head: this trit checkpoint keeps its head in 16 bits "
                               "(re-quantize it with trit-quantize --quantize-head)")
        return ckpt
    if not is_gguf(model):
        if not (model / "config.json").exists():
            raise CompileError(f"{model}: neither a trit checkpoint ({TRIT_MANIFEST}), a Hugging Face checkpoint "
                               "(config.json) nor a GGUF file")
        architecture_of(read_json(model / "config.json"), str(model / "config.json"))
    stage(f"quantizing {model} at depth {depth} ({mode})" + (", head at depth 4" if quantize_head else ""))
    write_trit_checkpoint(model, workdir / "trit", depth=depth, mode=mode, quantize_head=quantize_head)
    return load_trit_checkpoint(workdir / "trit")


@dataclass
class ExportedModel:
    """A model imported into Relax: the module, its parameters in VM order, and how to fill them."""
    mod: tvm.ir.IRModule
    named_params: list
    layout: WeightLayout
    dtype: str
    quantizer: TritQuantizer
    kv_cache_dtype: str


def export_model(arch: Architecture, cfg: DecoderConfig, depth_of: DepthOf, target: tvm.target.Target,
                 embed_dtype: str | None = None, int8_activations: bool = False,
                 kv_cache_dtype: str | None = None) -> ExportedModel:
    """The architecture's plain model, its linears swapped for trit operators per depth_of, as Relax;
    int8_activations: the operators quantize their inputs to 8 bits per group of 16 (WeightLayout);
    kv_cache_dtype: the KV cache's storage (default: the model dtype)."""
    dtype = model_dtype_for(target)
    layout = layout_for_target(target, int8_activations)
    quantizer = TritQuantizer(depth_of, layout, source_names)
    model = quantizer.visit("", arch.model(cfg, dtype, target, embed_dtype, kv_cache_dtype))
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    if target_device_kind(target) == "cpu":
        mod = use_cpu_attention(mod, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim,
                                kv_cache_dtype or dtype, cfg.rope_theta, cfg.rope_scaling)
    return ExportedModel(mod, named_params, layout, dtype, quantizer, kv_cache_dtype or dtype)


def build_library(arch: Architecture, cfg: DecoderConfig, depth_of: DepthOf, target: tvm.target.Target,
                  embed_dtype: str | None = None, tuning_logs: Path | None = DEFAULT_LOGS,
                  stage: Stage = log.info, int8_activations: bool = False, kv_cache_dtype: str | None = None) -> dict:
    """Relax import + compile for `target`: {exe, exported, tuned, n_trit, compile_s}.
    Tuning records under tuning_logs/<target key>/ schedule the kernels they match; hand rules do the rest."""
    exported = export_model(arch, cfg, depth_of, target, embed_dtype, int8_activations, kv_cache_dtype)
    stage(f"imported {arch.name} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) into Relax, "
          f"{exported.dtype}, weights as {exported.layout.name}, {exported.layout.activations} activations")
    n_trit = sum(1 for f in exported.mod.functions.values() if is_trit_decode_matmul(f))
    records = logs_dir(tuning_logs, target) if tuning_logs is not None else None
    choices = load_choices(records)
    tuned = [gv.name_hint for gv, f in exported.mod.functions.items()
             if is_trit_decode_matmul(f) and kernel_key(f) in choices]
    stage(f"compiling for {target.kind.name} ({n_trit} trit_decode_matmul kernels"
          + (f"; tuning records from {records}" if records is not None and records.exists() else "") + ")")
    t0 = time.perf_counter()
    with target:
        pipeline = trit_pipeline(target, apply_records_pass(records, tuned), choices)
        exe = tvm.compile(exported.mod, target, relax_pipeline=pipeline)
    return {"exe": exe, "exported": exported, "tuned": tuned, "n_trit": n_trit,
            "compile_s": time.perf_counter() - t0}


CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-g++", "apt-get install g++-aarch64-linux-gnu")}


def _cross_compiler(target: tvm.target.Target) -> tuple[str, str] | None:
    """(compiler, how to install it) when the target's host code is for another CPU architecture."""
    arch = target_arch(target)
    return CROSS_COMPILERS.get(arch) if arch != host_arch() else None


def check_toolchain(target: tvm.target.Target) -> None:
    """The cross compiler a target's library needs, checked before minutes of compiling."""
    cross = _cross_compiler(target)
    if cross is not None and shutil.which(cross[0]) is None:
        raise CompileError(f"--target {target_arch(target)} needs the cross compiler {cross[0]}, which is not on "
                           f"PATH (install it: {cross[1]})")


def export_library(exe, target: tvm.target.Target, path: Path) -> None:
    """model.so for the target's host: cross-compiled with aarch64-linux-gnu-g++ for aarch64."""
    cross = _cross_compiler(target)
    fcompile = None
    if cross is not None:
        from tvm.support import cc
        fcompile = cc.cross_compiler(cross[0])
    exe.export_library(str(path), fcompile=fcompile)


def _manifest(target: tvm.target.Target, arch: Architecture, cfg: DecoderConfig, built: dict, **fields) -> dict:
    """The artifact manifest: what it runs on, the model it is, and the build's own facts."""
    exported = built["exported"]
    return {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION,
            "target": target_to_json(target), "target_kind": target.kind.name,
            "device": target_device_kind(target), "arch": target_arch(target),
            "architecture": arch.name, "config": asdict(cfg), "context_length": cfg.context_length,
            "model_dtype": exported.dtype, "kv_cache_dtype": exported.kv_cache_dtype,
            "weight_layout": exported.layout.name,
            "activations": exported.layout.activations,
            "params": [n for n, _ in exported.named_params], **fields,
            "trit_kernels": built["n_trit"], "tuned_kernels": built["tuned"],
            "compile_seconds": round(built["compile_s"], 2)}


def compile_model(model: Path, target: tvm.target.Target, out_dir: Path, depth: int = 3, mode: str = "mse",
                  force: bool = False, stage: Stage = log.info, tuning_logs: Path | None = DEFAULT_LOGS,
                  quantize_head: bool = False, int8_activations: bool = False,
                  kv_cache_dtype: str | None = None) -> dict:
    """Build the artifact dir for `target` from a trit checkpoint, HF checkpoint or GGUF file; returns its
    manifest. quantize_head: quantize an HF/GGUF source's output head too (a trit checkpoint must have it).
    int8_activations: the linears quantize their inputs to 8 bits per group of 16 (integer dot products on
    CPUs with AVX-512 VNNI; otherwise the same numbers in float). kv_cache_dtype: float16 or float32 storage
    of the KV cache (default: the model dtype, float32 on CPUs, float16 on GPUs)."""
    if Path(out_dir).exists() and not force:  # before minutes of work, not after
        raise CompileError(f"{out_dir}: output directory exists (use --force to replace it)")
    if int8_activations and target.kind.name != "llvm":
        raise CompileError(f"--int8-activations: for CPU targets (llvm, aarch64), not {target.kind.name}: the "
                           "GPU kernels have no int8 form")
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise CompileError(f"--kv-cache-dtype: one of {', '.join(KV_CACHE_DTYPES)}, not "
                           f"{kv_cache_dtype!r}")
    if kv_cache_dtype == "float32" and model_dtype_for(target) == "float16":
        raise CompileError(f"--kv-cache-dtype float32: {target.kind.name} builds compute in float16; the cache "
                           "takes the model's dtype or float16")
    check_toolchain(target)
    with tempfile.TemporaryDirectory(prefix="trit-compile-") as work:
        ckpt = open_model(model, Path(work), depth, mode, stage, quantize_head)
        config = ckpt.config
        if HEAD in ckpt.manifest["quantized"]:  # a head of its own, even where the source tied it to the embedding
            config = {**config, "tie_word_embeddings": False}
        arch, cfg = architecture_of(config, str(ckpt.path / "config.json"))
        embed_dtype = embed_dtype_for(ckpt, target)
        built = build_library(arch, cfg, checkpoint_depths(ckpt), target, embed_dtype, tuning_logs, stage,
                              int8_activations, kv_cache_dtype)
        exported = built["exported"]
        with atomic_output_dir(out_dir, force) as tmp:
            stage("exporting library and parameters")
            export_library(built["exe"], target, tmp / LIBRARY)
            writer = ShardWriter(tmp / PARAMS)
            resident = {"trit": 0, "kept": 0}
            for param, p in exported.named_params:
                source = exported.quantizer.source(param)
                arr, st = _param_array(ckpt, param, source, tuple(int(s) for s in p.shape), exported.dtype,
                                       embed_dtype, exported.layout)
                writer.add(param, arr, st)
                resident["trit" if source.packed else "kept"] += arr.nbytes
            writer.close()
            copy_side_files(ckpt.path, tmp)
            params_sha256 = sha256_file(tmp / PARAMS)
            manifest = _manifest(target, arch, cfg, built, embedding_dtype=embed_dtype,
                                 trit_format_version=ckpt.manifest["format_version"],
                                 codec_mode=ckpt.manifest["codec_mode"],
                                 depth=ckpt.manifest["depth"], input_hash=_input_hash(ckpt),
                                 params_sha256=params_sha256,
                                 resident_trit_bytes=resident["trit"], resident_kept_bytes=resident["kept"],
                                 packed_checkpoint_bytes=ckpt.packed_bytes())
            (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def compile_shape_only(hf_config: dict, depth: int, target: tvm.target.Target, out_dir: Path,
                       force: bool = False, stage: Stage = log.info) -> dict:
    """An artifact without weights, for benchmarks at real model sizes: the library and a manifest whose
    `param_shapes` say what to fill (TritModel(..., params=...)). depth 0: dense linears in the model
    dtype (the same pipeline's dense baseline)."""
    arch, cfg = architecture_of(hf_config)
    check_toolchain(target)
    built = build_library(arch, cfg, uniform_depth(depth), target, stage=stage)
    params = built["exported"].named_params
    with atomic_output_dir(out_dir, force) as tmp:
        export_library(built["exe"], target, tmp / LIBRARY)
        manifest = _manifest(target, arch, cfg, built, embedding_dtype=built["exported"].dtype, depth=depth,
                             param_shapes=[[int(s) for s in p.shape] for _, p in params],
                             param_dtypes=[str(p.dtype) for _, p in params])
        (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
