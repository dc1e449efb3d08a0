"""The artifact directory's names and manifest reader: all a run-time-only machine (a GPU box, an RPC
device) needs to know of an artifact, without TVM's compiler."""
from __future__ import annotations

from pathlib import Path

from codec.errors import read_json

from .errors import CompileError

ARTIFACT_FORMAT = "trit-artifact"
ARTIFACT_VERSION = 1
LIBRARY, PARAMS, ARTIFACT_MANIFEST = "model.so", "params.safetensors", "manifest.json"
DEVICES = ("cpu", "cuda")
KV_CACHE_DTYPES = ("float16", "float32")  # trit-compile --kv-cache-dtype (None: the model dtype)
PAGE_SIZE = 16  # tokens per KV-cache page: what the CPU attention kernels are built for and the runtime asks for


def read_artifact_manifest(artifact: Path) -> dict:
    path = Path(artifact) / ARTIFACT_MANIFEST
    if not path.exists():
        raise CompileError(f"{artifact}: not a trit artifact (no {ARTIFACT_MANIFEST}; build one with trit-compile)")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise CompileError(f"{path}: not an artifact manifest (a JSON object)")
    if manifest.get("format") != ARTIFACT_FORMAT or manifest.get("format_version") != ARTIFACT_VERSION:
        raise CompileError(f"{path}: unsupported artifact format {manifest.get('format')!r} "
                           f"v{manifest.get('format_version')!r} (this tool reads {ARTIFACT_FORMAT} "
                           f"v{ARTIFACT_VERSION})")
    _check_fields(manifest, path)
    return manifest


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_fields(manifest: dict, path: Path) -> None:
    """The fields the runtime reads, with the types it needs: a hostile manifest ends in one line here."""
    config = manifest.get("config")
    checks = [
        ("device", manifest.get("device") in DEVICES, f"one of {', '.join(DEVICES)}"),
        ("arch", isinstance(manifest.get("arch"), str), "a CPU architecture name"),
        ("target_kind", isinstance(manifest.get("target_kind"), str), "a TVM target kind"),
        ("params", isinstance(manifest.get("params"), list) and all(isinstance(p, str) for p in manifest["params"]),
         "a list of parameter names"),
        ("context_length", _positive(manifest.get("context_length")), "a positive integer"),
        ("config", isinstance(config, dict), "an object"),
    ]
    if isinstance(config, dict):
        checks += [("config.vocab_size", _positive(config.get("vocab_size")), "a positive integer"),
                   ("config.sliding_window", config.get("sliding_window") is None
                    or _positive(config.get("sliding_window")), "a positive integer or null")]
    for field, ok, what in checks:
        if not ok:
            raise CompileError(f"{path}: field '{field}' must be {what}")
