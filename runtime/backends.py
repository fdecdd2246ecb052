"""One way to open any backend: `onnxruntime` (a bundle; CPU, or the CUDA / TensorRT execution providers
where onnxruntime-gpu is installed), `tensorrt` (a bundle's engines) or `torch` (a model artifact, the
reference). All answer through the same API (`answer`, `answer_many`, `score`, `stream`)."""

from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("onnxruntime", "tensorrt", "torch")
# ORT execution providers by short name, each with its fallbacks
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def detect_backend(path: str | os.PathLike) -> str:
    p = Path(path)
    if (p / "runtime.json").is_file():
        return "onnxruntime"
    if (p / "emoverse.json").is_file():
        return "torch"
    raise ValueError(f"{p}: neither a bundle (runtime.json) nor a model artifact (emoverse.json)")


def open_runtime(
    path: str | os.PathLike,
    backend: str = "auto",
    *,
    threads: int | None = None,
    providers: str = "cpu",
    check: bool = True,
    device: str = "cpu",
):
    """`device` places the torch backend's model ("cpu", "cuda"); bundles pick devices by `providers`."""
    backend = detect_backend(path) if backend == "auto" else backend
    # Lazy on purpose: each backend loads only its own stack, so the ONNX Runtime path runs where torch is not
    # installed (Jetson, slim containers; tests/export/test_bundle.py checks) and tensorrt only where it is.
    if backend == "onnxruntime":
        from emoverse.runtime.ort import OrtRuntime

        if providers not in PROVIDERS:
            raise ValueError(f"unknown providers {providers!r}; known: {', '.join(PROVIDERS)}")
        return OrtRuntime(path, providers=PROVIDERS[providers], threads=threads, check=check)
    if backend == "tensorrt":
        from emoverse.runtime.trt import TensorRTRuntime

        return TensorRTRuntime(path, threads=threads, check=check)
    if backend == "torch":
        from emoverse.runtime.torch_ref import TorchRuntime

        return TorchRuntime(path, threads=threads, check=check, device=device)
    raise ValueError(f"unknown backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
