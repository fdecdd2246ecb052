"""The TensorRT backend: the same runtime API, each bundle graph run by the engine built from it.

Engines are built on the device that runs them (`python3 BUNDLE/tensorrt/build_engines.py`, from the plan
`emoverse export --target jetson-orin-nano|jetson-agx-orin|h100` wrote). Execution goes through
polygraphy's `TrtRunner` (NVIDIA's maintained wrapper: engine deserialisation, dynamic input shapes,
device buffers and copies) rather than hand-written CUDA memory code. TensorRT cannot be installed on the
machines this project is developed on: this backend is written against TensorRT 10 / polygraphy 0.49+
and tested here only up to opening the engines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from emoverse.artifacts import ArtifactError
from emoverse.runtime.ort import OrtRuntime


def onnx_output_names(path: Path) -> list[str]:
    """Output names of a graph, in order: engines keep the ONNX tensor names, not their order."""
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


class TrtGraph:
    """One TensorRT engine behind ONNX Runtime's `run(None, feeds) -> [outputs]` call."""

    def __init__(self, engine: Path, output_names: list[str]):
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError as e:  # pragma: no cover - polygraphy is a dependency
            raise RuntimeError("the tensorrt backend needs polygraphy (pip install polygraphy)") from e
        self.engine = engine
        self.output_names = output_names
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name=engine.name)
        try:
            self.runner.activate()  # deserialises the engine: needs `tensorrt` and a GPU
        except Exception as e:
            raise RuntimeError(
                f"{engine}: cannot load the TensorRT engine ({type(e).__name__}: {e}); the tensorrt "
                "backend needs the tensorrt package and the GPU the engine was built on"
            ) from e

    def run(self, _output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runner.infer(feed_dict=feeds)
        return [np.asarray(out[name]) for name in self.output_names]

    def close(self) -> None:
        self.runner.deactivate()


class TensorRTRuntime(OrtRuntime):
    """A bundle exported for a TensorRT target, run from its engines (`tensorrt/*.engine`)."""

    graph_class = TrtGraph

    def __init__(self, bundle: str | os.PathLike, threads: int | None = None, check: bool = True):
        plan_path = Path(bundle) / "tensorrt" / "plan.json"
        if not plan_path.is_file():
            raise ArtifactError(
                f"{bundle}: no tensorrt/plan.json — export it for a TensorRT target "
                "(--target jetson-orin-nano, jetson-agx-orin or h100)"
            )
        self.plan = json.loads(plan_path.read_text())
        super().__init__(bundle, threads=threads, check=check)

    def _open_graph(self, key: str, rel_path: str, providers, threads):
        build = next((b for b in self.plan["builds"] if b["graph"] == key), None)
        if build is None:
            raise ArtifactError(f"{self.dir}/tensorrt/plan.json: no engine build for graph {key!r}")
        engine = self.dir / build["engine"]
        if not engine.is_file():
            raise ArtifactError(
                f"{engine}: engine not built. Build the engines on this device first: "
                f"python3 {self.dir / 'tensorrt' / 'build_engines.py'}"
            )
        return self.graph_class(engine, onnx_output_names(self.dir / build["onnx"]))
