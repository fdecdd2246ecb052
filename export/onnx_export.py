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
from torch import nn

OPSET = 17


class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision = model.vision
        self.projector = model.projector
        self.grid = model.cfg.visual_grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from emoverse.model import grid_pool

        return self.projector(grid_pool(self.vision.extract_features(pixels), self.grid))


class EmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.llm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderGraph(nn.Module):
    """The LLM with explicit KV-cache tensors in and out (a flat list, two per layer)."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm
        self.n_layers = llm.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_index, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        t = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        # additive causal + padding mask (B, 1, T, P+T): query j (absolute P + j) sees keys <= P + j
        q_pos = torch.arange(t, device=inputs_embeds.device) + (total - t)
        k_pos = torch.arange(total, device=inputs_embeds.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype).masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, logits_to_keep=logits_index)
        presents = []
        for i in range(self.n_layers):
            layer = out.past_key_values.layers[i]
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _exportable_activations(vision: nn.Module) -> None:
    """Swap only the memory-efficient swish (a custom autograd op the exporter cannot trace) for the plain
    one. Not `set_swish(memory_efficient=False)`: in efficientnet-lite it also replaces Lite's ReLU6 with
    swish, silently changing the network."""
    for module in vision.modules():
        act = getattr(module, "_swish", None)
        if act is not None and type(act).__name__ == "MemoryEfficientSwish":
            from efficientnet_lite_pytorch.utils import Swish

            module._swish = Swish()


def kv_shape(llm) -> tuple[int, int, int]:
    c = llm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


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
            torch.onnx.export(VisionGraph(model).eval(), (torch.zeros(2, 3, size, size),), paths["vision"], opset_version=opset,
                              input_names=["pixels"], output_names=["visual_tokens"],
                              dynamic_axes={"pixels": {0: "images"}, "visual_tokens": {0: "images"}}, dynamo=False)
        paths["embed"] = out / "embed.onnx"
        torch.onnx.export(EmbedGraph(model).eval(), (torch.zeros(2, 3, dtype=torch.long),), paths["embed"], opset_version=opset,
                          input_names=["input_ids"], output_names=["inputs_embeds"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}},
                          dynamo=False)
        n_layers, kv_heads, head_dim = kv_shape(llm)
        hidden = llm.config.hidden_size
        b, t, p = 2, 3, 4
        past = []
        names_in, names_out = ["inputs_embeds", "attention_mask", "position_ids", "logits_index"], ["logits"]
        axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "seq"}, "logits_index": {0: "n_logits"},
                "logits": {0: "batch", 1: "n_logits"}}
        for i in range(n_layers):
            for kind in ("key", "value"):
                past.append(torch.zeros(b, kv_heads, p, head_dim))
                names_in.append(f"past_{kind}_{i}")
                names_out.append(f"present_{kind}_{i}")
                axes[f"past_{kind}_{i}"] = {0: "batch", 2: "past"}
                axes[f"present_{kind}_{i}"] = {0: "batch", 2: "total"}
        args = (torch.zeros(b, t, hidden), torch.ones(b, p + t, dtype=torch.long),
                torch.arange(p, p + t).repeat(b, 1), torch.tensor([0, t - 1]), *past)
        paths["decoder"] = out / "decoder.onnx"
        torch.onnx.export(DecoderGraph(llm).eval(), args, paths["decoder"], opset_version=opset, input_names=names_in,
                          output_names=names_out, dynamic_axes=axes, dynamo=False)
    import onnx

    for p_ in paths.values():
        onnx.checker.check_model(str(p_))  # by path: works past the 2 GB protobuf limit too
    return paths
