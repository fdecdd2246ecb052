"""Side by side in one run: greedy decode tokens/s of the PyTorch fp32 model vs an ONNX Runtime bundle
(issue target: ORT 4-bit >= 3x torch fp32). EMOVERSE_BENCH_MODEL=runs/nano/model
EMOVERSE_BENCH_BUNDLE=bundles/nano-cpu-int4 pytest bench/test_decode_ratio.py --benchmark-only -s"""

import os
import time

import pytest

from emoverse.model import EmoVerse
from emoverse.runtime.ort import OrtRuntime
from emoverse.tasks import TASKS

MODEL, BUNDLE = os.environ.get("EMOVERSE_BENCH_MODEL"), os.environ.get("EMOVERSE_BENCH_BUNDLE")
pytestmark = pytest.mark.skipif(not (MODEL and BUNDLE), reason="set EMOVERSE_BENCH_MODEL and EMOVERSE_BENCH_BUNDLE")
PROMPT = TASKS["eri"].query("I can't believe you did that to me after everything")
NEW_TOKENS = 64


def _tokens_per_s(fn, n_tokens: int, rounds: int = 3) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return n_tokens * rounds / (time.perf_counter() - t0)


def test_decode_tokens_per_s_ratio(benchmark):
    import torch

    model = EmoVerse.load(MODEL).eval()
    rt = OrtRuntime(BUNDLE)
    enc = model.prompts.encode(PROMPT, None, [], [])
    ids = torch.tensor([enc.input_ids])

    def torch_decode():  # fixed token count: no early stop, so both sides decode the same number of steps
        with torch.no_grad():
            model.llm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
            )

    def ort_decode():
        import numpy as np

        emb = rt.embed(PROMPT, [])[None]
        mask = np.ones((1, emb.shape[1]), dtype=np.int64)
        logits, cache = rt.forward(emb, mask, rt.empty_cache(1), [emb.shape[1] - 1])  # last position's logits
        for _ in range(NEW_TOKENS):
            nxt = np.array([[int(logits[0, -1].argmax())]])
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            logits, cache = rt.forward(rt.token_embeds(nxt), mask, cache, [0])

    torch_tps = _tokens_per_s(torch_decode, NEW_TOKENS)
    ort_tps = benchmark.pedantic(lambda: _tokens_per_s(ort_decode, NEW_TOKENS), rounds=1, iterations=1)
    benchmark.extra_info.update(torch_fp32_tokens_per_s=torch_tps, ort_tokens_per_s=ort_tps, ratio=ort_tps / torch_tps)
    print(f"\ntorch fp32 {torch_tps:.1f} tok/s, ORT bundle {ort_tps:.1f} tok/s, ratio {ort_tps / torch_tps:.2f}x")
