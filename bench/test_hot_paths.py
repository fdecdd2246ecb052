"""pytest-benchmark suite (not in the default test run): `make bench`, or
`pytest bench --benchmark-only --benchmark-autosave` then `--benchmark-compare` against a saved run.

Throughput figures go to each benchmark's extra_info (tokens/s), so they land in the saved JSON.
"""

import pytest
import torch

from emoverse.model import EmoVerse, ModelConfig
from emoverse.tasks import TASKS


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    m = EmoVerse.build(ModelConfig())
    m.freeze_base()
    return m


def test_train_step_mer_batch8(benchmark, nano, amt_records):
    """One M2SE step (forward + backward, LoRA + projector) on 8 MER records."""
    items = [nano.prompts.encode(r.query, r.response, r.images, r.videos) for r in amt_records["mer"][:8]]
    batch = nano.prompts.collate(items)
    opt = torch.optim.AdamW(list(nano.trainable_parameters().values()), lr=1e-5)
    nano.train()

    def step():
        opt.zero_grad()
        nano(batch).loss.backward()
        opt.step()

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    tokens = int(batch["attention_mask"].sum())
    benchmark.extra_info.update(tokens=tokens, tokens_per_s=tokens / benchmark.stats.stats.mean)


def test_train_step_fer_batch8(benchmark, nano, amt_records):
    """The same on 8 CK+ faces (vision features cached, as in training)."""
    items = [nano.prompts.encode(r.query, r.response, r.images, r.videos) for r in amt_records["fer"][:8]]
    batch = nano.prompts.collate(items)
    nano.train()

    def step():
        nano.zero_grad()
        nano(batch, cache_features=True).loss.backward()

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    tokens = int(batch["attention_mask"].sum())
    benchmark.extra_info.update(tokens=tokens, tokens_per_s=tokens / benchmark.stats.stats.mean)


def test_vision_encode_one_image(benchmark, nano, amt_records):
    rec = amt_records["fer"][0]
    ref = nano.prompts.media_refs(rec.images, [])[0]
    nano.eval()
    benchmark(lambda: nano.vision_features(nano.prompts.pixels(ref)[None]))


def test_label_scoring_mer(benchmark, nano, amt_records):
    rec = amt_records["mer"][0]
    cands = TASKS["mer"].candidates(rec.query)
    nano.eval()
    benchmark.pedantic(lambda: nano.score(rec.query, cands), rounds=5, iterations=1, warmup_rounds=1)
