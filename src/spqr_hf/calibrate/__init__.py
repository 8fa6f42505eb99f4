"""Calibration: samples from any dataset form, and the block-by-block quantization driver."""

from spqr_hf.calibrate.blocks import NoDecoderBlocksError, find_block_list, find_linears
from spqr_hf.calibrate.data import CalibrationDataError, get_calibration_data
from spqr_hf.calibrate.sequential import (
    LayerReport,
    QuantizationReport,
    calibration_device,
    quantize_model,
    spqr_layer_quantizer,
)

__all__ = ["CalibrationDataError", "LayerReport", "NoDecoderBlocksError", "QuantizationReport",
           "calibration_device", "find_block_list", "find_linears", "get_calibration_data", "quantize_model",
           "spqr_layer_quantizer"]
