"""`emoverse export`: a model artifact -> a deployable bundle folder (graphs, tokenizer, runtime config,
label sets, manifest with hashes), checked by parity against PyTorch before it is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from emoverse.artifacts import atomic_dir, manifest_digest, verify, write_manifest
from emoverse.export.onnx_export import OPSET, export_all, kv_shape
from emoverse.tasks import TASKS

SENTINEL = "\u2063QUERY\u2063"


def runtime_config(model, graphs: dict[str, str]) -> dict:
    text = model.prompts.render(SENTINEL, 0)
    prefix, suffix = text.split(SENTINEL)
    tok = model.tokenizer
    return {
        "format": "emoverse-runtime/1",
        "chat_prefix": prefix, "chat_suffix": suffix,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "n_visual": model.cfg.n_visual, "image_size": model.cfg.image_size, "max_length": model.cfg.max_length,
        "kv_shape": list(kv_shape(model.llm)), "opset": OPSET, "graphs": graphs,
        "tasks": {name: {"tag": t.tag, "labels": list(t.labels), "closed": t.closed, "max_new_tokens": t.max_new_tokens}
                  for name, t in TASKS.items()},
    }


@torch.no_grad()
def parity(model, bundle_dir: Path, probes: list[tuple[str, list[str], str]]) -> dict:
    """Max |logit| difference between PyTorch and ONNX Runtime on the prompts, and greedy-token agreement."""
    from emoverse.runtime.ort import OrtRuntime

    rt = OrtRuntime(bundle_dir, check=False)
    worst, same = 0.0, 0
    for query, images, task in probes:
        enc = model.prompts.encode(query, None, images, [])
        ids = torch.tensor([enc.input_ids])
        ref = model.llm(inputs_embeds=model.embed(ids, torch.tensor([enc.visual_mask]), enc.media)).logits[0].numpy()
        emb = rt.embed(query, images)[None]
        got, _ = rt.forward(emb, np.ones((1, emb.shape[1]), dtype=np.int64), rt.empty_cache(1))
        worst = max(worst, float(np.abs(ref - got[0]).max()))
        n = TASKS[task].max_new_tokens
        same += model.generate(query, images, max_new_tokens=n) == rt.generate(query, images, max_new_tokens=n)
    return {"max_abs_logit_diff": worst, "greedy_identical": same, "probes": len(probes)}


def export_bundle(model_dir: str | os.PathLike, out: str | os.PathLike, *, target: str = "cpu",
                  probes: list[tuple[str, list[str], str]] | None = None, max_abs_diff: float = 1e-3,
                  overwrite: bool = False) -> dict:
    from emoverse.model import EmoVerse

    model_dir = Path(model_dir)
    parent = verify(model_dir, kind="emoverse-model")
    model = EmoVerse.load(model_dir, check=False).eval()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        paths = export_all(model, tmp / "graphs")
        graphs = {k: str(p.relative_to(tmp)) for k, p in paths.items()}
        model.tokenizer.save_pretrained(tmp / "tokenizer-hf")
        (tmp / "tokenizer.json").write_bytes((tmp / "tokenizer-hf" / "tokenizer.json").read_bytes())
        for f in (tmp / "tokenizer-hf").iterdir():
            f.unlink()
        (tmp / "tokenizer-hf").rmdir()
        (tmp / "runtime.json").write_text(json.dumps(runtime_config(model, graphs), indent=2) + "\n")
        report = parity(model, tmp, probes or [(TASKS["msa"].query("What a lovely day"), [], "msa")])
        if report["max_abs_logit_diff"] > max_abs_diff:
            raise ValueError(f"ONNX parity failed: max |logit diff| {report['max_abs_logit_diff']:.2e} > {max_abs_diff}")
        (tmp / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        manifest = write_manifest(tmp, kind="emoverse-bundle", producer={"stage": "export", "target": target},
                                  inputs={"model": {"path": str(model_dir.resolve()), "digest": manifest_digest(parent)}},
                                  extra={"parity": report})
    return manifest

