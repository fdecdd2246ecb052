"""Weight-space interpolation of two trained adapters of one model (WiSE-FT, Wortsman et al., CVPR 2022):
(1 - alpha) * A + alpha * B for every trainable tensor (projector, LoRA), written as an adapter-form model.
Why: a stage fine-tuned on one narrow corpus gains there and loses elsewhere; interpolating its weights with
its parent's is known to keep much of the gain while recovering robustness away from that corpus, at no
training cost. Both must be adapter-form models (a release; `emoverse release --run RUN --out DIR` writes a
run's) of one model config (e.g. a run and the release it started from).
    python scripts/interpolate_adapters.py models/emoverse-nano runs/v8-face-views/adapter --alpha 0.5 \\
        --out runs/v8-wise/adapter
"""

from __future__ import annotations

import argparse

import torch

from emoverse.model import EmoVerse


def interpolate(a_path: str, b_path: str, alpha: float, out: str) -> int:
    """Write (1 - alpha) * A + alpha * B to `out`; returns how many tensors differ between A and B."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: must lie in [0, 1]")
    a, b = EmoVerse.load_unmerged(a_path), EmoVerse.load_unmerged(b_path)
    if a.cfg != b.cfg:
        raise ValueError(f"{a_path} and {b_path}: different model configs; their weights do not correspond")
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    moved = 0
    with torch.no_grad():
        for k, p in pa.items():
            moved += int(not torch.equal(p, pb[k]))
            p.lerp_(pb[k].to(p.dtype), alpha)
    a.save_adapter(
        out, producer={"stage": "interpolate", "a": a_path, "b": b_path, "alpha": alpha, "tensors_moved": moved}
    )
    return moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="the parent (alpha 0)")
    ap.add_argument("b", help="the fine-tuned one (alpha 1)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        moved = interpolate(args.a, args.b, args.alpha, args.out)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {args.out}: {moved} tensors differ between the two, interpolated at alpha {args.alpha}")


if __name__ == "__main__":
    main()
