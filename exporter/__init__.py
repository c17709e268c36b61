"""Everything from the Plan on: surgery, ONNX export, ONNX Runtime validation, latency, report, CLI."""
