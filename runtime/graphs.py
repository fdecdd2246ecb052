"""The bundle format, owned by the runtime that reads it: the torch modules each ONNX graph is exported
from (vision, embed, decoder with explicit KV-cache tensors; the PyTorch backend runs the very same
decoder module), and the runtime config written beside the graphs (`runtime.json`).

`export` builds bundles from these; the ONNX Runtime backend (`ort.py`) reads them without torch.
"""

from __future__ import annotations

import torch
from torch import nn

from emoverse.model import frozen_features
from emoverse.runtime.ort import RUNTIME_FORMAT
from emoverse.tasks import TASKS

OPSET = 17


class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision = model.vision
        self.face = model.face
        self.projector = model.projector
        self.cfg = model.cfg

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(frozen_features(self.vision, self.face, pixels, self.cfg))


class EmbedGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.llm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


GROUPED_ATTENTION = "emoverse_grouped"  # the decoder graph's attention (registered with transformers below)


def grouped_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention for grouped-query attention without `repeat_kv`: the query heads that share a KV head
    are one (groups * T) block against that head's keys and values, so the exported graph multiplies by the
    cached K/V as they are instead of copying them `groups` times per layer per step (an `Expand` that grows
    with the cache: SmolLM2 has 9 query heads over 3 KV heads; measured 237 -> 85 us per layer at T = 1 over
    300 cached positions). Same arithmetic as transformers' eager path up to summation order."""
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # -1 for the one size that is no input axis's own: the export's shape folding (`fold_shape_arithmetic`)
    # turns every reshape here into a constant target
    q = query.reshape(b, kv_heads, -1, d)  # (B, kv, groups * T, d): head = kv * groups + j, repeat_kv's order
    weights = torch.matmul(q, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # (B, 1, T, S): the same mask for every group, tiled to the groups' rows
        weights = weights + attention_mask.repeat(1, 1, groups, 1)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).reshape(b, heads, -1, d).transpose(1, 2).contiguous()
    return out, weights


def _register_grouped_attention() -> None:
    """Known to transformers as an attention function and, for the masks it builds when a caller passes none
    (the PyTorch model the export is checked against), as eager attention's additive float mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention_forward)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)


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
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device).masked_fill(
            ~allowed, torch.finfo(inputs_embeds.dtype).min
        )
        out = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_index,
        )
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


SENTINEL = "\u2063QUERY\u2063"


def runtime_config(model, graphs: dict[str, str]) -> dict:
    """What the runtime needs besides the graphs: chat template halves, special tokens, shapes, tasks."""
    text = model.prompts.render(SENTINEL, 0)
    prefix, suffix = text.split(SENTINEL)
    tok = model.tokenizer
    return {
        "format": RUNTIME_FORMAT,
        "chat_prefix": prefix,
        "chat_suffix": suffix,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "n_visual": model.cfg.n_visual,
        "image_size": model.cfg.image_size,
        "max_length": model.cfg.max_length,
        "kv_shape": list(kv_shape(model.llm)),
        "hidden_size": model.llm.config.hidden_size,
        "opset": OPSET,
        "llm_parameters": sum(p.numel() for p in model.llm.parameters()),
        "graphs": graphs,
        "tasks": {
            name: {
                "tag": t.tag,
                "labels": list(t.labels),
                "closed": t.closed,
                "max_new_tokens": t.max_new_tokens,
            }
            for name, t in TASKS.items()
        },
    }
