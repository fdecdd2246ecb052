"""The prepared GPU check (one run, under 8 minutes, never part of CI): what a GPU machine can tell us that a
CPU cannot. Writes one JSON ($OUT/gpu_check.json, or --out).

1. CUDA training steps of the release recipe's settings (bf16 autocast, response-only logits, LoRA layer
   range) against fp32 on the same batches: loss parity and tokens/s. Uses the real SmolLM2 when its cached
   folder is present, else the tiny random config (the GPU machine has no registry access for the weights).
2. FP8 numerics on the device: torch._scaled_mm (E4M3 inputs, per-tensor scales) against the CPU emulation
   compress/ uses for ModelOpt FP8 checkpoints (emoverse/fp8.py: round to E4M3 at the scale, multiply in
   higher precision), on real layer shapes. Needs compute capability >= 8.9 (H100: 9.0; Jetson Orin 8.7 has
   no FP8 and is skipped with the reason).
3. A bundle on onnxruntime, if a bundle folder and onnxruntime are present: one answer per task.

    python scripts/gpu_check.py --out $OUT/gpu_check.json [--bundle bundles/cpu-fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from pathlib import Path

import torch


def training_check(steps: int = 20) -> dict:
    from emoverse.model import EmoVerse, ModelConfig, cache_dir
    from emoverse.tasks import TASKS

    real = (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file()
    cfg = (
        ModelConfig(vision="none", lora_from_layer=12)
        if real
        else ModelConfig(llm="tiny-random", vision="none", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    )
    mer = TASKS["mer"]
    texts = [
        "I can't believe you did that!",
        "Oh, that's wonderful news.",
        "Whatever.",
        "Get out of here!",
    ] * 4
    labels = ["Surprise.", "Joy.", "Neutral.", "Anger."] * 4
    out = {"model": "smollm2-135m" if real else "tiny-random", "steps": steps}
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = EmoVerse.build(cfg).cuda()
        m.freeze_base()
        batch = m.prompts.collate(
            [m.prompts.encode(mer.query(t), y, [], []) for t, y in zip(texts, labels, strict=True)]
        )
        batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
        opt = torch.optim.AdamW(list(m.trainable_parameters().values()), lr=2e-4)
        curve, t0 = [], None
        for step in range(steps):
            if step == 2:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = m(batch, response_loss_only=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(round(loss.item(), 5))
        torch.cuda.synchronize()
        tokens = int(batch["attention_mask"].sum()) * (steps - 2)
        curves[precision] = curve
        out[precision] = {"losses": curve, "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}
    out["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"], strict=True))
    return out


def fp8_check() -> dict:
    major, minor = torch.cuda.get_device_capability()
    cc = major + minor / 10
    if cc < 8.9:
        return {"skipped": f"compute capability {cc} < 8.9: no FP8 tensor cores"}
    from emoverse.fp8 import FP8_MAX

    torch.manual_seed(0)
    rows = []
    for m_, k, n in [(64, 576, 576), (64, 576, 1536), (64, 1536, 576)]:  # SmolLM2-135M projection shapes
        x = torch.randn(m_, k) * 2
        w = torch.randn(n, k) * 0.05
        sx, sw = x.abs().max() / FP8_MAX, w.abs().max() / FP8_MAX
        xq = (x / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        wq = (w / sw).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        cpu = (xq.float() * sx) @ (wq.float() * sw).t()  # the CPU emulation's arithmetic
        gpu = torch._scaled_mm(
            xq.cuda(),
            wq.cuda().t(),
            scale_a=sx.float().cuda(),
            scale_b=sw.float().cuda(),
            out_dtype=torch.float32,
        ).cpu()
        ref = x @ w.t()
        rows.append(
            {
                "shape": [m_, k, n],
                "gpu_vs_emulation_max_rel": float((gpu - cpu).abs().max() / cpu.abs().max()),
                "emulation_vs_fp32_max_rel": float((cpu - ref).abs().max() / ref.abs().max()),
            }
        )
    return {"compute_capability": cc, "matmuls": rows}


def bundle_check(bundle: Path) -> dict:
    import onnxruntime as ort

    from emoverse.runtime.backends import open_runtime
    from emoverse.tasks import TASKS

    providers = ort.get_available_providers()
    rt = open_runtime(bundle, "onnxruntime", providers="cuda" if "CUDAExecutionProvider" in providers else "cpu")
    msa, mer = TASKS["msa"], TASKS["mer"]
    answers = {
        "msa": rt.answer("msa", msa.query("What a lovely day")).text,
        "mer": rt.answer("mer", mer.query("You did WHAT?")).text,
    }
    return {"providers": providers, "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--bundle")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    result: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name()
    checks = {"training": lambda: training_check(a.steps), "fp8": fp8_check}
    if a.bundle:
        checks["bundle"] = lambda: bundle_check(Path(a.bundle))
    for name, fn in checks.items():
        if not torch.cuda.is_available() and name != "bundle":
            result[name] = {"skipped": "no CUDA device"}
            continue
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed check must not lose the others' results
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
