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
    from onnx import helper

    model = onnx.load(str(path))
    g = model.graph
    consts = _constants(g, g.initializer)
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


def _constants(graph, initializers) -> dict:
    """name -> value of `initializers` (of `graph`) and of every Constant node's output."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in initializers}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


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
    """Remove nodes none of whose outputs is read, then initializers no node reads. One sweep from the end: ONNX
    keeps nodes in topological order, so a node's readers all come after it."""
    from emoverse.runtime.ort import drop_unread_initializers

    read = {o.name for o in graph.output}
    kept = []
    for n in reversed(graph.node):
        if any(o in read for o in n.output):
            kept.append(n)
            read.update(n.input)
    if len(kept) < len(graph.node):
        kept.reverse()
        del graph.node[:]
        graph.node.extend(kept)
    drop_unread_initializers(graph)


def fold_shape_arithmetic(path: Path, check_shapes=((1, 5, 0), (2, 1, 7), (3, 4, 2))) -> dict:
    """Replace the decoder graph's shape arithmetic by constants where the shapes fix it, in place; returns what
    was done. The exporter traces every `view`/`reshape` with sizes read from a tensor at run time (Shape ->
    Gather -> Unsqueeze -> Concat -> Reshape), ~1,400 nodes for SmolLM2 that onnxruntime runs on every call (its
    own constant folding cannot: the tensors have dynamic axes). With onnxruntime's symbolic shape inference:
    - `Gather(Shape(x), k)` where axis k of x has a fixed size -> that size;
    - `Reshape(y, Concat(...))` whose every part is a constant or the size of y's own axis at that position ->
      one constant target, with ONNX Reshape's 0 ("keep this axis") for the copied sizes.
    Only shapes change, never arithmetic on values, so the outputs are bit-identical; that is checked, not
    assumed: the graph before and after runs on random inputs at each (batch, new tokens, cached tokens) of
    `check_shapes`, and any difference keeps the original graph (reported). With the grouped attention written
    for it (runtime.graphs): 2,933 -> 1,611 nodes after onnxruntime's own optimisations, a 4-bit decode step
    0.90-0.95x on an AMD EPYC with AVX2 (two runs), a 50-token INT8 prefill 0.96-0.98x (docs/history.md).
    Written here because onnxslim and onnxruntime's transformer fusions (FusionReshape/FusionShape) match other
    exporters' patterns and left these in place (tried)."""
    import contextlib
    import os
    import tempfile

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path), load_external_data=False)  # external weights stay in their files, by reference
    g = model.graph
    # shape inference needs the shapes of the weights, not their values: large initializers enter as inputs
    skeleton = helper.make_graph([], g.name, list(g.input), list(g.output))
    skeleton.node.extend(g.node)
    small = [t for t in g.initializer if np.prod(t.dims) <= 64 and t.data_location != onnx.TensorProto.EXTERNAL]
    skeleton.initializer.extend(small)
    small_names = {t.name for t in small}
    skeleton.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in g.initializer
        if t.name not in small_names
    )
    # in a scratch folder: where inference is incomplete it saves its partial model to the working directory
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        try:
            inferred = SymbolicShapeInference.infer_shapes(
                helper.make_model(skeleton, opset_imports=model.opset_import, ir_version=model.ir_version),
                auto_merge=True,
            )
        except Exception as e:  # noqa: BLE001  (a graph it cannot infer keeps its shape nodes; nothing is lost)
            return {"skipped": f"symbolic shape inference failed: {e}"}
    # axis sizes: an int, a symbol ("batch", "seq", ...) or None where unknown
    shapes = {
        vi.name: [
            d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
            for d in vi.type.tensor_type.shape.dim
        ]
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    consts = _constants(g, small)
    producer = {o: n for n in g.node for o in n.output}
    added: list = []

    def constant(value, hint: str) -> str:
        name = f"shape_folded_{hint}_{len(added)}"
        added.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        consts[name] = np.asarray(value, dtype=np.int64)
        return name

    def axis_size(name: str):
        """The size `name` holds when it is Gather(Shape(x), k): x's axis k as shape inference knows it
        (an int or a symbol), else None."""
        gather = producer.get(name)
        if gather is None or gather.op_type != "Gather" or gather.input[1] not in consts:
            return None
        shape = producer.get(gather.input[0])
        k = consts[gather.input[1]]
        if shape is None or shape.op_type != "Shape" or shape.attribute or k.ndim:
            return None
        dims = shapes.get(shape.input[0])
        return dims[int(k) % len(dims)] if dims else None

    stats = {"fixed_sizes": 0, "constant_reshapes": 0}
    renamed = {}
    for n in g.node:
        size = axis_size(n.output[0]) if n.op_type == "Gather" else None
        if isinstance(size, int) and size > 0:
            renamed[n.output[0]] = constant(size, "size")
            stats["fixed_sizes"] += 1
    for n in g.node:
        n.input[:] = [renamed.get(i, i) for i in n.input]
    for n in (n for n in g.node if n.op_type == "Reshape" and len(n.input) == 2):
        concat, own = producer.get(n.input[1]), shapes.get(n.input[0])
        allowzero = any(a.name == "allowzero" and a.i for a in n.attribute)
        if concat is None or concat.op_type != "Concat" or not own or allowzero:
            continue
        target = []
        for axis, part in enumerate(concat.input):
            unsq = producer.get(part)
            scalar = unsq.input[0] if unsq is not None and unsq.op_type == "Unsqueeze" else None
            if part in consts and consts[part].size == 1:
                target.append(int(consts[part].reshape(-1)[0]))
            elif scalar in consts and consts[scalar].size == 1:
                target.append(int(consts[scalar].reshape(-1)[0]))
            elif scalar is not None and axis < len(own) and own[axis] is not None and axis_size(scalar) == own[axis]:
                target.append(0)  # Reshape's "this axis as it is" (allowzero 0)
            else:
                break
        else:
            if target.count(-1) <= 1:
                n.input[1] = constant(target, "target")
                stats["constant_reshapes"] += 1
    g.initializer.extend(added)
    before = len(g.node)
    _drop_dead_nodes(g)
    stats["nodes_removed"] = before - len(g.node)
    folded = path.with_name(path.stem + ".folded.onnx")  # beside it: external data it names resolve the same
    onnx.save(model, str(folded))
    try:
        differs = _first_difference(path, folded, check_shapes)
        if differs:
            return {"skipped": f"outputs differ after folding ({differs}); the exported graph is kept", **stats}
        os.replace(folded, path)
    finally:
        folded.unlink(missing_ok=True)
    return {**stats, "checked_bit_identical_at": [list(s) for s in check_shapes]}


def random_decoder_inputs(session, batch: int, new: int, cached: int, rng) -> dict:
    """Inputs of one call of a decoder graph (an onnxruntime session of it): random embeddings and cache of
    `batch` rows, `new` tokens over `cached` positions, the first position masked (padding is exercised too),
    logits at the first and the last new token."""
    import numpy as np

    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, cached + new), dtype=np.int64)
            feeds[inp.name][:, 0] = 0 if cached + new > 1 else 1
        elif inp.name == "position_ids":
            feeds[inp.name] = np.tile(np.arange(cached, cached + new, dtype=np.int64), (batch, 1))
        elif inp.name == "logits_index":
            feeds[inp.name] = np.array(sorted({0, new - 1}), dtype=np.int64)
        else:  # inputs_embeds (batch, new, H), past_* (batch, kv_heads, cached, head_dim)
            fixed = [d for d in inp.shape if isinstance(d, int)]
            shape = (batch, new, *fixed) if inp.name == "inputs_embeds" else (batch, fixed[0], cached, fixed[1])
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _first_difference(a: Path, b: Path, check_shapes) -> str | None:
    """Where decoder graphs `a` and `b` first give different outputs (not bit-identical) on the same random
    inputs at each (batch, new tokens, cached tokens) in `check_shapes`; None if they never do."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (a, b)]
    rng = np.random.default_rng(0)
    for batch, seq, past in check_shapes:
        feeds = random_decoder_inputs(sessions[0], batch, seq, past, rng)
        outs = [s.run(None, feeds) for s in sessions]
        for out, x, y in zip(sessions[0].get_outputs(), *outs, strict=True):
            if x.shape != y.shape or not np.array_equal(x, y):
                return f"{out.name} at batch {batch}, {seq} new, {past} cached tokens"
    return None
