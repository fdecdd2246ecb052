"""The model on a tiny random config: forward/backward, what trains, visual slots, scoring, save/load."""

import pytest
import torch
from PIL import Image
from tiny_models import TINY

from emoverse.artifacts import ArtifactError
from emoverse.model import EmoVerse, ModelConfig
from emoverse.prompting import MediaError, PromptTooLong
from emoverse.tasks import TASKS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = EmoVerse.build(ModelConfig(**TINY))
    m.freeze_base()
    return m


def test_only_projector_and_lora_train(model):
    names = list(model.trainable_parameters())
    assert names and all(n.startswith("projector.") or "lora_" in n for n in names)
    assert any(n.startswith("projector.") for n in names) and any("lora_" in n for n in names)


def test_forward_backward_with_image(model, face):
    fer = TASKS["fer"]
    enc = model.prompts.encode(fer.query(("happy", "anger"), False), "Happy.", [face], [])
    assert sum(enc.visual_mask) == 4  # grid 2 -> 4 visual tokens
    text = TASKS["mer"]
    enc2 = model.prompts.encode(text.query("hi"), "Joy.", [], [])
    assert sum(enc2.visual_mask) == 0
    batch = model.prompts.collate([enc, enc2])
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.trainable_parameters().items()}
    assert grads["projector.fc2.weight"] is not None and grads["projector.fc2.weight"].abs().sum() > 0
    model.zero_grad()


def test_loss_only_on_response_tokens(model):
    enc = model.prompts.encode("question", "Positive.", [], [])
    n_resp = len(model.tokenizer.encode("Positive." + model.tokenizer.eos_token, add_special_tokens=False))
    assert sum(lbl != -100 for lbl in enc.labels) == n_resp
    assert enc.labels[-n_resp:] == enc.input_ids[-n_resp:]


def test_image_placeholder_positions(model, face):
    enc = model.prompts.encode("<image> look", None, [face], [])
    first_visual = enc.visual_mask.index(True)
    before = model.tokenizer.decode(enc.input_ids[:first_visual])
    assert before.endswith("user\n")


def test_missing_and_corrupt_images_are_named(model, tmp_path):
    with pytest.raises(MediaError, match="nope.png: image file not found"):
        model.generate("<image> q", [str(tmp_path / "nope.png")], max_new_tokens=1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(MediaError, match="bad.png: unreadable image"):
        model.generate("<image> q", [str(bad)], max_new_tokens=1)


def test_too_many_placeholders(model, face):
    with pytest.raises(ValueError, match="2 <image> placeholders but only 1"):
        model.prompts.encode("<image><image>", None, [face], [])


def test_over_long_prompt(model):
    with pytest.raises(PromptTooLong, match="over the model's max_length"):
        model.prompts.encode("word " * 5000, None, [], [])


@torch.no_grad()
def test_score_equals_full_forward_logprob(model, face):
    """Scoring with one prefill + cached candidate batch equals scoring each full sequence from scratch."""
    model.eval()
    q = TASKS["fer"].query(("happy", "anger", "surprise"), False)
    cands = ["Happy.", "Anger.", "Surprise."]
    fast = model.score(q, cands, [face])
    for c, s in zip(cands, fast, strict=True):
        enc = model.prompts.encode(q, c, [face], [])
        enc.input_ids = enc.input_ids[:-1]  # drop the end-of-turn token the training form appends
        enc.visual_mask = enc.visual_mask[:-1]
        ids = torch.tensor([enc.input_ids])
        logits = model.llm(inputs_embeds=model.embed(ids, torch.tensor([enc.visual_mask]), enc.media)).logits[0]
        n = len(model.tokenizer.encode(c, add_special_tokens=False))
        lp = logits[-n - 1 : -1].log_softmax(-1)
        ref = sum(float(lp[j, ids[0, -n + j]]) for j in range(n))
        assert s == pytest.approx(ref, abs=1e-4)


@torch.no_grad()
def test_save_load_roundtrip(model, face, tmp_path):
    model.eval()
    q = TASKS["fer"].query(("happy", "anger"), False)
    before = model.score(q, ["Happy.", "Anger."], [face])
    model.save(tmp_path / "art", producer={"stage": "test"})
    loaded = EmoVerse.load(tmp_path / "art")
    assert loaded.score(q, ["Happy.", "Anger."], [face]) == pytest.approx(before, abs=1e-4)
    assert "lora" not in " ".join(n for n, _ in loaded.llm.named_parameters())  # LoRA merged


def test_tampered_artifact_is_refused(model, tmp_path):
    model.save(tmp_path / "art", producer={"stage": "test"})
    with open(tmp_path / "art" / "projector.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x00\x01")
    with pytest.raises(ArtifactError, match="projector.safetensors does not match"):
        EmoVerse.load(tmp_path / "art")


def test_text_only_model_rejects_images(face):
    m = EmoVerse.build(ModelConfig(**{**TINY, "vision": "none"}), lora=False)
    with pytest.raises(ValueError, match="no vision encoder"):
        m.generate("<image> q", [face], max_new_tokens=1)


def test_video_frames_become_visual_tokens(model, tmp_path):
    """A video is N frames sampled at load time, each spliced in as grid*grid visual tokens."""
    frames = [Image.new("RGB", (40, 40), (i * 40, 0, 0)) for i in range(6)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    enc = model.prompts.encode(TASKS["mer"].query("hi"), "Joy.", [], [str(gif)])
    assert [m.frame for m in enc.media] == [0, 2, 3, 5]  # max_video_frames=4, evenly spaced
    assert sum(enc.visual_mask) == 4 * model.cfg.n_visual
    out = model(model.prompts.collate([enc]))
    assert torch.isfinite(out.loss)
    with pytest.raises(MediaError, match="missing.mp4: video file not found"):
        model.prompts.encode("q", None, [], [str(tmp_path / "missing.mp4")])


def test_any_local_hf_causal_lm_folder(tmp_path, face):
    """A Qwen2-style model from a local folder goes through the same code path (LoRA, visual tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from emoverse.model import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    m = EmoVerse.build(ModelConfig(**{**TINY, "llm": str(tmp_path / "qwen")}))
    m.freeze_base()
    assert type(m.llm.base_model.model).__name__ == "Qwen2ForCausalLM"
    enc = m.prompts.encode(TASKS["fer"].query(("happy", "anger"), False), "Happy.", [face], [])
    m(m.prompts.collate([enc])).loss.backward()
    assert m.projector.fc1.weight.grad is not None


def test_missing_media_can_be_dropped(model, tmp_path):
    """The paper's files list videos the mirror lacks: 'drop' answers text-only instead of failing."""
    q = TASKS["fer"].query(("happy", "anger"), False)
    with pytest.raises(MediaError, match="not found"):
        model.prompts.encode(q, None, [str(tmp_path / "gone.png")], [str(tmp_path / "gone.mp4")])
    model.prompts.missing_media = "drop"
    try:
        enc = model.prompts.encode(q, None, [str(tmp_path / "gone.png")], [str(tmp_path / "gone.mp4")])
    finally:
        model.prompts.missing_media = "error"
    assert enc.media == [] and not any(enc.visual_mask)


@torch.no_grad()
def test_batched_generation_equals_one_by_one(model, face):
    model.eval()
    reqs = [
        (TASKS["mer"].query("hello there"), [], []),
        (TASKS["fer"].query(("happy", "anger"), True), [face], []),
        (TASKS["msa"].query("a much longer sentence " * 5), [], []),
    ]
    batched = model.generate_batch(reqs, max_new_tokens=6)
    single = [model.generate(q, i, v, max_new_tokens=6) for q, i, v in reqs]
    assert batched == single


@pytest.mark.parametrize("size,grid", [(7, 2), (7, 3), (4, 2), (1, 2), (5, 1)])
def test_grid_pool_equals_adaptive_avg_pool(size, grid):
    from emoverse.model import grid_pool

    x = torch.randn(2, 3, size, size)
    ref = torch.nn.functional.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)
    assert torch.allclose(grid_pool(x, grid), ref, atol=1e-6)


def test_score_batch_equals_one_by_one(model, face):
    """Left padding with explicit positions changes no score: a batch of prompts of different lengths (one
    with an image) scores as each does alone."""
    mer, fer = TASKS["mer"], TASKS["fer"]
    reqs = [
        (mer.query("no"), mer.candidates(mer.query("no")), [], []),
        (
            mer.query("I really cannot believe you would do that to me after all these years"),
            mer.candidates(mer.query("x")),
            [],
            [],
        ),
        (fer.query(["happy", "sadness"], False), ["Happy.", "Sadness."], [str(face)], []),
    ]
    batched = model.score_batch(reqs)
    for (q, c, i, v), b in zip(reqs, batched, strict=True):
        assert b == pytest.approx(model.score_batch([(q, c, i, v)])[0], abs=2e-4)
