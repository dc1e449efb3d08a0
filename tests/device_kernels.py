"""Runs compiled kernels on an emulated device (scripts/arm_device.sh python tests/device_kernels.py DIR): for each
NAME.so in DIR with its NAME.npz (inputs a0, a1, ... in parameter order, and out_shape), calls the library's
function on them and an output of zeros, and saves the output as NAME.out.npy. Needs only TVM's runtime and numpy.
"""
import sys
from pathlib import Path

import numpy as np
import tvm


def main(folder: Path) -> None:
    for library in sorted(folder.glob("*.so")):
        data = np.load(library.with_suffix(".npz"))
        inputs = [data[f"a{i}"] for i in range(len(data.files) - 1)]
        out = tvm.runtime.tensor(np.zeros(tuple(data["out_shape"]), np.float32), tvm.cpu())
        tvm.runtime.load_module(str(library))(*[tvm.runtime.tensor(a, tvm.cpu()) for a in inputs], out)
        np.save(library.with_suffix(".out.npy"), out.numpy())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
