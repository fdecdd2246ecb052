"""One decoder projection's GEMM in every precision a CPU bundle can run it in, on this CPU, in one run: fp32
`MatMul`, 4-bit `MatMulNBits` (accuracy level 0: fp32 compute; 4: int8 activations), and int8 weights x dynamic
uint8 activations (`DynamicQuantizeLinear` + `MatMulInteger`, what the INT8 prefill decoder runs) with
onnxruntime's default kernels and with `session.x64quantprecision` (exact u8 x u8, what the runtime asks for on
x86 without VNNI: `runtime.ort.u8s8_gemms_saturate`).

Shapes are SmolLM2's: 576 -> 1,536 (gate/up) and 1,536 -> 576 (down), at 1 row (a decode step) and 60 rows
(a closed request's prompt after the cached chat prefix). What it answers: whether a precision is faster *here*
(on an AVX2-only EPYC every precision ran a 60-row GEMM at 46-70 GFLOP/s, so no choice of weights brings a closed
request's ~13 GFLOP prefill under 60 ms there). Weights are random: speed does not depend on their values.

    .venv/bin/python scripts/gemm_precisions.py --out docs/results/gemm-precisions.json   # ~1 min; run it alone
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from emoverse.artifacts import atomic_write_json, cpu_name

BLOCK = 32  # the bundles' MatMulNBits block size


def _graph(nodes, initializers, rows: int, k: int, n: int, contrib: bool = False):
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        initializers,
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    return helper.make_model(graph, opset_imports=opsets)


def models(rows: int, k: int, n: int, rng: np.random.Generator) -> dict:
    """name -> (ModelProto, session config entries)."""
    fp32 = _graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")],
        rows,
        k,
        n,
    )
    int8 = _graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["a"], ["aq", "a_scale", "a_zero"]),
            helper.make_node("MatMulInteger", ["aq", "w8", "a_zero"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["a_scale", "w_scale"], ["scale"]),
            helper.make_node("Mul", ["accf", "scale"], ["y"]),
        ],
        [
            numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w8"),
            numpy_helper.from_array(np.full((n,), 0.01, np.float32), "w_scale"),
        ],
        rows,
        k,
        n,
    )
    out = {
        "fp32 MatMul": (fp32, {}),
        "int8 u8s8": (int8, {}),
        "int8 exact u8u8": (int8, {"session.x64quantprecision": "1"}),
    }
    packed = rng.integers(0, 256, (n, k // BLOCK, BLOCK // 2), dtype=np.uint8)
    scales = (rng.random(n * (k // BLOCK)) * 0.01).astype(np.float32)
    for level in (0, 4):
        node = helper.make_node(
            "MatMulNBits",
            ["a", "q", "s"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=BLOCK,
            accuracy_level=level,
        )
        model = _graph(
            [node], [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")], rows, k, n, True
        )
        out[f"4-bit MatMulNBits level {level}"] = (model, {})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 60])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    rows_out = []
    for k, n in ((576, 1536), (1536, 576)):
        for rows in args.rows:
            a = {"a": rng.standard_normal((rows, k)).astype(np.float32)}
            sessions = {}
            for name, (model, config) in models(rows, k, n, rng).items():
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = args.threads
                # no spinning after a run: the kernels alternate, and one session's spinning threads would take
                # the cores from the next one's run (measured: 4x slower single-row GEMMs)
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                for key, value in config.items():
                    opts.add_session_config_entry(key, value)
                sessions[name] = ort.InferenceSession(
                    model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
                )
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(5):  # rounds alternate the kernels: drift of the machine spreads over all of them
                for name, sess in sessions.items():
                    sess.run(None, a)
                    start = time.perf_counter()
                    for _ in range(args.calls // 5):
                        sess.run(None, a)
                    times[name].append((time.perf_counter() - start) / (args.calls // 5) * 1e6)
            for name, t in times.items():
                us = float(np.median(t))
                gflops = 2 * rows * k * n / us / 1e3
                rows_out.append(
                    {
                        "k": k,
                        "n": n,
                        "rows": rows,
                        "kernel": name,
                        "us_median": round(us, 1),
                        "gflops": round(gflops, 1),
                    }
                )
                print(f"{rows:>3} x {k} -> {n}  {name:<28} {us:8.1f} us  {gflops:6.1f} GFLOP/s")
    atomic_write_json(
        args.out,
        {
            "what": "one projection's GEMM per precision (onnxruntime CPU kernels), medians over alternating rounds",
            "cpu": cpu_name(),
            "threads": args.threads,
            "date": date.today().isoformat(),
            "rows": rows_out,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
