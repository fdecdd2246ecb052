"""`emoverse ...` as the runtime ran before it asked onnxruntime for exact integer GEMMs
(`emoverse.runtime.ort.session_options(integer_gemms=True)`: session.x64quantprecision): every session opened
with plain SessionOptions. On a CPU without VNNI (AVX2 only) the INT8 prefill decoder's u8s8 GEMMs then saturate; this
measures what that does to the answers (on CPUs with VNNI or AMX it changes nothing).

    python scripts/emoverse_saturating_int8.py eval --model BUNDLE --data data/amt --tasks msa fer --out DIR ...
    python scripts/emoverse_saturating_int8.py bench --bundle BUNDLE --data data/amt --target cpu --out DIR ...
"""

from __future__ import annotations

import sys

import onnxruntime as ort

import emoverse.runtime.ort as runtime_ort
from emoverse.cli import main

if __name__ == "__main__":
    # plain options for every graph, the INT8 prefill decoder too (the runtime looks the name up per session)
    runtime_ort.session_options = lambda integer_gemms=False: ort.SessionOptions()
    sys.exit(main(sys.argv[1:]))
