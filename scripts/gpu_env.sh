#!/usr/bin/env bash
# Packs TVM's runtime for a GPU machine that has Python 3.12 and no network into .gpu_env/:
# the apache-tvm-ffi wheel for cp312 (from PyPI) and the installed tvm package without its compiler
# library (libtvm_compiler.so, ~250 MB, is not needed to run built modules). scripts/gpu_check.sh unpacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FFI_VERSION=$($PY -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
TVM_DIR=$($PY -c "import os, tvm; print(os.path.dirname(tvm.__file__))")
rm -rf .gpu_env && mkdir -p .gpu_env
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu_env "apache-tvm-ffi==$FFI_VERSION"
tar -C "$(dirname "$TVM_DIR")" --exclude=__pycache__ --exclude=libtvm_compiler.so -cf - tvm | xz -T0 -6 > .gpu_env/tvm_runtime.tar.xz
ls -la .gpu_env
