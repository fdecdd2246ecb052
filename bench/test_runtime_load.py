"""Load benchmark: the ORT runtime's memory over 10,000 requests from 4 threads (run with `make bench`).
Needs a bundle: EMOVERSE_BENCH_BUNDLE=bundles/cpu-int4 (skipped otherwise)."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from emoverse.bench.runner import rss_mb
from emoverse.runtime.ort import OrtRuntime
from emoverse.tasks import TASKS

BUNDLE = os.environ.get("EMOVERSE_BENCH_BUNDLE")


@pytest.mark.skipif(not BUNDLE, reason="set EMOVERSE_BENCH_BUNDLE to a bundle folder")
def test_memory_flat_over_10k_requests(benchmark):
    rt = OrtRuntime(BUNDLE)
    reqs = [("msa", TASKS["msa"].query(f"request {i} was fine")) for i in range(10_000)]
    samples = []

    def serve():
        with ThreadPoolExecutor(max_workers=4) as pool:
            for i, _ in enumerate(pool.map(lambda r: rt.answer(*r), reqs)):
                if i % 1000 == 0:
                    samples.append(rss_mb())

    benchmark.pedantic(serve, rounds=1, iterations=1)
    growth = samples[-1] - samples[1]
    benchmark.extra_info.update(rss_mb=samples, growth_mb=growth)
    assert growth < 100
