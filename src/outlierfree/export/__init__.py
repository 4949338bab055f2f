"""Real INT8: export a calibrated model to ONNX with QuantizeLinear/DequantizeLinear pairs at the simulator's sites
(:mod:`.onnx`), and run and score it in ONNX Runtime (:mod:`.ort`). ``outlierfree export`` is :mod:`.cli`."""
