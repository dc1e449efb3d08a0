"""Balanced-ternary codec: quantize, pack, recover and store trit checkpoints (numpy + safetensors only)."""
from .checkpoint import (TritCheckpoint, is_quantized_tensor, load_trit_checkpoint, write_dequantized_checkpoint,
                         write_trit_checkpoint)
from .errors import CodecError
from .format import bits_per_weight, pack_matrix, packed_shapes, unpack_matrix
from .quantize import GROUP_SIZE, QuantizedMatrix, qmax_of, quantize_matrix, relative_mse
from .recover import dequantize_as, recover_matrix
from .trits import pack_trits, unpack_trits

__all__ = ["CodecError", "GROUP_SIZE", "QuantizedMatrix", "TritCheckpoint", "bits_per_weight", "dequantize_as",
           "is_quantized_tensor", "load_trit_checkpoint", "pack_matrix", "pack_trits", "packed_shapes", "qmax_of",
           "quantize_matrix", "recover_matrix", "relative_mse", "unpack_matrix", "unpack_trits",
           "write_dequantized_checkpoint", "write_trit_checkpoint"]
