"""The artifact directory's names and manifest reader: all a run-time-only machine (a GPU box, an RPC
device) needs to know of an artifact, without TVM's compiler."""
from __future__ import annotations

from pathlib import Path

from codec.errors import read_json

from .errors import CompileError

ARTIFACT_FORMAT = "trit-artifact"
ARTIFACT_VERSION = 1
LIBRARY, PARAMS, ARTIFACT_MANIFEST = "model.so", "params.safetensors", "manifest.json"


def read_artifact_manifest(artifact: Path) -> dict:
    path = Path(artifact) / ARTIFACT_MANIFEST
    if not path.exists():
        raise CompileError(f"{artifact}: not a trit artifact (no {ARTIFACT_MANIFEST}; build one with trit-compile)")
    manifest = read_json(path)
    if manifest.get("format") != ARTIFACT_FORMAT or manifest.get("format_version") != ARTIFACT_VERSION:
        raise CompileError(f"{path}: unsupported artifact format {manifest.get('format')!r} "
                           f"v{manifest.get('format_version')!r} (this tool reads {ARTIFACT_FORMAT} v{ARTIFACT_VERSION})")
    return manifest
