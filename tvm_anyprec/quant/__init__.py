"""Weight and activation quantizers (numpy/torch only; this package never imports TVM)."""
from .anyprec import (AnyPrecLayer, QuantizationError, UniformLayer, check_bits, check_weight, kmeans_reference,
                      layer_bytes, memory_ratios, parent_bytes, quantize_nonuniform, quantize_uniform, rtn_quantize,
                      weighted_error)
from .bitplanes import num_words, pack_bitplanes, unpack_bitplanes

__all__ = ["AnyPrecLayer", "QuantizationError", "UniformLayer", "check_bits", "check_weight", "kmeans_reference",
           "layer_bytes", "memory_ratios", "parent_bytes", "quantize_nonuniform", "quantize_uniform", "rtn_quantize",
           "weighted_error", "num_words", "pack_bitplanes", "unpack_bitplanes"]
