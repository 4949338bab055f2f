"""Simulated full-activation quantization (``outlierfree quantize``).

    from outlierfree.quant import quantize, paper_w8a8, linear_w8a8, evaluate_quantized
    qm = quantize(model, paper_w8a8()); qm.calibrate(batches); ...; qm.remove()
"""

from .config import ESTIMATORS, QuantConfig, QuantSpec, linear_w8a8, paper_w8a8, parse_bits
from .evaluate import evaluate_pair, evaluate_quantized
from .grid import fake_quant, qparams
from .quantizer import Quantizer
from .simulator import QuantizedModel, quantize

__all__ = ["QuantConfig", "QuantSpec", "ESTIMATORS", "paper_w8a8", "linear_w8a8", "parse_bits", "quantize",
           "QuantizedModel", "Quantizer", "fake_quant", "qparams", "evaluate_quantized", "evaluate_pair"]
