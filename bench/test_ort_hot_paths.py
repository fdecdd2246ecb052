"""ONNX Runtime hot paths of a bundle (vision encode, prefill, decode step, label scoring).
EMOVERSE_BENCH_BUNDLE=bundles/cpu-int4 make bench   (skipped without a bundle). Save a baseline with
`--benchmark-autosave` and compare a later run with `--benchmark-compare`."""

import os

import numpy as np
import pytest

from emoverse.runtime.ort import OrtRuntime
from emoverse.tasks import TASKS

BUNDLE = os.environ.get("EMOVERSE_BENCH_BUNDLE")
pytestmark = pytest.mark.skipif(not BUNDLE, reason="set EMOVERSE_BENCH_BUNDLE to a bundle folder")


@pytest.fixture(scope="module")
def rt():
    return OrtRuntime(BUNDLE)


def test_vision_encode(benchmark, rt):
    if rt.vision is None:
        pytest.skip("bundle has no vision graph")
    size = rt.cfg["image_size"]
    pixels = np.zeros((1, 3, size, size), dtype=np.float32)
    benchmark(lambda: rt.vision.run(None, {"pixels": pixels}))


def test_prefill_mer_prompt(benchmark, rt):
    emb = rt.embed(TASKS["mer"].query("Why do all your coffee mugs have numbers on the bottom?"), [])[None]
    mask = np.ones((1, emb.shape[1]), dtype=np.int64)
    benchmark(lambda: rt.forward(emb, mask, rt.empty_cache(1), [emb.shape[1] - 1]))
    benchmark.extra_info["prompt_tokens"] = emb.shape[1]


def test_decode_step_at_256_context(benchmark, rt):
    emb = rt.embed(TASKS["msa"].query("word " * 200), [])[None]
    _, cache = rt.forward(emb, np.ones((1, emb.shape[1]), dtype=np.int64), rt.empty_cache(1))
    step = rt.token_embeds(np.array([[rt.pad]]))
    mask = np.ones((1, emb.shape[1] + 1), dtype=np.int64)
    benchmark(lambda: rt.forward(step, mask, cache, [0]))
    benchmark.extra_info["context"] = emb.shape[1]


def test_label_scoring_mer(benchmark, rt):
    q = TASKS["mer"].query("Why do all your coffee mugs have numbers on the bottom?")
    cands = TASKS["mer"].candidates(q)
    benchmark(lambda: rt.score(q, cands))
