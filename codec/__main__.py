"""`python -m codec quantize|dequantize|inspect ...`: the console scripts without installing them."""
import sys

from .cli import dequantize_main, inspect_main, quantize_main

_COMMANDS = {"quantize": quantize_main, "dequantize": dequantize_main, "inspect": inspect_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        print(f"usage: python -m codec {{{','.join(_COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
