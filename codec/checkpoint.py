"""Trit checkpoint directories: write (quantize or recover), load with checksum checks, dequantize.

A trit checkpoint dir holds config.json and the tokenizer files of its source, packed and kept tensors
in safetensors shards, and the manifest trit.json (docs/FORMAT.md). Every output is built in a hidden
temporary sibling dir and renamed into place at the end, so a failure never leaves half a checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .atomic import atomic_output_dir
from .errors import CodecError, read_json
from .format import CODEBOOK, CODES, SCALES, bits_per_weight, pack_matrix, packed_bits, unpack_matrix
from .calibration import Calibration, collect_hessians, read_text
from .gguf_source import hf_source
from .gptq import descend, gptq_depths, gptq_matrix, output_error_rows
from .mixed import allocate, check_budget, parse_overrides, pinned_depths
from .norm_tuning import tune_norms
from .quantize import CODEBOOK_SIZE, DEPTHS, GROUP_SIZE, QuantizedMatrix, quantize_matrix
from .recover import dequantize_as, recover_matrix
from .row_blocks import (allocate_rows, block_budget, block_name, channel_orders, codebook_bits, columns_are_channels,
                         mlp_of, rows_are_channels, runs, take_rows, units_by)
from .safetensors_io import (FLOAT_DTYPES, SafetensorsFile, ShardWriter, from_float, iter_checkpoint_files,
                             to_float32)

FORMAT_NAME = "trit-checkpoint"
FORMAT_VERSION = 1
ROW_BLOCKS_VERSION = 2  # written when a matrix is stored as row blocks (the `row_blocks` field); read: 1 and 2
MANIFEST = "trit.json"
DEFAULT_SHARD_BYTES = 2 << 30
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json", MANIFEST)
_KEPT_NAME_PARTS = ("embed", "lm_head", "norm")
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
HEAD_DEPTH = 4  # --quantize-head: the output head as trits at this depth (data-free mse)
DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}

Progress = Callable[[str, int], None]  # (tensor name, number of elements done)


def is_quantized_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Every 2-D linear weight; embeddings, lm_head and norms are kept (reference.md)."""
    return (len(shape) == 2 and name.endswith(".weight")
            and not any(p in name for p in _KEPT_NAME_PARTS))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_source(src: Path) -> tuple[dict, list[SafetensorsFile]]:
    """config.json and the validated safetensors files of a Hugging Face checkpoint dir."""
    src = Path(src)
    if not src.is_dir():
        raise CodecError(f"{src}: not a directory")
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise CodecError(f"{src}: missing config.json (not a Hugging Face checkpoint dir)")
    return read_json(cfg_path), [SafetensorsFile(p) for p in iter_checkpoint_files(src)]


def copy_side_files(src: Path, dst: Path) -> None:
    """config.json, tokenizer and generation files: everything that is not weights."""
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and not any(p.match(pat) for pat in _WEIGHT_FILES):
            shutil.copy2(p, dst / p.name)


class _ShardedOutput:
    """Rolls safetensors shards at a size limit; remembers which shard holds each tensor."""

    def __init__(self, root: Path, prefix: str, limit: int):
        self.root, self.prefix, self.limit = root, prefix, limit
        self.files: list[str] = []
        self.location: dict[str, str] = {}
        self._writer: ShardWriter | None = None

    def add(self, name: str, array: np.ndarray, dtype: str | None = None) -> None:
        self.add_together({name: array}, dtype)

    def add_together(self, arrays: dict[str, np.ndarray], dtype: str | None = None) -> None:
        """Tensors that must share a shard (a matrix's packed arrays: trit.json names one shard per matrix)."""
        nbytes = sum(a.nbytes for a in arrays.values())
        if self._writer is not None and self._writer.nbytes and self._writer.nbytes + nbytes > self.limit:
            self._close()
        if self._writer is None:
            self.files.append(f"{self.prefix}-{len(self.files) + 1:05d}.safetensors")
            self._writer = ShardWriter(self.root / self.files[-1])
        for name, array in arrays.items():
            self._writer.add(name, array, dtype)
            self.location[name] = self.files[-1]

    def _close(self) -> None:
        self._writer.close({"format": "pt"})
        self._writer = None

    def finish(self) -> list[str]:
        if self._writer is not None:
            self._close()
        return self.files


def _source_tensors(files: list[SafetensorsFile]) -> Iterator[tuple[str, SafetensorsFile]]:
    seen: set[str] = set()
    for f in files:
        for name in f.keys():
            if name in seen:
                raise CodecError(f"{f.path}: tensor '{name}' appears in more than one shard")
            seen.add(name)
            yield name, f


@dataclass
class QuantizePlan:
    """How each matrix is quantized: depth (uniform, or per tensor when `depths` is set), the data-free mode,
    or GPTQ with calibration Hessians; `record` is what trit.json notes about it."""
    depth: int = 3
    mode: str = "mse"
    depths: dict[str, int] | None = None
    hessians: dict[str, np.ndarray] | None = None
    record: dict | None = None
    bpw: float | None = None
    output_grad_sq: dict[str, np.ndarray] | None = None
    quantize_head: bool = False
    measured: "MeasuredDepths | None" = None
    results: dict[str, list] | None = None  # matrices quantized ahead of the writing (norm tuning)
    kept_values: dict[str, np.ndarray] | None = None  # kept tensors' values in place of the source's (tuned norms)
    row_blocks: bool = False
    row_depths: dict[str, np.ndarray] | None = None  # --row-blocks: each row's depth, rows in their written order
    channel_orders: dict[str, np.ndarray] | None = None  # --row-blocks: MLP -> its source channels in written order

    def depth_of(self, name: str) -> int:
        if self.row_depths is not None and name in self.row_depths:
            return int(self.row_depths[name][0])
        return self.depths[name] if self.depths is not None else self.depth

    def quantize(self, w: np.ndarray, name: str) -> list[tuple[int, QuantizedMatrix]]:
        """The matrix quantized as its row blocks, (first row, matrix) each: one block unless --row-blocks."""
        if self.results is not None and name in self.results:
            return self.results[name]
        if self.row_depths is not None and name in self.row_depths:
            return self._quantize_rows(w, name)
        return [(0, self._quantize_whole(w, name))]

    def _quantize_rows(self, w: np.ndarray, name: str) -> list[tuple[int, QuantizedMatrix]]:
        """--row-blocks: rows in their written order, each run of one depth from that depth's measured (GPTQ and
        descended) result; down_proj with its columns in the channels' order, quantized again (GPTQ's static
        groups are runs of 16 columns)."""
        order = self.channel_orders.get(mlp_of(name))
        if columns_are_channels(name):  # measured as swept (_row_block_results)
            if order is None:
                return [(0, descend(w, self.measured.get(name, self.depth_of(name)), self.hessians[name]))]
            h = self.hessians[name][np.ix_(order, order)]
            w = w[:, order]
            return [(0, gptq_matrix(w, h, self.depth_of(name), name))]
        if order is None or not rows_are_channels(name):
            order = np.arange(w.shape[0])
        blocks = runs(self.row_depths[name])
        measured = {d: self.measured.get(name, d) for d in {d for _, _, d in blocks}}
        return [(a, take_rows(measured[d], order[a:b])) for a, b, d in blocks]

    def _quantize_whole(self, w: np.ndarray, name: str) -> QuantizedMatrix:
        depth = self.depth_of(name)
        if self.measured is not None and name in self.measured:
            return descend(w, self.measured.get(name, depth), self.hessians[name])
        if self.hessians is not None and name in self.hessians:
            return gptq_matrix(w, self.hessians[name], depth, name)
        return quantize_matrix(w, depth, self.mode, name)


class MeasuredDepths:
    """Each matrix's GPTQ result at every depth, in a temporary directory (not packed: written and read back
    once): mixed depth measures them all to choose, and then writes the chosen one (after `descend`; with
    --row-blocks as _row_block_results keeps them) instead of running its GPTQ sweep again."""

    def __init__(self, root: Path):
        self.root, self.files = root, {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def put(self, name: str, results: dict[int, QuantizedMatrix]) -> None:
        self.files[name] = self.root / f"{len(self.files)}.npz"
        np.savez(self.files[name], **{f"{key}_{d}": arr for d, qm in results.items()
                                      for key, arr in (("codes", qm.codes), ("scales", qm.scale_idx),
                                                       ("codebook", qm.codebook))})

    def get(self, name: str, depth: int) -> QuantizedMatrix:
        with np.load(self.files[name]) as f:
            return QuantizedMatrix(f[f"codes_{depth}"], f[f"scales_{depth}"], f[f"codebook_{depth}"], depth)


def write_trit_checkpoint(src: Path, out: Path, depth: int = 3, mode: str = "mse", recover: bool = False,
                          force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                          progress: Progress | None = None, calibration: Path | Calibration | None = None,
                          samples: int = 32,
                          bpw: float | None = None, tensor_depths: tuple[str, ...] = (),
                          quantize_head: bool = False, norm_epochs: int = 0, row_blocks: bool = False) -> dict:
    """Quantize (or, with recover, decode) a Hugging Face checkpoint dir or a GGUF file into a trit
    checkpoint dir. Streams tensor by tensor; returns the manifest written.

    calibration: a text file; each matrix is quantized by GPTQ against its inputs on that text (samples
    windows of 512 tokens); or statistics already collected from it (codec.calibration.collect_hessians).
    bpw: a depth per matrix by sensitivity under this average packed bits/weight.
    tensor_depths: PATTERN=D overrides (globs on tensor names).
    quantize_head: also write the output head as trits at HEAD_DEPTH, under lm_head.weight (for a tied model
    a quantized copy of the embedding, which stays 16-bit for lookups); decodes read a third of its bytes.
    Off by default: the published layout keeps the head in 16 bits.
    norm_epochs: with calibration, after quantizing every matrix, fit the norm weights to the source model's
    outputs on the calibration text for this many passes (codec.norm_tuning); 0: keep the source's norms.
    row_blocks: with bpw and calibration, a depth per q/k/v head and per MLP channel instead of per matrix
    (codec.row_blocks): such matrices are written as row blocks, the MLP's channels in order of depth."""
    if Path(out).exists() and not force:  # before the work, not after
        raise CodecError(f"{out}: output directory exists (use --force to replace it)")
    if norm_epochs < 0:
        raise CodecError(f"--tune-norms: the number of passes must be at least 1, got {norm_epochs}")
    if norm_epochs and (calibration is None or recover):
        raise CodecError("--tune-norms needs --calibration (the text the norms are fitted on) and no --recover")
    if row_blocks and (bpw is None or calibration is None or recover):
        raise CodecError("--row-blocks needs --bpw and --calibration (rows are allocated by their measured "
                         "output error) and no --recover")
    overrides = parse_overrides(list(tensor_depths))
    if bpw is not None:
        check_budget(bpw)
    if isinstance(calibration, (str, Path)):
        read_text(calibration)  # a bad file fails now, not after converting the source
    with hf_source(src, Path(out)) as hf:
        plan = QuantizePlan(depth, mode, bpw=bpw, quantize_head=quantize_head, row_blocks=row_blocks)
        if calibration is not None and not recover:
            calib = calibration if isinstance(calibration, Calibration) else collect_hessians(
                hf, calibration, samples, progress=_stage_progress(progress, "calibration"),
                output_gradients=bpw is not None)
            plan.hessians, plan.record, plan.output_grad_sq = calib.hessians, calib.settings, calib.output_grad_sq
        with contextlib.ExitStack() as stack:
            if not recover and (bpw is not None or overrides):
                if bpw is not None and plan.hessians is not None:
                    Path(out).parent.mkdir(parents=True, exist_ok=True)
                    plan.measured = MeasuredDepths(Path(stack.enter_context(
                        tempfile.TemporaryDirectory(prefix=".trit-depths-", dir=Path(out).parent))))
                plan.depths = _plan_depths(hf, plan, bpw, overrides, progress)
            if norm_epochs:
                _tune_norms(hf, plan, calib.windows, norm_epochs, progress)
            return _write_trit_checkpoint(hf, out, plan, recover, force, shard_bytes, progress)


def _stage_progress(progress: Progress | None, stage: str):
    return None if progress is None else (lambda done, total: progress(f"{stage} {done}/{total}", 0))


def _tune_norms(src: Path, plan: QuantizePlan, windows: list[list[int]], epochs: int, progress) -> None:
    """Every matrix quantized now (kept in plan.results for the writing), then the norms fitted with them in
    place (codec.norm_tuning); the tuned norms go to plan.kept_values, the settings to trit.json."""
    _, files = read_source(src)
    plan.results = {}
    for name, f in _source_tensors(files):
        if is_quantized_tensor(name, f.tensors[name].shape):
            plan.results[name] = plan.quantize(to_float32(f.read(name), f.tensors[name].dtype), name)
            if progress:
                progress(f"quantize {len(plan.results)} {name}", 0)
    dequantized = {n: np.concatenate([qm.dequantize(np.float32) for _, qm in blocks])
                   for n, blocks in plan.results.items()}  # the MLP's channels reordered alike: the same model
    plan.kept_values, record = tune_norms(src, dequantized, windows, epochs,
                                          progress=_stage_progress(progress, "norm tuning"))
    plan.record = {**plan.record, "norm_tuning": record}


def _plan_depths(src: Path, plan: QuantizePlan, bpw: float | None, overrides: list, progress) -> dict[str, int]:
    """Per-matrix depths: the overrides, and with a budget the sensitivity allocation. Each matrix's error at
    each depth: with calibration, the loss increase Σₒ gₒ (ΔW H ΔWᵀ)ₒₒ of its GPTQ quantization at that
    depth (codec.calibration; all depths in one sweep, kept in plan.measured for the writing); without, its
    squared weight error Σ ΔW² (data-free). With plan.row_blocks the same errors row by row allocate a depth per
    q/k/v head and MLP channel (codec.row_blocks; plan.row_depths and the channels' orders)."""
    config, files = read_source(src)
    weights = {name: f for name, f in _source_tensors(files) if is_quantized_tensor(name, f.tensors[name].shape)}
    pinned = pinned_depths(list(weights), overrides)
    if bpw is None:
        return {name: pinned.get(name, plan.depth) for name in weights}
    errors, row_errors, shapes = {}, {}, {}
    for i, (name, f) in enumerate(weights.items()):
        w = to_float32(f.read(name), f.tensors[name].dtype)
        shapes[name] = tuple(w.shape)
        if plan.hessians is not None and name in plan.hessians:
            h, g = plan.hessians[name], plan.output_grad_sq[name]
            results = gptq_depths(w, h, DEPTHS, name)
            if plan.row_blocks:
                results, rows = _row_block_results(w, h, g, name, results)
            else:
                rows = {d: output_error_rows(w, qm, h) for d, qm in results.items()}
            errors[name] = {d: float(r @ g) for d, r in rows.items()}  # gptq.loss_increase
            row_errors[name] = {d: r * g for d, r in rows.items()}
            if plan.measured is not None:
                plan.measured.put(name, results)
        else:
            w64 = w.astype(np.float64)
            errors[name] = {d: float(np.sum((w64 - quantize_matrix(w, d, plan.mode, name).dequantize(np.float64))
                                            ** 2)) for d in DEPTHS}
        if progress:
            progress(f"sensitivity {i + 1}/{len(weights)} {name}", 0)
    if plan.row_blocks:
        _plan_row_depths(plan, config, row_errors, shapes, bpw, pinned)
        return {n: int(d[0]) for n, d in plan.row_depths.items()}
    return allocate(errors, shapes, bpw, pinned)


ROW_SAMPLE = 4  # --row-blocks: down_proj's descended error estimated on every 4th row


def _row_block_results(w: np.ndarray, h: np.ndarray, g: np.ndarray, name: str, results: dict[int, QuantizedMatrix]
                       ) -> tuple[dict[int, QuantizedMatrix], dict[int, np.ndarray]]:
    """--row-blocks: each depth's GPTQ result as it will be written and its error per row, since rows are chosen by
    the errors they are written with (descended: 1.025x; by the sweep's: 1.033x; depth 4 left as swept: 1.0305x
    against 1.0256x). down_proj is a unit of its own and quantized again when written (its columns in the channels'
    order): its errors are the sweep's, scaled per depth by what the descent gives on every ROW_SAMPLE-th row (the
    same checkpoint's perplexity as from every row's descent, a quarter of the time)."""
    if columns_are_channels(name):
        sample, rows = slice(None, None, ROW_SAMPLE), {}
        for d, qm in results.items():
            swept = output_error_rows(w, qm, h)
            descended = output_error_rows(w[sample], descend(w[sample], take_rows(qm, sample), h), h)
            rows[d] = swept * ((descended @ g[sample]) / max(float(swept[sample] @ g[sample]), 1e-300))
        return results, rows
    results = {d: descend(w, qm, h) for d, qm in results.items()}
    return results, {d: output_error_rows(w, qm, h) for d, qm in results.items()}


def _plan_row_depths(plan: QuantizePlan, config: dict, row_errors: dict, shapes: dict, bpw: float,
                     pinned: dict[str, int]) -> None:
    """--row-blocks: a depth per row (codec.row_blocks), then the MLP channels put in order of depth."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    row_bits = {n: {d: (packed_bits(*s, d) - codebook_bits()) / s[0] for d in DEPTHS} for n, s in shapes.items()}
    depths = allocate_rows(units_by("channels+heads", shapes, head_dim), row_errors, row_bits,
                           block_budget(bpw, shapes, head_dim), pinned)
    orders = plan.channel_orders = channel_orders(depths)
    plan.row_depths = {n: d[orders[mlp_of(n)]] if rows_are_channels(n) and mlp_of(n) in orders else d
                       for n, d in depths.items()}


def _write_trit_checkpoint(src: Path, out: Path, plan: QuantizePlan, recover: bool, force: bool,
                           shard_bytes: int, progress: Progress | None) -> dict:
    config, files = read_source(src)
    quantized: dict[str, dict] = {}
    kept: dict[str, dict] = {}
    sources = dict(_source_tensors(files))
    head_source = HEAD if HEAD in sources else EMBEDDING
    if plan.quantize_head and head_source not in sources:
        raise CodecError(f"{src}: --quantize-head: the model has neither '{HEAD}' nor '{EMBEDDING}'")
    with atomic_output_dir(out, force) as tmp:
        shards = _ShardedOutput(tmp, "model", shard_bytes)

        row_blocks: dict[str, list[str]] = {}

        def add_quantized(name: str, qm: QuantizedMatrix, dtype: str) -> None:
            shards.add_together({f"{name}.{suffix}": arr for suffix, arr in pack_matrix(qm).items()})
            quantized[name] = {"shape": list(qm.shape), "depth": qm.depth, "dtype": dtype,
                               "bits_per_weight": round(bits_per_weight(*qm.shape, qm.depth), 4)}

        def add_blocks(name: str, blocks: list[tuple[int, QuantizedMatrix]], dtype: str) -> None:
            if len(blocks) == 1:
                return add_quantized(name, blocks[0][1], dtype)
            row_blocks[name] = [block_name(name, a, a + qm.shape[0]) for a, qm in blocks]
            for block, (_, qm) in zip(row_blocks[name], blocks):
                add_quantized(block, qm, dtype)

        for name, f in sources.items():
            info = f.tensors[name]
            stored = f.read(name)
            if is_quantized_tensor(name, info.shape):
                if info.dtype not in FLOAT_DTYPES:
                    raise CodecError(f"{f.path}: tensor '{name}' has dtype {info.dtype}; a linear weight must be "
                                     f"one of {', '.join(FLOAT_DTYPES)}")
                if recover:
                    add_quantized(name, recover_matrix(stored, info.dtype, name), info.dtype)
                else:
                    add_blocks(name, plan.quantize(to_float32(stored, info.dtype), name), info.dtype)
            else:
                if plan.kept_values is not None and name in plan.kept_values:
                    stored = from_float(plan.kept_values[name], info.dtype)
                if info.dtype in FLOAT_DTYPES and not np.isfinite(to_float32(stored, info.dtype)).all():
                    raise CodecError(f"{f.path}: tensor '{name}' contains NaN or Inf")
                if plan.quantize_head and name == head_source:
                    add_quantized(HEAD, quantize_matrix(to_float32(stored, info.dtype), HEAD_DEPTH, "mse", name),
                                  info.dtype)
                if not (plan.quantize_head and name == HEAD):
                    shards.add(name, stored, info.dtype)
                    kept[name] = {"shape": list(info.shape), "dtype": info.dtype}
            if progress:
                progress(name, int(np.prod(info.shape)))
        if not quantized:
            raise CodecError(f"{src}: no 2-D linear weights to quantize were found")
        for name, entry in list(quantized.items()) + list(kept.items()):
            entry["shard"] = shards.location[name if name in kept else f"{name}.{CODES}"]
        shard_files = shards.finish()
        copy_side_files(src, tmp)
        depths = sorted({q["depth"] for q in quantized.values()})
        manifest = {
            "format": FORMAT_NAME, "format_version": ROW_BLOCKS_VERSION if row_blocks else FORMAT_VERSION,
            "group_size": GROUP_SIZE,
            "codebook_size": CODEBOOK_SIZE,
            "codec_mode": "recovered" if recover else "gptq" if plan.hessians is not None else plan.mode,
            "depth": depths[0] if len(depths) == 1 else depths,
            "architectures": config.get("architectures", []),
            **({"calibration": plan.record} if plan.record else {}),
            **({"bits_per_weight_budget": plan.bpw} if plan.bpw is not None else {}),
            **({"quantized_head": {"depth": HEAD_DEPTH, "source": head_source}} if plan.quantize_head else {}),
            "quantized": quantized, **({"row_blocks": row_blocks} if row_blocks else {}),
            **({"channel_orders": {mlp: o.tolist() for mlp, o in plan.channel_orders.items()}}
               if plan.channel_orders else {}),
            "kept": kept,
            "shards": {s: {"sha256": sha256_file(tmp / s), "bytes": (tmp / s).stat().st_size} for s in shard_files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class TritCheckpoint:
    """A loaded trit checkpoint: manifest, config and lazily memory-mapped shards."""
    path: Path
    manifest: dict
    config: dict
    _files: dict[str, SafetensorsFile]

    @property
    def quantized_names(self) -> list[str]:
        return list(self.manifest["quantized"])

    @property
    def kept_names(self) -> list[str]:
        return list(self.manifest["kept"])

    @property
    def row_blocks(self) -> dict[str, list[str]]:
        """Matrix name -> the quantized entries of its row blocks, in row order (only matrices stored so)."""
        return self.manifest.get("row_blocks", {})

    @property
    def matrix_names(self) -> list[str]:
        """The model's quantized matrices: a matrix stored as row blocks once, under its own name."""
        blocks = {b for bs in self.row_blocks.values() for b in bs}
        return [n for n in self.quantized_names if n not in blocks] + list(self.row_blocks)

    def dequantized(self, name: str, dtype: str) -> np.ndarray:
        """A matrix's weights (its row blocks stacked) in the storage form of `dtype` (F16, BF16, F32)."""
        return np.concatenate([dequantize_as(self.matrix(b), dtype) for b in self.row_blocks.get(name, [name])])

    def _file(self, entry: dict) -> SafetensorsFile:
        return self._files[entry["shard"]]

    def packed(self, name: str, keys: tuple[str, ...] = (CODES, SCALES, CODEBOOK)) -> dict[str, np.ndarray]:
        """The packed tensors of a quantized matrix: {trit_codes, trit_scales, trit_codebook}, or only `keys`."""
        entry = self.manifest["quantized"][name]
        f = self._file(entry)
        try:
            packed = {k: f.read(f"{name}.{k}") for k in keys}
        except KeyError as e:
            raise CodecError(f"{f.path}: missing tensor {e} listed in {MANIFEST}") from None
        codes = packed.get(CODES)
        if codes is not None and (codes.ndim != 3 or codes.shape[0] != entry["shape"][0]
                                  or codes.shape[1] != entry["depth"]):
            raise CodecError(f"{f.path}: tensor '{name}.{CODES}' has shape {list(codes.shape)}, which does not "
                             f"hold the {entry['shape']} matrix at depth {entry['depth']} that {MANIFEST} lists")
        return packed

    def matrix(self, name: str) -> QuantizedMatrix:
        entry = self.manifest["quantized"][name]
        packed = self.packed(name)
        try:
            return unpack_matrix(packed, entry["shape"][1], name)
        except CodecError as e:  # unpack_matrix names the tensor; the file is this checkpoint's shard
            raise CodecError(f"{self._file(entry).path}: {e}") from None

    def kept(self, name: str) -> tuple[np.ndarray, str]:
        """A kept tensor in its storage form and its safetensors dtype."""
        entry = self.manifest["kept"][name]
        f = self._file(entry)
        if name not in f.tensors:
            raise CodecError(f"{f.path}: missing tensor '{name}' listed in {MANIFEST}")
        info = f.tensors[name]
        if list(info.shape) != entry["shape"] or info.dtype != entry["dtype"]:
            raise CodecError(f"{f.path}: tensor '{name}' is {info.dtype} {list(info.shape)}, {MANIFEST} says "
                             f"{entry['dtype']} {entry['shape']}")
        return f.read(name), info.dtype

    def packed_bytes(self) -> int:
        """Bytes of all packed tensors (codes + scale indices + codebooks)."""
        return sum(a.nbytes for n in self.quantized_names for a in self.packed(n).values())


def _field(manifest: dict, key: str, path: Path):
    if key not in manifest:
        raise CodecError(f"{path}: manifest field '{key}' is missing")
    return manifest[key]


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entries(manifest: dict, mpath: Path) -> None:
    """Every field the loader uses has the type and range it needs: a hostile trit.json ends here, in one
    line naming the field, not in a traceback or an allocation of the size it claims."""
    def bad(what: str) -> CodecError:
        return CodecError(f"{mpath}: {what}")
    for key in ("quantized", "kept", "shards"):
        if not isinstance(manifest[key], dict):
            raise bad(f"field '{key}' must be an object")
    for shard, meta in manifest["shards"].items():
        if Path(shard).name != shard or shard.startswith(".") or not isinstance(meta, dict):
            raise bad(f"shard entry {shard!r} is malformed (a plain file name with its sha256 and bytes)")
    for name, e in manifest["quantized"].items():
        shape = e.get("shape") if isinstance(e, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(_whole(d) and d > 0 for d in shape)
                and shape[1] % GROUP_SIZE == 0 and e.get("depth") in DEPTHS and not isinstance(e["depth"], bool)
                and e.get("dtype") in FLOAT_DTYPES and isinstance(e.get("shard"), str)):
            raise bad(f"quantized tensor '{name}': malformed entry (shape [rows, columns] with columns a multiple "
                      f"of {GROUP_SIZE}, depth in {list(DEPTHS)}, dtype in {list(FLOAT_DTYPES)}, shard)")
    blocks = manifest.get("row_blocks", {})
    if not isinstance(blocks, dict):
        raise bad("field 'row_blocks' must be an object")
    for name, parts in blocks.items():
        entries = [manifest["quantized"].get(b) for b in parts] if isinstance(parts, list) else [None]
        if (len(entries) < 2 or None in entries or name in manifest["quantized"]
                or len({(e["shape"][1], e["dtype"]) for e in entries}) != 1):
            raise bad(f"row_blocks of '{name}': malformed (two or more quantized entries, not the matrix's own "
                      "name, with one column count and dtype)")
    orders = manifest.get("channel_orders", {})
    for name, order in (orders.items() if isinstance(orders, dict) else [("", None)]):
        if not (isinstance(order, list) and all(_whole(i) for i in order) and sorted(order) == list(range(len(order)))):
            raise bad(f"channel_orders of '{name}': not a permutation of the channels")
    for name, e in manifest["kept"].items():
        shape = e.get("shape") if isinstance(e, dict) else None
        if not (isinstance(shape, list) and all(_whole(d) for d in shape) and isinstance(e.get("dtype"), str)
                and isinstance(e.get("shard"), str)):
            raise bad(f"kept tensor '{name}': malformed entry (shape, dtype, shard)")


def load_trit_checkpoint(path: str | os.PathLike, verify: bool = True) -> TritCheckpoint:
    """Open a trit checkpoint dir; with verify, every shard's sha256 is checked against trit.json."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CodecError(f"{path}: not a directory")
    if not mpath.exists():
        raise CodecError(f"{path}: missing {MANIFEST} (not a trit checkpoint; quantize it with trit-quantize)")
    manifest = read_json(mpath)
    if not isinstance(manifest, dict):
        raise CodecError(f"{mpath}: not a trit manifest (a JSON object)")
    if _field(manifest, "format", mpath) != FORMAT_NAME:
        raise CodecError(f"{mpath}: field 'format' is {manifest['format']!r}, expected {FORMAT_NAME!r}")
    version = _field(manifest, "format_version", mpath)
    if version not in (FORMAT_VERSION, ROW_BLOCKS_VERSION) or isinstance(version, bool):
        raise CodecError(f"{mpath}: unsupported format_version {version!r} (this tool reads {FORMAT_VERSION} and "
                         f"{ROW_BLOCKS_VERSION})")
    if _field(manifest, "group_size", mpath) != GROUP_SIZE:
        raise CodecError(f"{mpath}: group_size {manifest['group_size']} unsupported (only {GROUP_SIZE})")
    for key in ("quantized", "kept", "shards"):
        _field(manifest, key, mpath)
    _check_entries(manifest, mpath)
    files = {}
    for shard, meta in manifest["shards"].items():
        spath = path / shard
        if not spath.exists():
            raise CodecError(f"{path}: shard '{shard}' listed in {MANIFEST} is missing")
        if verify and sha256_file(spath) != meta.get("sha256"):
            raise CodecError(f"{spath}: checksum mismatch (sha256 differs from {MANIFEST}); the file is corrupt")
        files[shard] = SafetensorsFile(spath)
    for name, entry in list(manifest["quantized"].items()) + list(manifest["kept"].items()):
        if entry.get("shard") not in files:
            raise CodecError(f"{mpath}: tensor '{name}' names shard {entry.get('shard')!r}, which is not listed")
    cfg = path / "config.json"
    config = read_json(cfg) if cfg.exists() else {}
    if not isinstance(config, dict):
        raise CodecError(f"{cfg}: not a model config (a JSON object)")
    return TritCheckpoint(path, manifest, config, files)


def write_dequantized_checkpoint(trit: Path | TritCheckpoint, out: Path, dtype: str | None = None,
                                 force: bool = False, progress: Progress | None = None) -> None:
    """Trit checkpoint (dir, or one already loaded and verified) -> Hugging Face safetensors checkpoint.

    dtype: float16|bfloat16|float32 or None (each tensor's source dtype)."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise CodecError(f"unsupported --dtype {dtype!r} (choose from {', '.join(DTYPE_NAMES)})")
    ckpt = trit if isinstance(trit, TritCheckpoint) else load_trit_checkpoint(trit)
    target = DTYPE_NAMES.get(dtype) if dtype else None
    with atomic_output_dir(out, force) as tmp:
        shards = _ShardedOutput(tmp, "model", DEFAULT_SHARD_BYTES)
        for name in ckpt.matrix_names:
            d = target or ckpt.manifest["quantized"][ckpt.row_blocks.get(name, [name])[0]]["dtype"]
            arr = ckpt.dequantized(name, d)
            shards.add(name, arr, d)
            if progress:
                progress(name, arr.size)
        for name in ckpt.kept_names:
            arr, d = ckpt.kept(name)
            if target and d in FLOAT_DTYPES and d != target:
                arr, d = from_float(to_float32(arr, d), target), target
            shards.add(name, arr, d)
            if progress:
                progress(name, arr.size)
        files = shards.finish()
        if len(files) == 1:
            os.rename(tmp / files[0], tmp / "model.safetensors")
        else:
            index = {"metadata": {}, "weight_map": dict(sorted(shards.location.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        copy_side_files(ckpt.path, tmp)
        if ckpt.manifest.get("quantized_head", {}).get("source") == EMBEDDING:  # the head is its own tensor now
            (tmp / "config.json").write_text(json.dumps({**ckpt.config, "tie_word_embeddings": False}, indent=1))
