#!/usr/bin/env python3
"""GPTQ in the classic on-disk format (qweight / qzeros / scales / g_idx + quantize_config: what auto-gptq
wrote; read by vLLM, TGI, ExLlama, ...) with GPTQModel, auto-gptq's maintained successor.

Run by the `gptqmodel_w4a16` compress stage with the interpreter of a separate environment: GPTQModel
wants transformers 5.24 while llm-compressor caps transformers at 5.17, so the two cannot share one.
This file therefore imports nothing from emoverse. Input: a plain HF LLM folder and a JSONL calibration
file of token ids (AMT train records of every task, prepared by the stage); output: the quantized folder
and one JSON line on stdout describing what was done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--damp-percent", type=float, default=0.01)
    a = ap.parse_args(argv)

    from gptqmodel import GPTQModel, QuantizeConfig

    with open(a.calibration) as f:
        calibration = [json.loads(line) for line in f if line.strip()]
    for i, c in enumerate(calibration):
        if not c.get("input_ids"):
            print(f"{a.calibration}:{i + 1}: record without input_ids", file=sys.stderr)
            return 2
        c["attention_mask"] = [1] * len(c["input_ids"])
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, desc_act=a.desc_act, sym=not a.asym)
    if hasattr(cfg, "damp_percent"):  # moved between GPTQModel releases
        cfg.damp_percent = a.damp_percent
    t0 = time.monotonic()
    model = GPTQModel.load(a.llm, cfg, device="cpu")
    model.quantize(calibration, batch_size=1)
    model.save(a.out)
    print(
        json.dumps(
            {
                "seconds": round(time.monotonic() - t0, 1),
                "calibration_samples": len(calibration),
                "format": str(getattr(cfg, "format", "gptq")),
                "libraries": {p: metadata.version(p) for p in ("gptqmodel", "transformers", "torch")},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
