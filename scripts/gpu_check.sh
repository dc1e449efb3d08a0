#!/usr/bin/env bash
# On the GPU machine (device tool): TVM's runtime from .gpu_env, then scripts/gpu_check.py run.
# Prepare here first:  python scripts/gpu_check.py prepare .gpu_bundle  and  scripts/gpu_env.sh
# Results: $OUT/results.jsonl (one JSON line per check), $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
SITE=/tmp/trit-site
rm -rf "$SITE" && mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu_env/apache_tvm_ffi-*.whl || exit 3
tar -xJf .gpu_env/tvm_runtime.tar.xz -C "$SITE" || exit 3
CUDART=$(dirname "$( (ls /usr/local/cuda/lib64/libcudart.so.13 2>/dev/null; \
  python3 - <<'PY'
import glob, site, sys
for p in sys.path + site.getsitepackages():
    for f in glob.glob(p + "/nvidia/**/libcudart.so.13*", recursive=True):
        print(f)
PY
) | head -1)")
export LD_LIBRARY_PATH="$CUDART:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$SITE:$PWD" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 scripts/gpu_check.py run .gpu_bundle "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
