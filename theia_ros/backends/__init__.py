"""Inference backends: the interface (base), create_backend and the auto plan (factory), one module
per engine (torch_backend, onnxruntime_backend, openvino_backend, tensorrt_backend), the engine
cache, the accuracy gate (validation, with natural images from calibration) and the benchmark (bench)."""
