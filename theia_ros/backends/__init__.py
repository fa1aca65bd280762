"""Inference backends: the interface (base), create_backend and the auto plan (factory), one module
per engine (torch_backend, onnxruntime_backend, tensorrt_backend), the engine cache, the accuracy
gate (validation) and the benchmark (bench)."""
