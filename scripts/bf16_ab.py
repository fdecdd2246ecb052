"""bf16 autocast against fp32 on this CPU, side by side in one run: one SmolLM2-135M MLP block (576 -> 1536 ->
576, SiLU) over 8 x 256 tokens, a training step (forward + backward) and an inference forward, alternating
arms. Why it exists: PyTorch emulates bf16 matmuls on a CPU without AVX-512 BF16 / AMX (ARM: BF16), where the
recipes' and README's `precision: bf16` would be far slower than fp32 (emoverse.artifacts.autocast_precision).

    python scripts/bf16_ab.py --out docs/results/bf16-ab-<cpu>.json
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from emoverse.artifacts import atomic_write_json, cpu_name, cpu_runs_bf16


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576))
    x = torch.randn(8, 256, 576, requires_grad=True)

    def ctx(arm: str):
        return torch.autocast("cpu", dtype=torch.bfloat16) if arm == "bf16" else contextlib.nullcontext()

    def train_step(arm: str) -> None:
        with ctx(arm):
            y = mlp(x).float().sum()
        y.backward()

    @torch.no_grad()
    def forward(arm: str) -> None:
        with ctx(arm):
            mlp(x)

    ms: dict[str, dict[str, list[float]]] = {k: {"fp32": [], "bf16": []} for k in ("train_step", "forward")}
    for _ in range(a.rounds):  # alternating arms, so drift in the machine's speed touches both
        for arm in ("fp32", "bf16"):
            ms["train_step"][arm].append(round(timed(lambda arm=arm: train_step(arm), a.reps), 1))
            ms["forward"][arm].append(round(timed(lambda arm=arm: forward(arm), a.reps), 1))
    result = {
        "benchmark": "bf16-autocast-vs-fp32",
        "cpu": cpu_name(),
        "cpu_runs_bf16": cpu_runs_bf16(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "shape": "8 x 256 tokens through 576 -> 1536 -> 576 (SiLU)",
        "ms": ms,
        "bf16_over_fp32": {k: round(min(v["bf16"]) / min(v["fp32"]), 2) for k, v in ms.items()},
    }
    atomic_write_json(a.out, result)
    print(result["cpu"], result["bf16_over_fp32"])


if __name__ == "__main__":
    main()
