#!/usr/bin/env bash
# An emulated aarch64 device on this x86 machine: Debian's arm64 Python 3.11 and the aarch64 wheels of
# numpy, apache-tvm and apache-tvm-ffi unpacked into a sysroot, run by qemu-user. Everything comes from
# the package registries (Debian, PyPI) and is cached in $TRIT_ARM_ROOT (default ~/.cache/trit-arm).
#
#   scripts/arm_device.sh prepare            # once: install qemu-user + the cross compiler, fill the sysroot
#   scripts/arm_device.sh python ARGS...     # the aarch64 python (under qemu)
#   scripts/arm_device.sh serve PORT         # TVM RPC server on 127.0.0.1:PORT, runtime-only TVM
set -euo pipefail
ROOT=${TRIT_ARM_ROOT:-$HOME/.cache/trit-arm}
SYSROOT=$ROOT/sysroot
SITE=$ROOT/site
TVM_VERSION=${TVM_VERSION:-0.27.0}
FFI_VERSION=${FFI_VERSION:-0.1.14.post0}
# Python 3.11 and the C/C++ runtime libraries it and TVM's libraries load
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g libexpat1
libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libcrypt1 libncursesw6 libtinfo6 libreadline8 libdb5.3
libgdbm6 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1"
WHEELS="apache-tvm==$TVM_VERSION apache-tvm-ffi==$FFI_VERSION numpy ml_dtypes typing_extensions psutil cloudpickle tornado"

run_python() {
  [ -f "$ROOT/ready" ] || { echo "arm_device: not prepared (run: $0 prepare)" >&2; exit 3; }
  exec "$ROOT/bin/python3"  "$@"
}

write_launcher() {
  # The device's python3: qemu runs the arm64 interpreter with argv[0] set to this launcher, so the
  # processes TVM starts from sys.executable (its RPC server's worker) are emulated too. Runtime-only
  # TVM: a deployed device needs no compiler, and qemu need not load 250 MB of it.
  mkdir -p "$ROOT/bin"
  cat > "$ROOT/bin/python3" <<LAUNCHER
#!/bin/sh
export TVM_USE_RUNTIME_LIB=1 PYTHONPATH="$SITE" PYTHONHOME="$SYSROOT/usr" PYTHONDONTWRITEBYTECODE=1
exec qemu-aarch64 -0 "\$0" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "\$@"
LAUNCHER
  chmod +x "$ROOT/bin/python3"
}

case "${1:-}" in
  prepare)
    if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user g++-aarch64-linux-gnu
    fi
    if [ -f "$ROOT/ready" ]; then echo "arm_device: ready in $ROOT"; exit 0; fi
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
      dpkg --add-architecture arm64 && apt-get update -qq
    fi
    mkdir -p "$ROOT/debs" "$SYSROOT" "$SITE"
    (cd "$ROOT/debs" && apt-get download -qq $(for d in $DEBS; do echo "$d:arm64"; done) media-types)
    for deb in "$ROOT"/debs/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
    python3 -m pip install -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
      --platform manylinux_2_27_aarch64 --platform manylinux_2_24_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --target "$SITE" $WHEELS
    write_launcher
    touch "$ROOT/ready"
    echo "arm_device: ready in $ROOT"
    ;;
  python) shift; run_python "$@" ;;
  serve) run_python -m tvm.exec.rpc_server --host 127.0.0.1 --port "${2:?port}" --port-end "$((${2} + 1))" ;;
  *) sed -n 2,9p "$0"; exit 2 ;;
esac
