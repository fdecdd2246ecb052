"""ONNX graphs of an EmoVerse artifact, for ONNX Runtime and TensorRT.

Three graphs, so a runtime needs no torch:
- vision.onnx   pixels (N, 3, S, S) -> visual_tokens (N, grid*grid, H)   encoder + pooling + projector
- embed.onnx    input_ids (B, T) -> inputs_embeds (B, T, H)
- decoder.onnx  inputs_embeds (B, T, H), attention_mask (B, P+T), position_ids (B, T), logits_index (K,),
                past_key_i / past_value_i (B, kv_heads, P, head_dim) for every layer
                -> logits (B, K, V) at the positions in logits_index,
                   present_key_i / present_value_i (B, kv_heads, P+T, head_dim)
                (a prefill needs the last position's logits only: the vocabulary projection is ~20% of
                SmolLM2's FLOPs per token, so computing it for every prompt token is waste)
Batch, sequence and past lengths are dynamic axes. The decoder is given a ready 4D additive mask built
here with plain tensor ops, so the exported graph holds no data-dependent mask code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from emoverse.runtime.graphs import (  # noqa: F401  (the graph modules are the runtime's; re-exported)
    OPSET,
    DecoderGraph,
    EmbedGraph,
    VisionGraph,
    _exportable_activations,
    kv_shape,
)


def export_all(model, out: Path, opset: int = OPSET) -> dict[str, Path]:
    """Write vision.onnx (when the model has a vision encoder), embed.onnx, decoder.onnx into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()  # and every wrapper below .eval(): torch.onnx.export restores a wrapper's training mode
    llm = model.llm
    llm.config._attn_implementation = "eager"  # plain MatMul/Softmax: exports everywhere
    paths: dict[str, Path] = {}
    with torch.no_grad():
        if model.vision is not None:
            _exportable_activations(model.vision)
            size = model.cfg.image_size
            paths["vision"] = out / "vision.onnx"
            torch.onnx.export(
                VisionGraph(model).eval(),
                (torch.zeros(2, 3, size, size),),
                paths["vision"],
                opset_version=opset,
                input_names=["pixels"],
                output_names=["visual_tokens"],
                dynamic_axes={"pixels": {0: "images"}, "visual_tokens": {0: "images"}},
                dynamo=False,
            )
        paths["embed"] = out / "embed.onnx"
        torch.onnx.export(
            EmbedGraph(model).eval(),
            (torch.zeros(2, 3, dtype=torch.long),),
            paths["embed"],
            opset_version=opset,
            input_names=["input_ids"],
            output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}},
            dynamo=False,
        )
        n_layers, kv_heads, head_dim = kv_shape(llm)
        hidden = llm.config.hidden_size
        b, t, p = 2, 3, 4
        past = []
        names_in, names_out = ["inputs_embeds", "attention_mask", "position_ids", "logits_index"], ["logits"]
        axes = {
            "inputs_embeds": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"},
            "logits_index": {0: "n_logits"},
            "logits": {0: "batch", 1: "n_logits"},
        }
        for i in range(n_layers):
            for kind in ("key", "value"):
                past.append(torch.zeros(b, kv_heads, p, head_dim))
                names_in.append(f"past_{kind}_{i}")
                names_out.append(f"present_{kind}_{i}")
                axes[f"past_{kind}_{i}"] = {0: "batch", 2: "past"}
                axes[f"present_{kind}_{i}"] = {0: "batch", 2: "total"}
        args = (
            torch.zeros(b, t, hidden),
            torch.ones(b, p + t, dtype=torch.long),
            torch.arange(p, p + t).repeat(b, 1),
            torch.tensor([0, t - 1]),
            *past,
        )
        paths["decoder"] = out / "decoder.onnx"
        torch.onnx.export(
            DecoderGraph(llm).eval(),
            args,
            paths["decoder"],
            opset_version=opset,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            dynamo=False,
        )
    import onnx

    for p_ in paths.values():
        onnx.checker.check_model(str(p_))  # by path: works past the 2 GB protobuf limit too
    return paths
