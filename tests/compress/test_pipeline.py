"""Compression recipes end to end on the tiny random model: reload, generate, manifest chain, errors."""

import json
import shutil

import pytest

from emoverse.artifacts import ArtifactError, manifest_digest, read_manifest, verify
from emoverse.compress.pipeline import calibration_set, compress, parse_recipe
from emoverse.config import RecipeError
from emoverse.model import EmoVerse
from emoverse.tasks import TASK_NAMES, TASKS


@pytest.mark.parametrize("recipe", ["gptq-w4a16", "fp8-dynamic", "int8-weight-only", "w8a8-smoothquant"])
def test_recipe_end_to_end(recipe, tiny_model_dir, small_amt, tmp_path):
    out = tmp_path / recipe
    m = compress(recipe, tiny_model_dir, small_amt, out)
    assert verify(out, kind="emoverse-model") == m
    assert m["inputs"]["parent"]["digest"] == manifest_digest(read_manifest(tiny_model_dir))
    calibrates = recipe in ("gptq-w4a16", "w8a8-smoothquant")  # the others encode no calibration records
    assert m["inputs"]["calibration"]["tasks"] == (sorted(TASK_NAMES) if calibrates else [])
    assert (m["inputs"]["calibration"]["records"] > 0) == calibrates
    cfg = (out / "llm" / "config.json").read_text()
    assert "quantization_config" in cfg and "compressed-tensors" in cfg
    model = EmoVerse.load(out)
    q = TASKS["msa"].query("great")
    assert len(model.score(q, ["Positive.", "Negative."])) == 2
    assert isinstance(model.generate(q, max_new_tokens=3), str)


def test_calibration_covers_every_task(small_amt, tiny_model_dir):
    calib, digest = calibration_set(small_amt, EmoVerse.load(tiny_model_dir), n_per_task=2)
    assert sorted({c["task"] for c in calib}) == sorted(TASK_NAMES)
    assert calibration_set(small_amt, EmoVerse.load(tiny_model_dir), n_per_task=2)[1] == digest  # deterministic


@pytest.mark.parametrize(
    "text,msg",
    [
        ("stages:\n  - type: prune_everything\n", "unknown stage type 'prune_everything'"),
        ("stages:\n  - type: gptq_w4a16\n    group_sise: 64\n", "group_sise"),
        ("stages:\n  - type: gptq_w4a16\n    group_size: big\n", "group_size.*big"),
        ("stages:\n  - type: gptq_w4a16\n    group_size: 0\n", "must be positive"),
        ("stages: []\n", "non-empty 'stages'"),
    ],
)
def test_bad_recipes_fail_before_work(tmp_path, text, msg):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=msg):
        parse_recipe(p)


def test_group_size_must_divide_widths(tiny_model_dir, small_amt, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - type: gptq_w4a16\n    group_size: 48\n    calibration_samples: 2\n")
    with pytest.raises(ValueError, match="does not divide layer widths"):
        compress(p, tiny_model_dir, small_amt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_distill_then_gptq(tiny_model_dir, small_amt, tmp_path):
    """Distil the 2-layer tiny teacher to 1 layer (chosen by measured importance), then quantize it."""
    p = tmp_path / "r.yaml"
    p.write_text(
        "stages:\n  - type: distill\n    keep_layers: 1\n    steps: 3\n    batch_size: 2\n"
        "    importance_samples: 2\n  - type: gptq_w4a16\n    calibration_samples: 8\n"
    )
    m = compress(p, tiny_model_dir, small_amt, tmp_path / "out")
    d = m["producer"]["stages"][0]
    assert d["type"] == "distill" and len(d["kept_layers"]) == 1 and len(d["layer_importance"]) == 2
    assert d["kept_layers"][0] == max(range(2), key=d["layer_importance"].__getitem__)
    model = EmoVerse.load(tmp_path / "out")
    assert model.llm.config.num_hidden_layers == 1
    assert isinstance(model.generate(TASKS["mer"].query("hi"), max_new_tokens=3), str)
    from emoverse.compare import variant_name

    assert variant_name(tmp_path / "out") == "distill+gptq_w4a16"
    p.write_text(
        "stages:\n  - type: distill\n    keep_layers: 1\n    steps: 1\n    batch_size: 2\n    importance_samples: 2\n"
    )
    compress(p, tiny_model_dir, small_amt, tmp_path / "student")
    compress("fp8-dynamic", tmp_path / "student", small_amt, tmp_path / "student-fp8")  # a second run on the first
    assert variant_name(tmp_path / "student-fp8") == "distill+fp8_dynamic"  # lineage through the parent


def test_distill_keep_layers_bounds(tiny_model_dir, small_amt, tmp_path):
    """Refused before any work, on either artifact form: the adapter-form release has no llm/ folder, its depth
    is its base's."""
    from tiny_models import TINY

    from emoverse.model import EmoVerse, ModelConfig

    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - type: distill\n    keep_layers: 5\n")
    with pytest.raises(ValueError, match="keep_layers=5 must be between 1 and 1"):
        compress(p, tiny_model_dir, small_amt, tmp_path / "out")
    adapter = tmp_path / "adapter"
    EmoVerse.build(ModelConfig(**TINY)).save_adapter(adapter, producer={"stage": "test"})
    with pytest.raises(ValueError, match=r"keep_layers=5 must be between 1 and \d"):
        compress(p, adapter, small_amt, tmp_path / "out-adapter")


def test_compare_table(tiny_model_dir, small_amt, tmp_path, monkeypatch):
    from emoverse.compare import compare, format_compare
    from emoverse.evaluate import evaluate

    q = tmp_path / "fp8"
    compress("fp8-dynamic", tiny_model_dir, small_amt, q)
    evaluate(
        str(tiny_model_dir),
        [str(small_amt)],
        tmp_path / "ref-eval",
        mode="score",
        limit=1,
        tasks=["msa", "mer", "eri"],
    )
    evaluate(str(q), [str(small_amt)], tmp_path / "q-eval", mode="score", limit=1, tasks=["msa"])
    evaluate(str(q), [str(small_amt)], tmp_path / "q-gen", mode="generate", limit=1, tasks=["eri"])
    both = f"{tmp_path / 'q-eval' / 'metrics.json'}+{tmp_path / 'q-gen' / 'metrics.json'}"
    rep = compare([tmp_path / "ref-eval" / "metrics.json", both], out=tmp_path / "cmp")
    ref, row = rep["rows"]
    assert ref["size_ratio"] == 1.0 and row["variant"] == "fp8_dynamic" and ref["variant"] == "run"
    assert {"msa.accuracy", "eri.label_accuracy"} <= set(row["metrics"]) and "mer.weighted_f1" not in row["metrics"]
    paired = row["paired"]["msa"]  # paired with the reference on the same records, from the predictions files
    assert paired["n"] >= 1 and paired["ratio_ci"][0] <= paired["ratio"] <= paired["ratio_ci"][1]
    assert paired["verdict_99"] in ("pass", "fail", "inconclusive") and 0 <= paired["identical_answers"] <= 1
    assert "eri" in row["paired"] and "identical_answers" not in row["paired"]["eri"]  # open answers: no agreement
    assert ref["paired"] == {}
    with pytest.raises(ValueError, match="files evaluate different artifacts"):
        compare(
            [
                tmp_path / "ref-eval" / "metrics.json",
                f"{tmp_path / 'q-eval' / 'metrics.json'}+{tmp_path / 'ref-eval' / 'metrics.json'}",
            ]
        )
    # a copy of the artifact (a release evaluated from another folder) is the same artifact
    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    evaluate(str(tmp_path / "copy"), [str(small_amt)], tmp_path / "copy-eval", mode="score", limit=1, tasks=["fer"])
    joined = f"{tmp_path / 'ref-eval' / 'metrics.json'}+{tmp_path / 'copy-eval' / 'metrics.json'}"
    assert "fer.accuracy" in compare([joined, both], out=tmp_path / "cmp2")["rows"][0]["metrics"]
    # bench latencies join a row by path; a PyTorch artifact is benched in fp32, so a bf16 eval's row gets none
    bench = tmp_path / "bench.json"
    task_row = {"single_stream": {"p90_ms": 50.0}, "tpot": None}
    bench.write_text(
        json.dumps(
            {
                "machine": {"cpu": "CPU A", "cores": 2},
                "config": {"limit": 5},
                "results": [{"path": str(tiny_model_dir), "backend": "torch", "tasks": {"msa": task_row}}],
            }
        )
    )
    monkeypatch.setattr("emoverse.artifacts.cpu_runs_bf16", lambda: True)  # a real bf16 eval on any CPU
    evaluate(
        str(tiny_model_dir), [str(small_amt)], tmp_path / "bf16", mode="score", limit=1, tasks=["msa"], precision="bf16"
    )
    timed = compare([tmp_path / "ref-eval" / "metrics.json", tmp_path / "bf16" / "metrics.json"], bench_report=bench)
    fp32_row, bf16_row = timed["rows"]
    assert fp32_row["latency"]["msa"]["p90_ms"] == 50.0 and "latency" not in bf16_row
    # the report says which machine and bench run its latencies are from
    assert timed["latency_from"] == {"bench": str(bench), "cpu": "CPU A", "cores": 2, "records_per_task": 5}
    assert "latency_from" not in compare([tmp_path / "ref-eval" / "metrics.json"])
    # several runs of one machine: a task's latency from the first run that timed it, each run's tasks recorded
    more = tmp_path / "bench-all.json"
    other = {"single_stream": {"p90_ms": 70.0}, "tpot": {"p50_ms": 10.0}}
    run = {"path": str(tiny_model_dir), "backend": "torch", "tasks": {"msa": other, "eri": other}}
    more.write_text(json.dumps({"machine": {"cpu": "CPU A", "cores": 2}, "config": {"limit": 2}, "results": [run]}))
    two = compare([tmp_path / "ref-eval" / "metrics.json"], bench_report=[bench, more])
    assert two["rows"][0]["latency"]["msa"]["p90_ms"] == 50.0 and two["rows"][0]["latency"]["eri"]["p90_ms"] == 70.0
    assert [x["tasks"] for x in two["latency_from"]] == [["msa"], ["eri"]]
    elsewhere = tmp_path / "bench-b.json"
    elsewhere.write_text(more.read_text().replace("CPU A", "CPU B"))
    with pytest.raises(ValueError, match="different machines"):
        compare([tmp_path / "ref-eval" / "metrics.json"], bench_report=[bench, elsewhere])
    assert row["parameters"] == ref["parameters"]  # quantization keeps the logical parameter count
    assert row["llm_size_ratio"] > 1.0  # the tiny model is mostly its FP32 embedding table
    from safetensors import safe_open

    with safe_open(str(q / "llm" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F8_E4M3" in dtypes
    assert "| fp8_dynamic |" in format_compare(rep) and (tmp_path / "cmp" / "compare.md").is_file()


def test_modelopt_fp8_checkpoint_reloads_with_fp8_numerics(tiny_model_dir, small_amt, tmp_path):
    """ModelOpt's FP8 checkpoint (TensorRT-LLM's form) is read back with FP8 weights and FP8-rounded inputs."""
    import json

    import torch

    out = tmp_path / "mo-fp8"
    m = compress("modelopt-fp8", tiny_model_dir, small_amt, out)
    assert verify(out, kind="emoverse-model") == m and m["producer"]["stages"][0]["calibration_samples"] > 0
    quant = json.loads((out / "llm" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and "lm_head" in quant["exclude_modules"]
    model = EmoVerse.load(out)
    info = model.llm.config.emoverse_quantization
    assert info["producer"] == "modelopt" and info["fp8_linears"] == 7 * model.llm.config.num_hidden_layers
    w = model.llm.model.layers[0].mlp.up_proj.weight
    from safetensors.torch import load_file

    sd = load_file(next((out / "llm").glob("*.safetensors")))
    scale = sd["model.layers.0.mlp.up_proj.weight_scale"]
    assert torch.equal((w / scale).to(torch.float8_e4m3fn).float() * scale, w)  # on the E4M3 grid
    ref = EmoVerse.load(tiny_model_dir)
    q = TASKS["msa"].query("great")
    got, want = model.score(q, ["Positive.", "Negative."]), ref.score(q, ["Positive.", "Negative."])
    assert got != want and abs(got[0] - want[0]) < 1.0  # quantized, and close


def test_gptqmodel_stage_needs_its_environment_before_any_work(tiny_model_dir, small_amt, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - type: distill\n    keep_layers: 1\n    steps: 1\n"
        f"  - type: gptqmodel_w4a16\n    python: {tmp_path / 'nope' / 'python'}\n"
    )
    with pytest.raises(ValueError, match="no GPTQModel environment at .*make gptq-env"):
        compress(recipe, tiny_model_dir, small_amt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


GPTQ_ENV = __import__("pathlib").Path(__file__).resolve().parents[2] / ".venv-gptq"
GPTQ_PY = GPTQ_ENV / "bin" / "python"


@pytest.mark.skipif(
    not any(GPTQ_ENV.glob("lib/python*/site-packages/gptqmodel/__init__.py")),
    reason="no GPTQModel environment (make gptq-env)",
)
def test_gptqmodel_classic_format(tiny_model_dir, small_amt, tmp_path):
    """Runs only where `make gptq-env` was done: GPTQ in the classic format, through the worker."""
    import json

    from safetensors import safe_open

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"stages:\n  - type: gptqmodel_w4a16\n    group_size: 32\n    calibration_samples: 8\n    python: {GPTQ_PY}\n"
    )
    m = compress(recipe, tiny_model_dir, small_amt, tmp_path / "out")
    q = json.loads((tmp_path / "out" / "llm" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and q["group_size"] == 32
    st = next((tmp_path / "out" / "llm").glob("*.safetensors"))
    with safe_open(str(st), "pt") as f:
        keys = set(f.keys())
    assert {
        "model.layers.0.mlp.up_proj.qweight",
        "model.layers.0.mlp.up_proj.qzeros",
        "model.layers.0.mlp.up_proj.scales",
    } <= keys
    assert m["producer"]["stages"][0]["libraries"]["gptqmodel"]
    with pytest.raises(ArtifactError, match="classic GPTQ format"):  # this environment has no gptqmodel
        EmoVerse.load(tmp_path / "out")
    import subprocess

    code = (
        "import sys; from emoverse.model import EmoVerse; from emoverse.tasks import TASKS; "
        "m = EmoVerse.load(sys.argv[1]); q = TASKS['msa'].query('great'); "
        "print(len(m.score(q, ['Positive.', 'Negative.'])))"
    )
    out = subprocess.run([str(GPTQ_PY), "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("2"), out.stderr[-2000:]  # reloads and scores there


def test_calibration_is_round_robin_over_tasks(small_amt, tiny_model_dir):
    """Any prefix of five records a stage keeps holds every task (ECPE was never calibrated on before)."""
    calib, _ = calibration_set(small_amt, EmoVerse.load(tiny_model_dir), n_per_task=2)
    assert sorted(c["task"] for c in calib[:5]) == sorted(TASK_NAMES)


def test_calibration_carries_real_visual_tokens(small_amt, tiny_model_dir):
    """FER rows reach the quantizer with the projector's visual tokens in their image slots, not pad tokens."""
    import torch

    model = EmoVerse.load(tiny_model_dir)
    calib, _ = calibration_set(small_amt, model, n_per_task=2)
    fer = [c for c in calib if c["task"] == "fer"]
    assert fer and all(c["visual_tokens"] == model.cfg.n_visual * len(c["media"]) > 0 for c in fer)
    row = fer[0]
    ids = torch.tensor(row["input_ids"])
    slots = ids == model.tokenizer.pad_token_id
    pad = model.llm.get_input_embeddings().weight[model.tokenizer.pad_token_id]
    assert not torch.allclose(row["inputs_embeds"][slots], pad.expand(int(slots.sum()), -1))
    text = row["inputs_embeds"][~slots]
    assert torch.equal(text, model.llm.get_input_embeddings()(ids[~slots]).float())  # text positions untouched


def test_extra_calibration_adds_records_of_a_task():
    from emoverse.compress.stages import GPTQW4A16, select_calibration

    calib = [{"id": f"{t}{i}", "task": t} for i in range(6) for t in ("msa", "fer")]
    chosen = select_calibration(calib, GPTQW4A16(calibration_samples=4, extra_calibration={"fer": 3}))
    assert [c["id"] for c in chosen] == ["msa0", "fer0", "msa1", "fer1", "fer2", "fer3", "fer4"]
    with pytest.raises(ValueError, match="10 more 'fer' records wanted"):
        select_calibration(calib, GPTQW4A16(calibration_samples=4, extra_calibration={"fer": 10}))
