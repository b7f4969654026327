"""tidegate: an async serving runtime for ONNX models that speaks the KServe V2 protocol."""

__version__ = "0.1.0"
