"""`emoverse pipeline`: raw data to bench report in one command — data build -> train -> compress ->
export -> bench. Each stage records a key (its configuration + the digests of its inputs); on a rerun a
stage whose artifact still verifies under the same key is skipped, so a run that failed continues where
it stopped, and a changed setting redoes only what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emoverse.artifacts import MODEL_KINDS, ArtifactError, atomic_write_json, manifest_digest, verify
from emoverse.bench.runner import BUDGETS, BenchConfig, run_bench
from emoverse.compare import compare
from emoverse.compress.pipeline import compress
from emoverse.config import load_config, resolve_recipe
from emoverse.data import build_amt
from emoverse.evaluate import evaluate
from emoverse.export.bundle import RUNTIME_FORMAT, export_bundle
from emoverse.records import load_records
from emoverse.train.trainer import RECIPES, TrainConfig, train

PIPELINES = Path(__file__).parent / "pipelines"
EVAL_VERSION = 2  # bump when eval semantics change, so pipelines re-evaluate


@dataclass
class ExportSpec:
    name: str = "cpu-fp32"
    target: str = "cpu"
    precision: str | None = None
    model: str = "teacher"  # "teacher" or the name of a compress entry (its artifact ships as it is)
    embedding_bits: int | None = None  # cpu: 4 or 8-bit tied embedding / output projection
    vision_int8: bool = False  # cpu: static INT8 vision encoder calibrated on FER training faces
    vision_int8_weights: bool = False  # cpu: INT8 vision weights, fp32 activations (closer to fp32 than static)
    int8_activations: bool = False  # cpu: MatMulNBits with int8 activations (the fast kernels; not bit-exact)


@dataclass
class CompressSpec:
    name: str = "gptq-w4a16"
    recipe: str = "gptq-w4a16"
    model: str = "teacher"  # chain from another compress entry by its name


@dataclass
class BenchSpec:
    target: str = "cpu"
    limit: int = 20
    warmup: int = 2
    budgets: str | None = None


@dataclass
class PipelineConfig:
    # A trained model to start from (the shipped release, models/emoverse-nano): no training stage.
    # null: train one with train_recipe.
    teacher: str | None = None
    train_recipe: str = "nano-quick"
    train_overrides: list[str] = field(default_factory=list)
    sources: list[str] | None = None
    eval_limit: int = 50  # per task and source, for the teacher and every compressed model
    compress: list[CompressSpec] = field(default_factory=list)
    exports: list[ExportSpec] = field(default_factory=lambda: [ExportSpec()])
    bench: BenchSpec = field(default_factory=BenchSpec)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    def __init__(self, cfg: PipelineConfig, raw: str | os.PathLike, out: str | os.PathLike, log=print):
        self.cfg, self.raw, self.out, self.log = cfg, Path(raw), Path(out), log
        self.state_dir = self.out / ".pipeline"

    def _done(self, stage: str, key: str, artifact: Path, kind: str) -> str | None:
        """The artifact's digest when it was made under `key` and still verifies; else None."""
        state = self.state_dir / f"{stage}.json"
        if not state.is_file() or json.loads(state.read_text()).get("key") != key:
            return None
        try:
            return manifest_digest(verify(artifact, kind=kind))
        except ArtifactError:
            return None

    def _record(self, stage: str, key: str, artifact: Path, kind: str) -> str:
        digest = manifest_digest(verify(artifact, kind=kind))
        atomic_write_json(self.state_dir / f"{stage}.json", {"key": key, "artifact": str(artifact), "digest": digest})
        return digest

    def stage(self, name: str, key: str, artifact: Path, kind: str, run) -> str:
        digest = self._done(name, key, artifact, kind)
        if digest:
            self.log(f"[pipeline] {name}: up to date ({artifact}), skipped")
            return digest
        self.log(f"[pipeline] {name}: running -> {artifact}")
        run()
        return self._record(name, key, artifact, kind)

    def run(self) -> tuple[dict, list[str]]:
        cfg = self.cfg
        data = self.out / "data"
        d_data = self.stage(
            "data",
            _key(str(self.raw.resolve()), cfg.sources),
            data,
            "amt-data",
            lambda: build_amt(self.raw, data, sources=cfg.sources, overwrite=True),
        )
        if cfg.teacher:  # a trained model (the release): verified, never retrained
            teacher = Path(cfg.teacher)
            d_model = manifest_digest(verify(teacher, kind=MODEL_KINDS))
            self.log(f"[pipeline] train: using the trained model {teacher} (teacher=null trains one)")
        else:
            recipe = resolve_recipe(cfg.train_recipe, RECIPES)
            run_dir = self.out / "train"
            overrides = [f"data={data}", f"out={run_dir}", *cfg.train_overrides]
            tcfg = load_config(TrainConfig, recipe, overrides)
            teacher = run_dir / "model"
            d_model = self.stage(
                "train",
                _key(d_data, recipe.read_text(), overrides),
                teacher,
                "emoverse-model",
                lambda: train(tcfg),
            )
        models = {"teacher": (teacher, d_model)}
        evals = {}
        for spec in [None, *cfg.compress]:
            name = "teacher" if spec is None else spec.name
            if spec is not None:
                parent, d_parent = models[spec.model]
                art = self.out / "compress" / spec.name
                models[name] = (
                    art,
                    self.stage(
                        f"compress-{name}",
                        _key(d_parent, d_data, spec.recipe),
                        art,
                        "emoverse-model",
                        lambda s=spec, p=parent, a=art: compress(s.recipe, p, data, a, overwrite=True),
                    ),
                )
            art, digest = models[name]
            ev = self.out / "eval" / name
            key = _key(digest, d_data, cfg.eval_limit, EVAL_VERSION)
            state = self.state_dir / f"eval-{name}.json"
            if not (
                state.is_file() and json.loads(state.read_text()).get("key") == key and (ev / "metrics.json").is_file()
            ):
                self.log(f"[pipeline] eval {name}: running -> {ev}")
                evaluate(str(art), [str(data)], ev, mode="score", limit=cfg.eval_limit)
                atomic_write_json(state, {"key": key})
            evals[name] = ev / "metrics.json"
        bundles = []
        fer_images = [i for r in load_records(data / "fer" / "train.jsonl") for i in r.images]
        for spec in cfg.exports:
            art, digest = models[spec.model]
            b = self.out / "bundles" / spec.name
            self.stage(
                f"export-{spec.name}",
                _key(digest, asdict(spec), RUNTIME_FORMAT),
                b,
                "emoverse-bundle",
                lambda s=spec, a=art, bb=b: export_bundle(
                    a,
                    bb,
                    target=s.target,
                    precision=s.precision,
                    calibration_images=fer_images,
                    overwrite=True,
                    embedding_bits=s.embedding_bits,
                    vision_int8=s.vision_int8,
                    vision_int8_weights=s.vision_int8_weights,
                    int8_activations=s.int8_activations,
                ),
            )
            bundles.append(b)
        runnable = [b for b, s in zip(bundles, cfg.exports, strict=True) if s.target in ("cpu", cfg.bench.target)]
        bcfg = BenchConfig(limit=cfg.bench.limit, warmup=cfg.bench.warmup)
        report, failures = run_bench(
            runnable, data, cfg.bench.budgets or BUDGETS, cfg.bench.target, self.out / "bench", bcfg
        )
        if len(evals) > 1:
            compare([evals["teacher"], *[v for k, v in evals.items() if k != "teacher"]], out=self.out / "compare")
        return report, failures


def run_pipeline(
    recipe: str | os.PathLike,
    raw: str | os.PathLike,
    out: str | os.PathLike,
    overrides: list[str] | None = None,
) -> tuple[dict, list[str]]:
    cfg = load_config(PipelineConfig, resolve_recipe(recipe, PIPELINES), overrides)
    return Pipeline(cfg, raw, out).run()
