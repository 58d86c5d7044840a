"""ONNX export and ONNX Runtime quantization of an extracted model, and quality measured through the engine."""
