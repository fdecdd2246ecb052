"""M2SE multitask training: stages of task-weighted sampling over AMT train records, LoRA + projector.

Stage 1 (multitask pretraining) and stage 2 (multitask reason fine-tuning) are entries of the recipe's
`stages` list; stage 2 starts from stage 1's weights. Each step draws one task by the stage's weights
and a batch of that task's records, so batches are length-homogeneous (ECPE prompts are ~8x longer).
Sampling is a pure function of (seed, stage, step), checkpoints carry optimizer, schedule and RNG state,
so a resumed run reaches the same weights as an uninterrupted one. Runs under `torchrun` (DDP) unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from emoverse.artifacts import (
    ArtifactError,
    atomic_dir,
    atomic_write_json,
    autocast_precision,
    manifest_digest,
    read_manifest,
    sha256_file,
    verify,
)
from emoverse.model import EmoVerse, ModelConfig, check_attention
from emoverse.prompting import Encoded, PromptTooLong, packable, packed_sizes
from emoverse.records import RecordError, load_records
from emoverse.tasks import TASKS
from emoverse.train.distill import DistillConfig, build_student, kd_loss, load_teacher, student_layers

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class StageConfig:
    name: str = "stage"
    steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 10
    # empty by default: OmegaConf merges a recipe's mapping into the default one, so a non-empty default
    # would add its tasks to every stage that does not name them
    task_weights: dict[str, float] = field(default_factory=dict)
    max_minutes: float | None = None  # time budget: the stage ends early (checkpointed) when spent
    # true: the cosine decay runs on whichever is further along, steps or the time budget, so a stage the
    # budget cuts short still ends at the low learning rate (a GPU lease of fixed minutes, an unknown speed)
    anneal_in_time: bool = False


@dataclass
class TrainConfig:
    data: str = "data/amt"
    out: str = "runs/nano"
    seed: int = 0
    batch_size: int = 8
    max_batch_tokens: int = 2048  # long-prompt tasks get smaller batches
    max_train_length: int = 768  # longer training records are dropped (counted in the manifest)
    weight_decay: float = 0.0
    projector_lr_scale: float = 5.0  # the projector starts from random init; LoRA from a trained LLM
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    threads: int | None = None
    device: str = "auto"  # "auto": CUDA when present, else CPU; "cpu" / "cuda" / "cuda:N"
    # Throughput settings (bench/train_throughput.py measures each against the original ones, side by side):
    precision: str = "fp32"  # "bf16": autocast matmuls to bfloat16 (fp32 master weights, fp32 loss); a CPU
    # without bf16 instructions runs fp32 instead (emoverse.artifacts.autocast_precision: emulated bf16 is 7-34x slower)
    response_logits_only: bool = False  # vocabulary projection only at response positions
    length_buckets: bool = False  # a batch is a run of neighbours in length order: little padding
    # Shared-prefix packing for these (text-only) tasks: a batch is a run of neighbours in token order (one
    # ECPE conversation's targets sit together), trained as ONE row in which their common prefixes appear once
    # (prompting.collate_packed; the same loss). Its budget is pack_max_tokens (attention over the row is
    # quadratic in it), and it runs on `packed_attention` (a 4-D mask: the fused sdpa kernel beat eager there).
    pack_tasks: list[str] = field(default_factory=list)
    pack_max_tokens: int = 1536
    packed_attention: str = "sdpa"
    compile: bool = False  # torch.compile the decoder stack (bench/train_throughput.py measures it)
    attention: str = "sdpa"  # "eager": plain matmul attention, faster for bf16 training on CPU (same attention)
    halt_after: int | None = None  # stop (as if killed) after this many global steps: resume tests
    # Start from a trained model's LoRA + projector (an adapter-form release, or a run's checkpoint folder)
    # instead of fresh adapters; parameters it lacks (e.g. a newly added face projector) keep their init.
    init_from: str | None = None
    # false: LoRA is held as init_from left it and only the projector trains, so text-only answers stay
    # exactly the parent's (a vision-path stage: the parent's text results still hold)
    train_lora: bool = True
    # >0: each still image of a drawn batch is, at random, one of this many training views of it (a flip, a
    # crop, a small rotation, light jitter: emoverse.imaging.augment) or the image as it is; 0: as it is
    image_views: int = 0
    # Adapter parameters held as init_from left them, by name prefix (e.g. "projector.face_label": the word the
    # face encoder's FER2013 head speaks through): a stage that refits the rest keeps what those carry
    hold: list[str] = field(default_factory=list)
    # Knowledge distillation (train/distill.py): with distill.teacher set, the run trains a student built from
    # that teacher (its depth pruned to distill.keep_layers, fresh LoRA as model.lora_* say) on the teacher's
    # soft labels; the rest of `model` then comes from the teacher.
    distill: DistillConfig = field(default_factory=DistillConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(task_weights={"msa": 1.0})])


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(name: str) -> torch.device:
    """The recipe's device, checked before any work: "auto" is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: this machine has no CUDA device (use device=auto or cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: use auto, cpu, cuda or cuda:N")
    return dev


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (the order resume and release read them in)."""
    found = []
    for p in ckpt_dir.glob("stage*-step*"):
        m = re.fullmatch(r"stage(\d+)-step(\d+)", p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m[1]), int(m[2]), p))
    return [p for *_, p in sorted(found)]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = _dist()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={cfg.precision!r}: use fp32 or bf16")
        check_attention(cfg.attention)
        check_attention(cfg.packed_attention)
        if cfg.image_views < 0:
            raise ValueError(f"image_views={cfg.image_views}: the number of training views per image, 0 for none")
        if cfg.hold and not cfg.init_from:
            raise ValueError("hold: keeps init_from's values; set init_from")
        if set(cfg.pack_tasks) - set(TASKS):
            raise ValueError(f"pack_tasks: unknown task(s) {sorted(set(cfg.pack_tasks) - set(TASKS))}")
        for s in cfg.stages:
            unknown = set(s.task_weights) - set(TASKS)
            if unknown:
                raise ValueError(f"stage {s.name!r}: unknown task(s) {sorted(unknown)}; known: {list(TASKS)}")
            if not any(w > 0 for w in s.task_weights.values()):
                raise ValueError(f"stage {s.name!r}: task_weights are all zero")
        self.device = _resolve_device(cfg.device)
        # (cfg.precision, what it runs at; see `precision`), computed now so that a fallback warns before any work
        self._precision = (cfg.precision, autocast_precision(cfg.precision, self.device.type))
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        torch.manual_seed(cfg.seed)
        self._orders: dict[str, list[int]] = {}  # per task: record indices in length (or token) order
        self.teacher: EmoVerse | None = None
        self.distill_info: dict | None = None
        if cfg.distill.teacher:
            if cfg.init_from:
                raise ValueError("distill.teacher and init_from: a student starts from its teacher; set one of them")
            self.teacher, teacher_info = load_teacher(cfg.distill.teacher, self.device)
            self.data, self.dropped = self._encode_train_records(self.teacher.prompts)
            info = student_layers(self.out, cfg.distill, self.teacher, self._importance_batches(), self.rank == 0)
            self.distill_info = {**asdict(cfg.distill), "teacher": teacher_info, **info}
            self.model = build_student(self.teacher, info["kept_layers"], cfg.model)
        else:
            self.model = EmoVerse.build(cfg.model)
        self.model.set_attention(cfg.attention)
        self.model.freeze_base(train_lora=cfg.train_lora, hold=tuple(cfg.hold))
        self.params = self.model.trainable_parameters()
        for prefix in cfg.hold:  # a misspelt name would hold nothing and train everything: refused
            if not any(n.startswith(prefix) for n in self.params):
                raise ValueError(f"hold: {prefix!r} names no adapter parameter (they start with 'projector.', 'llm.')")
        self.init_info = self._init_from(Path(cfg.init_from)) if cfg.init_from else None
        self.face_probe_info = self._fit_face_probe()
        if self.teacher is None:
            self.data, self.dropped = self._encode_train_records(self.model.prompts)
        for task in set(cfg.pack_tasks) & set(self.data):
            if not packable(self.data[task]):
                raise ValueError(f"pack_tasks: {task!r} has records with images or videos (packing is text-only)")
        # monotonic start of the running stage, less the seconds it ran before a resume: its time budget and the
        # time-annealed learning rate read it
        self._stage_clock: float | None = None
        self.model.to(self.device)  # set up on the CPU (encoding, probe fitting), then moved
        if cfg.compile:
            self.model.compile_decoder()

    def _init_from(self, src: Path) -> dict:
        """Copy a trained model's LoRA + projector into this one (a fresh run; a resumed one then overwrites
        them from its own checkpoint). Refuses weights this model has no place for, or of another shape."""
        from safetensors.torch import load_file

        if (src / "adapter.safetensors").is_file():
            manifest = verify(src, kind="emoverse-adapter")
            try:
                missing = self.model.load_adapter_files(src, strict=False)
            except ArtifactError as e:  # a recipe error: reported like the other config checks
                raise ValueError(str(e)) from None
            return {
                "path": str(src),
                "kind": "emoverse-adapter",
                "digest": manifest_digest(manifest),
                "parent_training": manifest.get("training", {}).get("steps"),
                "new_parameters": sorted({k.split(".")[0] for k in missing}),
            }
        if (src / "trainable.safetensors").is_file():
            weights = load_file(src / "trainable.safetensors")  # named as self.params, projector included
            extra = set(weights) - set(self.params)
            if extra:
                raise ValueError(f"{src}: weights this model has no place for ({sorted(extra)[:2]})")
            with torch.no_grad():
                for k, v in weights.items():
                    self.params[k].copy_(v)
            new = {n.split(".")[1] if n.startswith("projector.") else n for n in set(self.params) - set(weights)}
            return {
                "path": str(src),
                "kind": "checkpoint",
                "sha256": sha256_file(src / "trainable.safetensors"),
                "new_parameters": sorted(new),
            }
        raise FileNotFoundError(
            f"{src}: init_from needs an adapter-form release or a checkpoint folder (a run's model folder holds "
            "merged weights: `emoverse release --run RUN --out DIR` writes its adapter form, or use "
            "RUN/checkpoints/<last>)"
        )

    def _fit_face_probe(self) -> dict | None:
        """Fit the face-probe token on the FER training faces when the model has one that init_from did not
        bring (a resumed run then reads the same weights back from its checkpoint)."""
        probe = self.model.projector.face_probe
        if probe is None or probe.weight.any():
            return None
        from emoverse.train.face_probe import fit_face_probe

        path = Path(self.cfg.data) / "fer" / "train.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the face probe is fitted on the FER train records (run `emoverse data build`)"
            )
        return fit_face_probe(self.model, load_records(path))

    # -- data ------------------------------------------------------------------------------------
    def _encode_train_records(self, builder) -> tuple[dict[str, list[Encoded]], dict[str, int]]:
        orig_max = builder.max_length
        builder.max_length = min(orig_max, self.cfg.max_train_length)
        needed = sorted({t for s in self.cfg.stages for t, w in s.task_weights.items() if w > 0})
        data: dict[str, list[Encoded]] = {}
        dropped: dict[str, int] = {}
        try:
            for task in needed:
                path = Path(self.cfg.data) / task / "train.jsonl"
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no train records for task {task!r} (run `emoverse data build`)")
                encoded, n_long = [], 0
                for rec in load_records(path):
                    try:
                        encoded.append(builder.encode(rec.query, rec.response, rec.images, rec.videos))
                    except PromptTooLong:
                        n_long += 1
                    except ValueError as e:
                        raise RecordError(f"{path}: record {rec.id}: {e}") from None
                if not encoded:
                    raise ValueError(f"{path}: no record fits max_train_length={self.cfg.max_train_length}")
                data[task], dropped[task] = encoded, n_long
        finally:
            builder.max_length = orig_max
        return data, dropped

    def _importance_batches(self) -> list[dict]:
        """Batches of every task the recipe samples, drawn as training draws them but from their own seeds,
        for the student's layer-importance score."""
        out = []
        for ti, task in enumerate(sorted(self.data)):
            for b in range(self.cfg.distill.importance_batches):
                items = self._draw(task, np.random.default_rng([self.cfg.seed, 10_000, ti, b]))
                out.append(self._on_device(self.teacher.prompts.collate(items)))
        return out

    def _on_device(self, batch: dict) -> dict:
        """A collated batch with its tensors on the run's device."""
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def sample_batch(self, stage_idx: int, step: int) -> tuple[str, list[Encoded]]:
        stage = self.cfg.stages[stage_idx]
        tasks = [t for t, w in stage.task_weights.items() if w > 0]
        weights = np.array([stage.task_weights[t] for t in tasks], dtype=float)
        task = tasks[
            np.random.default_rng([self.cfg.seed, stage_idx, step]).choice(len(tasks), p=weights / weights.sum())
        ]
        items = self._draw(task, np.random.default_rng([self.cfg.seed, stage_idx, step, 1 + self.rank]))
        if self.cfg.image_views:
            items = self._views(items, np.random.default_rng([self.cfg.seed, stage_idx, step, 10_001 + self.rank]))
        return task, items

    def _views(self, items: list[Encoded], rng: np.random.Generator) -> list[Encoded]:
        """The drawn records with each still image replaced by a random one of its `image_views` training
        views or left as it is (each view's frozen features are cached like the image's)."""
        out = []
        for e in items:
            if e.media:
                views = rng.integers(-1, self.cfg.image_views, size=len(e.media))
                media = [
                    replace(m, view=None if v < 0 or m.frame is not None else int(v))
                    for m, v in zip(e.media, views, strict=True)
                ]
                e = replace(e, media=media)
            out.append(e)
        return out

    def collate(self, task: str, items: list[Encoded]) -> dict:
        """A drawn batch as the model takes it: one packed row for a task the recipe packs."""
        if task in self.cfg.pack_tasks:
            return self.model.prompts.collate_packed(items)
        return self.model.prompts.collate(items)

    def _draw(self, task: str, rng: np.random.Generator) -> list[Encoded]:
        """One batch of `task`'s records, as many as batch_size and the token budget allow."""
        pool = self.data[task]
        if task in self.cfg.pack_tasks:
            # A random record and its neighbours in token order (records that share a prefix sit together),
            # as many as the packed row's token budget holds.
            order = self._token_order(task)
            n = min(len(pool), self.cfg.batch_size)
            start = min(int(rng.integers(len(order))), len(order) - n)
            window = [pool[i] for i in order[start : start + n]]
            fits = sum(size <= self.cfg.pack_max_tokens for size in packed_sizes(window))  # sizes only grow
            return window[: max(1, fits)]
        if self.cfg.length_buckets:
            # A random record and its neighbours in length order, as many as the token budget holds;
            # every record is equally likely to anchor a batch, padding is a few tokens.
            order = self._length_order(task)
            n = min(len(pool), self.cfg.batch_size)
            start = min(int(rng.integers(len(order))), len(order) - n)
            while n > 1 and n * len(pool[order[start + n - 1]].input_ids) > self.cfg.max_batch_tokens:
                n -= 1  # ascending order: the last is the longest
            return [pool[i] for i in order[start : start + n]]
        idx = rng.choice(len(pool), size=min(self.cfg.batch_size, len(pool)), replace=False)
        items = [pool[i] for i in idx]
        longest = max(len(e.input_ids) for e in items)
        return items[: max(1, min(len(items), self.cfg.max_batch_tokens // longest))]

    def _token_order(self, task: str) -> list[int]:
        key = f"tokens:{task}"
        if key not in self._orders:
            pool = self.data[task]
            self._orders[key] = sorted(range(len(pool)), key=lambda i: (pool[i].input_ids, i))
        return self._orders[key]

    def _length_order(self, task: str) -> list[int]:
        if task not in self._orders:
            pool = self.data[task]
            self._orders[task] = sorted(range(len(pool)), key=lambda i: (len(pool[i].input_ids), i))
        return self._orders[task]

    @property
    def precision(self) -> str:
        """The precision training runs at: cfg.precision, or fp32 where this CPU would emulate bf16
        (autocast_precision). Follows cfg, which the throughput bench swaps per row."""
        if self._precision[0] != self.cfg.precision:
            self._precision = (self.cfg.precision, autocast_precision(self.cfg.precision, self.device.type))
        return self._precision[1]

    def loss(self, net, batch: dict) -> torch.Tensor:
        """One batch's loss under the recipe's throughput settings."""
        import contextlib

        ctx = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        packed = batch["attention_mask"].dim() == 4  # a packed row runs on its own attention kernel
        models = [self.model] + ([self.teacher] if self.teacher is not None else [])
        for m in models:
            m.set_attention(self.cfg.packed_attention if packed else self.cfg.attention)
        with ctx:
            if self.teacher is not None:  # distillation: the student's and the frozen teacher's response logits
                logits, targets = net(batch, cache_features=True, response_logits=True)
                with torch.no_grad():
                    teacher_logits, _ = self.teacher.response_logits(batch, cache_features=True)
                return kd_loss(logits, teacher_logits, targets, self.cfg.distill)
            if self.cfg.response_logits_only:
                return net(batch, cache_features=True, response_loss_only=True)
            return net(batch, cache_features=True).loss

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        return list_checkpoints(self.ckpt_dir)

    def save_checkpoint(self, stage_idx: int, step: int, optimizer, scheduler, stats: dict) -> None:
        if self.rank != 0:
            return
        from safetensors.torch import save_file

        with atomic_dir(self.ckpt_dir / f"stage{stage_idx}-step{step}", overwrite=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.params.items()}, tmp / "trainable.safetensors")
            # optimizer state is tensors + numbers only: saved with torch.save, read back with weights_only=True
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                },
                tmp / "optim.pt",
            )
            (tmp / "state.json").write_text(json.dumps({"stage": stage_idx, "step": step, "stats": stats}))
        for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> tuple[dict, dict]:
        from safetensors.torch import load_file

        weights = load_file(path / "trainable.safetensors")
        missing = set(self.params) ^ set(weights)
        if missing:
            raise ValueError(f"{path}: checkpoint does not match this model/recipe (parameters {sorted(missing)[:3]})")
        with torch.no_grad():
            for k, v in weights.items():
                self.params[k].copy_(v)
        return json.loads((path / "state.json").read_text()), torch.load(path / "optim.pt", weights_only=True)

    # -- loop ------------------------------------------------------------------------------------
    def _optimizer(self, stage: StageConfig):
        updated = {n: p for n, p in self.params.items() if p.requires_grad}  # not the fitted probe, nor frozen LoRA
        proj = [p for n, p in updated.items() if n.startswith("projector.")]
        rest = [p for n, p in updated.items() if not n.startswith("projector.")]
        groups = [
            {"params": rest, "lr": stage.lr},
            {"params": proj, "lr": stage.lr * self.cfg.projector_lr_scale},
        ]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.cfg.weight_decay)

        def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < stage.warmup_steps:
                return (step + 1) / stage.warmup_steps
            progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
            if stage.anneal_in_time and stage.max_minutes and self._stage_clock is not None:
                progress = max(progress, (time.monotonic() - self._stage_clock) / (60 * stage.max_minutes))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    def run(self) -> Path | None:
        cfg = self.cfg
        net = self.model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
        resume = self._checkpoints()
        state, saved = self.load_checkpoint(resume[-1]) if resume else ({"stage": 0, "step": -1, "stats": {}}, None)
        stats = state["stats"] or {"tokens": 0, "seconds": 0.0, "steps": 0, "stages": {}}
        log_path = self.out / "train_log.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        global_step = stats["steps"]
        for si, stage in enumerate(cfg.stages):
            if si < state["stage"]:
                continue
            # the stage's start on this clock (a resumed stage counts the seconds it already ran)
            self._stage_clock = time.monotonic() - stats["stages"].get(stage.name, {}).get("seconds", 0.0)
            opt, sched = self._optimizer(stage)
            start = 0
            if saved is not None and si == state["stage"]:
                opt.load_state_dict(saved["optimizer"])
                sched.load_state_dict(saved["scheduler"])
                torch.set_rng_state(saved["torch_rng"])
                start = state["step"] + 1
                if stats["stages"].get(stage.name, {}).get("ended_early"):
                    start = stage.steps
            bar = tqdm(
                range(start, stage.steps),
                desc=f"{stage.name}",
                unit="step",
                disable=self.rank != 0,
                initial=start,
                total=stage.steps,
            )
            net.train()
            if self.model.vision is not None:
                self.model.vision.eval()  # frozen BatchNorm statistics
            step = start - 1
            for step in bar:
                t0 = time.monotonic()
                task, items = self.sample_batch(si, step)
                batch = self._on_device(self.collate(task, items))
                loss = self.loss(net, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in self.params.values() if p.requires_grad], cfg.grad_clip)
                opt.step()
                sched.step()
                n_tok = batch["n_tokens"] * self.world  # the records' tokens (a packed row holds fewer)
                stats["tokens"] += n_tok
                stats["seconds"] += time.monotonic() - t0
                stats["steps"] += 1
                global_step += 1
                st = stats["stages"].setdefault(stage.name, {})
                st["steps"], st["seconds"] = step + 1, time.monotonic() - self._stage_clock
                bar.set_postfix(task=task, loss=f"{loss.item():.3f}")
                if self.rank == 0 and (step % cfg.log_every == 0 or step == stage.steps - 1):
                    with open(log_path, "a") as f:
                        f.write(
                            json.dumps(
                                {
                                    "stage": stage.name,
                                    "step": step,
                                    "task": task,
                                    "loss": round(loss.item(), 5),
                                    "lr": sched.get_last_lr()[0],
                                    "tokens": stats["tokens"],
                                    "tokens_per_s": round(stats["tokens"] / max(stats["seconds"], 1e-9), 1),
                                }
                            )
                            + "\n"
                        )
                over_time = (
                    stage.max_minutes is not None and time.monotonic() - self._stage_clock > 60 * stage.max_minutes
                )
                if over_time:
                    st["ended_early"] = True
                if (step + 1) % cfg.checkpoint_every == 0 or step == stage.steps - 1 or over_time:
                    self.save_checkpoint(si, step, opt, sched, stats)
                if cfg.halt_after is not None and global_step >= cfg.halt_after:
                    return None
                if over_time:
                    break
            saved = None
        return self.finish(stats)

    def finish(self, stats: dict) -> Path | None:
        if self.rank != 0:
            return None
        data_dir = Path(self.cfg.data)
        data_manifest: dict = {
            "path": str(data_dir.resolve()),
            "train_files": {t: sha256_file(data_dir / t / "train.jsonl") for t in self.data},
        }
        if (data_dir / "manifest.json").is_file():
            data_manifest["digest"] = manifest_digest(read_manifest(data_dir))
        stats["tokens_per_s"] = round(stats["tokens"] / max(stats["seconds"], 1e-9), 1)
        stats["device"] = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        stats["precision"] = self.precision  # the recipe's, or fp32 where this CPU would emulate bf16
        self.model.to("cpu")  # the artifact is written (and later read) on the CPU
        out = self.out / "model"
        self.model.save(
            out,
            overwrite=True,
            producer={"stage": "train", "recipe": asdict(self.cfg)},
            inputs={"data": data_manifest},
            extra={
                "training": stats,
                "dropped_too_long": self.dropped,
                "init_from": self.init_info,
                "face_probe": self.face_probe_info,
                "distill": self.distill_info,
            },
        )
        atomic_write_json(
            self.out / "train_summary.json",
            {
                "model": str(out),
                **stats,
                "dropped_too_long": self.dropped,
                "init_from": self.init_info,
                "face_probe": self.face_probe_info,
                "distill": self.distill_info,
            },
        )
        return out


def train(cfg: TrainConfig) -> Path | None:
    return Trainer(cfg).run()
