"""The packed SpQR storage format: layout definition, packing, reference decoding."""

from spqr_hf.format.layout import FORMAT_VERSION
from spqr_hf.format.pack import PackedSpQR, dequantize, pack_bits, unpack_bits

__all__ = ["FORMAT_VERSION", "PackedSpQR", "dequantize", "pack_bits", "unpack_bits"]
