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
    GROUPED_ATTENTION,
    OPSET,
    DecoderGraph,
    EmbedGraph,
    VisionGraph,
    _exportable_activations,
    _register_grouped_attention,
    kv_shape,
)


def export_all(model, out: Path, opset: int = OPSET) -> dict[str, Path]:
    """Write vision.onnx (when the model has a vision encoder), embed.onnx, decoder.onnx into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()  # and every wrapper below .eval(): torch.onnx.export restores a wrapper's training mode
    llm = model.llm
    _register_grouped_attention()
    previous_attention = llm.config._attn_implementation
    llm.config._attn_implementation = GROUPED_ATTENTION  # plain MatMul/Softmax (exports everywhere), no K/V copies
    try:
        return _export_graphs(model, llm, out, opset)
    finally:  # the caller's model keeps its own attention (it may go on to run or be evaluated in PyTorch)
        llm.config._attn_implementation = previous_attention


def _export_graphs(model, llm, out: Path, opset: int) -> dict[str, Path]:
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
            fold_maxpool_padding(paths["vision"])
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


def fold_maxpool_padding(path: Path) -> int:
    """Fold every Pad(constant -inf) that only feeds MaxPool nodes into those MaxPools' own `pads`, in place;
    returns how many. The face encoder pads its pools as Keras' "same" does (`face._tf_same_pad`, -inf), which
    the exporter writes as a Pad node; ONNX MaxPool's pads never win a max, so the fold is exact. Why: an
    infinite constant in the graph is a tensor static INT8 calibration cannot quantize — onnxruntime's
    quantizer gave the -inf-padded tensors an infinite scale and the face tokens came out as noise (FER 31.5%
    of the teacher for the first static-INT8 vision bundle of v3). The exporter computes the pad widths from
    traced shapes; the graph's spatial input size is fixed (only the batch is dynamic), so they are evaluated
    once, checked equal at two batch sizes, and stored as constants."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def foldable(pad) -> bool:
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        pools = readers.get(pad.output[0], [])
        value = consts.get(pad.input[2]) if len(pad.input) > 2 else None
        return (
            mode == "constant"
            and len(pad.input) == 3  # no axes input (opset 18): not written by the exporter here
            and value is not None
            and np.size(value) == 1
            and bool(np.isneginf(value).all())
            and bool(pools)
            and pad.output[0] not in graph_outputs
            and all(p.op_type == "MaxPool" for p in pools)
            and all(
                helper.get_attribute_value(a) in (b"NOTSET", "NOTSET") or not any(helper.get_attribute_value(a))
                for p in pools
                for a in p.attribute
                if a.name in ("auto_pad", "pads")
            )
        )

    pads = [pad for pad in g.node if pad.op_type == "Pad" and foldable(pad)]
    if not pads:
        return 0
    widths = {**_evaluate(model, [pad.input[1] for pad in pads if pad.input[1] not in consts]), **consts}
    folded = 0
    for pad in pads:
        width = np.asarray(widths[pad.input[1]]).astype(int).tolist()
        rank = len(width) // 2
        if width[0] or width[1] or width[rank] or width[rank + 1]:
            continue  # batch or channel axes padded: not a pooling pad
        spatial = width[2:rank] + width[rank + 2 :]  # ONNX pads: begins of every axis, then ends
        for pool in readers[pad.output[0]]:
            for a in [a for a in pool.attribute if a.name == "pads"]:
                pool.attribute.remove(a)
            pool.attribute.append(helper.make_attribute("pads", spatial))
            pool.input[0] = pad.input[0]
        g.node.remove(pad)
        folded += 1
    _drop_dead_nodes(g)
    onnx.save(model, str(path))
    return folded


def _evaluate(model, names: list[str]) -> dict:
    """Values of intermediate tensors `names` that do not depend on the batch: the graph run on zero inputs
    at batch sizes 1 and 2 (its other axes as declared), refused if they differ."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    runs = []
    for batch in (1, 2):
        feeds = {}
        for inp in sess.get_inputs():
            shape = [batch if i == 0 else d for i, d in enumerate(inp.shape)]
            if not all(isinstance(d, int) for d in shape):
                raise ValueError(f"fold_maxpool_padding: input {inp.name} has a dynamic axis besides the batch")
            feeds[inp.name] = np.zeros(shape, dtype=np.float32)
        runs.append(sess.run(names, feeds))
    for name, a, b in zip(names, *runs, strict=True):
        if not np.array_equal(a, b):
            raise ValueError(f"fold_maxpool_padding: {name} depends on the batch size")
    return dict(zip(names, runs[0], strict=True))


def _drop_dead_nodes(graph) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), then initializers no node reads."""
    from emoverse.runtime.ort import drop_unread_initializers

    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    drop_unread_initializers(graph)
