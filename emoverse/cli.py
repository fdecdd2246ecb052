"""`emoverse` command line: thin wrappers that parse, call a stage, print.

Each subcommand imports its stage when it runs (the one deliberate exception to imports at module top in
this package): `emoverse run` / `bench` on a bundle must work on an onnxruntime-only install (a Jetson, a slim
container) where torch, transformers, llm-compressor and modelopt are absent, and `--help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emoverse.baselines import BASELINES


def _data_build(a: argparse.Namespace) -> int:
    from emoverse.data import build_amt, summary_table

    manifest = build_amt(a.raw, a.out, sources=a.sources, extra=a.extra, skip_bad=a.skip_bad, overwrite=True)
    print(summary_table(manifest))
    print(f"wrote {a.out} (manifest: {Path(a.out) / 'manifest.json'})")
    return 0


def _data_validate(a: argparse.Namespace) -> int:
    from emoverse.validate import validate_files

    problems, n = validate_files(a.files, max_length=a.max_length, llm=a.llm, check_media=not a.no_media)
    for p in problems:
        print(p)
    print(f"{n} records checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def _train(a: argparse.Namespace) -> int:
    from emoverse.config import load_config, resolve_recipe
    from emoverse.train.trainer import RECIPES, TrainConfig, train

    cfg = load_config(TrainConfig, resolve_recipe(a.recipe, RECIPES), a.overrides)
    out = train(cfg)
    if out is not None:
        print(f"model artifact: {out}")
    return 0


def _release(a: argparse.Namespace) -> int:
    from emoverse.artifacts import folder_bytes
    from emoverse.train.release import release

    if a.reproduce:  # the commands a release's manifest records, one per line (a shell can run them)
        from emoverse.artifacts import verify

        print("\n".join(verify(a.reproduce, kind="emoverse-adapter")["release"]["reproduce"]))
        return 0
    if not (a.run and a.out):
        raise SystemExit("emoverse release: --run and --out are required (or --reproduce RELEASE)")
    m = release(a.run, a.out, overwrite=a.overwrite)
    print(f"wrote {a.out}: {folder_bytes(a.out) / 1e6:.1f} MB, {m['training']['steps']} steps")
    return 0


def _results(a: argparse.Namespace) -> int:
    from emoverse import results

    if a.readme:
        results.update_readme(a.readme)
        print(f"updated the results table in {a.readme}")
        return 0
    if a.markdown:
        res = json.loads(Path(a.markdown).read_text(encoding="utf-8"))
        _, md = results.write(res, a.markdown)
    else:
        if not (a.metrics and a.out):
            raise SystemExit("emoverse results: give --metrics ... --out FILE.json, or --markdown FILE.json")
        _, md = results.write(results.build(a.metrics, model_system=a.system), a.out)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md}")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from emoverse.evaluate import evaluate, format_table

    metrics = evaluate(
        a.model,
        a.data,
        a.out,
        mode=a.mode,
        split=a.split,
        limit=a.limit,
        tasks=a.tasks,
        baselines=a.baselines,
        threads=a.threads,
        missing_media=a.missing_media,
        batch_size=a.batch_size,
        precision=a.precision,
        device=a.device,
    )
    print(format_table(metrics))
    print(f"wrote {Path(a.out) / 'metrics.json'} and {Path(a.out) / 'predictions.jsonl'}")
    return 0


def _compress(a: argparse.Namespace) -> int:
    from emoverse.compress.pipeline import compress

    m = compress(a.recipe, a.model, a.data, a.out, overwrite=a.overwrite, overrides=a.overrides)
    sizes = m["sizes"]
    print(
        f"wrote {a.out}: {sizes['bytes'] / 1e6:.1f} MB (parent {sizes['parent_bytes'] / 1e6:.1f} MB, "
        f"{sizes['parent_bytes'] / max(sizes['bytes'], 1):.2f}x smaller)"
    )
    if a.eval_limit > 0:
        from emoverse.compare import compare, format_compare
        from emoverse.evaluate import evaluate

        ev = Path(f"{a.out}-eval")
        evaluate(str(a.out), [a.data], ev, mode="score", limit=a.eval_limit)
        print(f"evaluated on the test split: {ev / 'metrics.json'}")
        if a.reference:
            print(format_compare(compare([a.reference, ev / "metrics.json"], out=ev)))
    return 0


def _compare(a: argparse.Namespace) -> int:
    from emoverse.compare import compare, format_compare

    report = compare(a.metrics, out=a.out, system=a.system, size_reference=a.size_reference, bench_report=a.bench)
    print(format_compare(report))
    return 0


def _export(a: argparse.Namespace) -> int:
    from emoverse.export.bundle import export_bundle

    images: list[str] = []
    records = None
    if a.calibration_data:
        from emoverse.export.bundle import calibration_prompts
        from emoverse.records import load_records

        images = [img for r in load_records(Path(a.calibration_data) / "fer" / "train.jsonl") for img in r.images]
        if a.int8_prefill:
            records = calibration_prompts(a.calibration_data, a.calibration_per_task)
    m = export_bundle(
        a.model,
        a.out,
        target=a.target,
        precision=a.precision,
        calibration_images=images,
        embedding_bits=a.embedding_bits,
        vision_int8=a.vision_int8,
        vision_int8_weights=a.vision_int8_weights,
        int8_activations=a.int8_activations,
        int8_prefill=a.int8_prefill,
        calibration_records=records,
        smoothing_alpha=a.smoothing_alpha,
        int8_prefill_keep=tuple(x for x in a.int8_prefill_keep.split(",") if x),
        int8_prefill_tasks=tuple(a.int8_prefill_tasks) if a.int8_prefill_tasks else None,
        label_decision_margin=a.label_decision_margin,
        closing_from_cache=a.closing_from_cache,
        overwrite=a.overwrite,
    )
    print(f"wrote bundle {a.out}: target {a.target}, precision {m['precision']}")
    print(f"parity of the fp32 graphs with PyTorch: {m['parity_fp32']}")
    if "parity" in m:
        print(f"after {m['precision']} quantization: {m['parity']}")
    if "tensorrt_plan" in m:
        print(
            f"TensorRT plan: {a.out}/tensorrt/plan.json; build on the device with "
            f"python3 tensorrt/build_engines.py or tensorrt/trtexec.sh"
        )
    return 0


def _run(a: argparse.Namespace) -> int:
    from emoverse.runtime.backends import open_runtime
    from emoverse.runtime.ort import RequestError
    from emoverse.tasks import get_task

    task = get_task(a.task)
    if a.query:
        query = a.query
    elif a.task in ("msa", "mer", "eri") and a.text:
        query = task.query(a.text)
    elif a.task == "fer":
        query = task.query(task.labels, with_aus=True)
    else:
        raise ValueError("give --text (msa, mer, eri) or --query (any task)")
    rt = open_runtime(a.bundle, a.backend, threads=a.threads, providers=a.providers)
    try:
        if a.stream and not task.scored:  # streamed: the generated tasks (ERI); scored ones answer whole
            # the task's grammar and answer form, as `answer` and the bench apply them
            for piece in rt.stream(query, a.image or [], task.max_new_tokens, rt.grammar_for(task.name, query), task):
                print(piece, end="", flush=True)
            print()
            return 0
        ans = rt.answer(a.task, query, a.image or [], mode=a.mode)
    except RequestError as e:
        print(f"emoverse: request error: {e}", file=sys.stderr)
        return 2
    print(ans.text)
    return 0


def _bench(a: argparse.Namespace) -> int:
    from emoverse.bench.runner import BUDGETS, BenchConfig, run_bench

    cfg = BenchConfig(
        limit=a.limit,
        warmup=a.warmup,
        repetitions=a.repetitions,
        threads=a.threads,
        offline_batch=a.offline_batch,
        tasks=tuple(a.tasks) if a.tasks else None,
    )
    report, failures = run_bench(a.bundle, a.data, a.budgets or BUDGETS, a.target, a.out, cfg)
    print(f"wrote {a.out}/report.md, report.json, report.csv, pareto.png")
    for f in failures:
        print(f"BUDGET FAIL {f}")
    return 1 if failures else 0


def _bench_compare(a: argparse.Namespace) -> int:
    from emoverse.bench.runner import compare_reports

    old, new = (json.loads(Path(p).read_text()) for p in (a.old, a.new))
    problems = compare_reports(old, new, a.max_latency_regression, a.max_accuracy_drop)
    for p in problems:
        print(f"REGRESSION {p}")
    print(f"{len(problems)} regression(s)")
    return 1 if problems else 0


def _pipeline(a: argparse.Namespace) -> int:
    from emoverse.pipeline import run_pipeline

    report, failures = run_pipeline(a.recipe, a.raw, a.out, a.overrides)
    print(f"bench report: {Path(a.out) / 'bench' / 'report.md'}")
    for f in failures:
        print(f"BUDGET FAIL {f}")
    return 1 if failures else 0


def _table(a: argparse.Namespace) -> int:
    from emoverse.evaluate import format_table, merge_metrics

    merged = merge_metrics(a.metrics)
    print(format_table(merged))
    print("\nrecords: " + ", ".join(f"{k} {v}" for k, v in merged["records"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emoverse",
        description="EmoVerse Edge: train, compress, export and benchmark "
        "an affective multimodal LLM for edge devices.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or check AMT task files").add_subparsers(
        dest="data_command", required=True
    )
    b = data.add_parser("build", help="raw sources -> AMT JSONL per task and split, with a manifest")
    b.add_argument("--raw", required=True, help="raw data directory (e.g. ../shared/data/raw)")
    b.add_argument("--out", default="data/amt", help="output folder (default: data/amt)")
    b.add_argument("--sources", nargs="*", help="subset of sources (default: all)")
    b.add_argument(
        "--extra",
        nargs="*",
        help="JSON/JSONL files already in ms-swift/AMT form to add, as FILE:SPLIT (train, dev or test) "
        "unless every record has a 'split' field",
    )
    b.add_argument("--skip-bad", action="store_true", help="skip malformed rows and report them instead of failing")
    b.set_defaults(func=_data_build)
    v = data.add_parser("validate", help="check record files without loading a model")
    v.add_argument("files", nargs="+")
    v.add_argument("--max-length", type=int, default=2048, help="token limit to check prompts against")
    v.add_argument("--llm", default="smollm2-135m-instruct", help="whose tokenizer counts the tokens")
    v.add_argument("--no-media", action="store_true", help="do not open images")
    v.set_defaults(func=_data_validate)

    t = sub.add_parser("train", help="M2SE multitask training -> model artifact")
    t.add_argument("--recipe", required=True, help="recipe YAML, or a shipped one: nano-quick, nano, tiny")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.steps=10 out=runs/x")
    t.set_defaults(func=_train)

    rl = sub.add_parser(
        "release", help="finished training run -> adapter-form release (LoRA + projector, base by sha256)"
    )
    rl.add_argument("--run", help="training run folder (out= of `emoverse train`)")
    rl.add_argument("--out", help="release folder, e.g. models/emoverse-nano")
    rl.add_argument("--overwrite", action="store_true")
    rl.add_argument(
        "--reproduce", metavar="RELEASE", help="print the commands that retrain RELEASE from the base (its lineage)"
    )
    rl.set_defaults(func=_release)

    rs = sub.add_parser("results", help="eval metrics (full test splits, with CIs) -> docs/results JSON + markdown")
    rs.add_argument(
        "--metrics",
        nargs="*",
        help="metrics.json files of `emoverse eval` (model and baselines); a results JSON among them contributes "
        "its systems, so a baseline evaluated later extends it",
    )
    rs.add_argument("--out", help="results JSON (the .md is written beside it)")
    rs.add_argument("--system", default="emoverse/score", help="the model's system in the metrics files")
    rs.add_argument("--markdown", help="only regenerate the markdown table from this results JSON")
    rs.add_argument("--readme", help="regenerate the results table in this README from docs/results/*.json")
    rs.set_defaults(func=_results)

    e = sub.add_parser("eval", help="per-task metrics of a model artifact on AMT records")
    e.add_argument(
        "--model",
        help="model artifact folder, release folder (models/emoverse-nano) or 'zero-shot' "
        "(untrained SmolLM2); leave out to score only the baselines",
    )
    e.add_argument("--data", required=True, nargs="+", help="JSONL files or AMT folders")
    e.add_argument("--out", required=True)
    e.add_argument("--split", default="test", help="split to take from AMT folders (default: test)")
    e.add_argument(
        "--mode",
        choices=["both", "score", "generate"],
        default="both",
        help="closed-label tasks: score the label set, generate freely, or both (default)",
    )
    e.add_argument("--limit", type=int, help="at most N records per task and source (seeded sample)")
    e.add_argument("--tasks", nargs="*", help="subset of tasks")
    e.add_argument(
        "--baselines",
        nargs="*",
        default=[],
        choices=["zero-shot", *BASELINES],
        help="baselines to score on the same records",
    )
    e.add_argument("--threads", type=int)
    e.add_argument("--batch-size", type=int, default=8, help="records scored or generated together (default 8)")
    e.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 (default, the reference numerics) or bf16 autocast (about 2x faster where the CPU has it)",
    )
    e.add_argument(
        "--device",
        default="cpu",
        help="where the PyTorch model runs: cpu (default, the reference) or cuda (a GPU machine; bundles "
        "choose devices through their providers)",
    )
    e.add_argument(
        "--missing-media",
        choices=["error", "drop"],
        default="error",
        help="a listed image/video that does not exist: fail (default) or answer without it",
    )
    e.set_defaults(func=_eval)

    c = sub.add_parser("compress", help="run a compression recipe on a model artifact")
    c.add_argument("--recipe", required=True, help="recipe YAML or a shipped one: gptq-w4a16, fp8-dynamic")
    c.add_argument("--model", required=True, help="model artifact or release folder (models/emoverse-nano)")
    c.add_argument("overrides", nargs="*", help="stage parameter overrides, e.g. stages.0.group_size=128")
    c.add_argument("--data", default="data/amt", help="AMT folder (calibration from its train records)")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument(
        "--eval-limit",
        type=int,
        default=100,
        help="then evaluate on N test records per task and source (0: skip; default 100)",
    )
    c.add_argument("--reference", help="metrics.json of the FP32 teacher (same --eval-limit) for a comparison row")
    c.set_defaults(func=_compress)

    cp = sub.add_parser("compare", help="table of variants vs the FP32 reference: metric ratio, size, parameters")
    cp.add_argument(
        "metrics",
        nargs="+",
        help="metrics.json files from emoverse eval, one per variant ([NAME=]A.json+B.json: "
        "evals of one artifact or bundle, e.g. closed tasks + ERI/ECPE); the first is the reference",
    )
    cp.add_argument("--out", help="write compare.md and compare.json here")
    cp.add_argument("--system", default="emoverse/score", help="which system's results to compare")
    cp.add_argument("--size-reference", help="folder the sizes are divided into (e.g. the FP32 teacher's bundle)")
    cp.add_argument(
        "--bench",
        action="append",
        help="a bench report.json: p90 latency and decode speed joined to variants by path; repeat for several "
        "runs of one machine (a task's latency from the first that timed it)",
    )
    cp.set_defaults(func=_compare)

    x = sub.add_parser("export", help="model artifact -> ONNX bundle (graphs, tokenizer, config, manifest)")
    x.add_argument("--model", required=True)
    x.add_argument("--target", default="cpu", help="cpu, jetson-orin-nano, jetson-agx-orin, h100 (export/targets.yaml)")
    x.add_argument(
        "--embedding-bits",
        type=int,
        choices=[4, 8],
        help="cpu: quantize the tied embedding / output projection too (default: kept fp32)",
    )
    x.add_argument(
        "--vision-int8",
        action="store_true",
        help="cpu: static INT8 vision encoder, calibrated on FER training faces (needs --calibration-data)",
    )
    x.add_argument(
        "--vision-int8-weights",
        action="store_true",
        help="cpu: INT8 vision weights (per output channel), fp32 activations: as small, far closer to fp32",
    )
    x.add_argument(
        "--int8-activations",
        action="store_true",
        help="cpu, GPTQ artifacts / --embedding-bits: int8 activations in MatMulNBits (faster, not bit-exact)",
    )
    x.add_argument(
        "--int8-prefill",
        action="store_true",
        help="cpu, W4 base + LoRA: a second decoder for prompts with INT8 GEMMs built at load from the same "
        "4-bit weights (decode steps keep them); calibrated on --calibration-data (docs/deployment.md)",
    )
    x.add_argument("--smoothing-alpha", type=float, default=0.5, help="--int8-prefill: SmoothQuant's migration")
    x.add_argument(
        "--int8-prefill-keep",
        default="",
        metavar="PROJ[,PROJ]",
        help="--int8-prefill: projections that keep the 4-bit kernels there (e.g. down_proj)",
    )
    x.add_argument("--calibration-per-task", type=int, default=16, help="--int8-prefill: training records per task")
    x.add_argument(
        "--int8-prefill-tasks",
        nargs="+",
        metavar="TASK",
        help="--int8-prefill: only these tasks' requests take the INT8 prefill decoder, the others keep the 4-bit "
        "decoder (default: every task)",
    )
    x.add_argument(
        "--label-decision-margin",
        type=float,
        help="closed labels: answer by the first token when it leads every other label's by this many nats "
        "(skips one decoder call per request; an approximation, default exact)",
    )
    x.add_argument(
        "--closing-from-cache",
        action="store_true",
        help="ERI: score the conclusion after the generated text from the decoding cache instead of prefilling "
        "prompt + text again (a quarter of an ERI answer's time on 2 cores; not bit-identical, default off)",
    )
    x.add_argument("--precision", help="cpu: fp32, int8 or int4 (default fp32)")
    x.add_argument(
        "--calibration-data",
        help="AMT folder whose FER train images calibrate Q/DQ (TensorRT targets) and --vision-int8, and whose "
        "train records of every task calibrate --int8-prefill",
    )
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=_export)

    r = sub.add_parser(
        "run",
        help="answer one request from a bundle (ONNX Runtime, no torch; or its TensorRT "
        "engines) or from a model artifact (PyTorch reference)",
    )
    r.add_argument(
        "--bundle",
        "--model",
        dest="bundle",
        required=True,
        help="bundle folder, or a model artifact / release folder (PyTorch backend)",
    )
    r.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "onnxruntime", "tensorrt", "torch"],
        help="auto: onnxruntime for a bundle, torch for a model artifact",
    )
    r.add_argument(
        "--providers",
        default="cpu",
        choices=["cpu", "cuda", "tensorrt"],
        help="ONNX Runtime execution providers (cuda/tensorrt need onnxruntime-gpu)",
    )
    r.add_argument("--task", required=True, help="msa, mer, fer, eri or ecpe")
    r.add_argument("--text", help="what the person says (msa, mer, eri)")
    r.add_argument("--query", help="a full query in the AMT form instead of --text")
    r.add_argument("--image", action="append", help="image path (repeatable)")
    r.add_argument("--mode", choices=["score", "generate"], default="score")
    r.add_argument("--stream", action="store_true", help="print generated text as it is decoded (eri)")
    r.add_argument("--threads", type=int)
    r.set_defaults(func=_run)

    bn = sub.add_parser(
        "bench",
        help="accuracy + latency + memory + size of bundles against budgets "
        "(and `emoverse bench compare OLD.json NEW.json`)",
    )
    bn.add_argument(
        "--bundle",
        "--model",
        dest="bundle",
        required=True,
        action="append",
        help="bundle folder, or model artifact / release (PyTorch); repeat; the first is the reference",
    )
    bn.add_argument("--data", default="data/amt", help="AMT folder (its test split) or JSONL files")
    bn.add_argument("--budgets", help="budgets YAML (default: the shipped bench/budgets.yaml)")
    bn.add_argument("--target", default="cpu")
    bn.add_argument("--out", required=True)
    bn.add_argument("--limit", type=int, default=20, help="test records per task and source (default 20)")
    bn.add_argument("--warmup", type=int, default=2)
    bn.add_argument("--repetitions", type=int, default=1)
    bn.add_argument("--threads", type=int)
    bn.add_argument("--offline-batch", type=int, default=8, help="closed-label requests per prefill in Offline")
    bn.add_argument("--tasks", nargs="*", help="subset of tasks (default: all), e.g. msa mer fer with a larger --limit")
    bn.set_defaults(func=_bench)
    bc = sub.add_parser("bench-compare", help=argparse.SUPPRESS)
    bc.add_argument("old")
    bc.add_argument("new")
    bc.add_argument("--max-latency-regression", default="5%")
    bc.add_argument("--max-accuracy-drop", default="1pt")
    bc.set_defaults(func=_bench_compare)

    pl = sub.add_parser("pipeline", help="raw data -> data -> train -> compress -> export -> bench, resumable")
    pl.add_argument("--recipe", required=True, help="pipeline YAML or a shipped one: nano-quick, tiny")
    pl.add_argument("--raw", required=True, help="raw data directory")
    pl.add_argument("--out", required=True)
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. bench.limit=5")
    pl.set_defaults(func=_pipeline)

    tb = sub.add_parser("table", help="one markdown table from several metrics.json (same records)")
    tb.add_argument("metrics", nargs="+")
    tb.set_defaults(func=_table)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "compare"]:  # `emoverse bench compare OLD NEW`
        argv = ["bench-compare", *argv[2:]]
    args = build_parser().parse_args(argv)
    from emoverse.artifacts import ArtifactError
    from emoverse.config import RecipeError
    from emoverse.records import RecordError
    from emoverse.sources import SourceError

    try:
        return args.func(args)
    except (RecordError, SourceError, RecipeError, ArtifactError, FileNotFoundError, ValueError) as e:
        print(f"emoverse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emoverse: interrupted (finished artifacts and checkpoints are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
