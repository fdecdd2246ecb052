"""The PyTorch backend: a model artifact behind the same runtime API as the bundles (prompt, label
scoring, KV-cache decoding, ECPE grammar, batching), so "same answers as torch fp32" compares like with
like. The decoder step is the very module the ONNX decoder is exported from. On a GPU (`device="cuda"`) the
arrays cross to the device and back at every call: the same answers' code path, not a GPU server (an H200
still scored ~45 closed-label records/s this way)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from emoverse.model import EmoVerse
from emoverse.runtime.graphs import DecoderGraph, runtime_config
from emoverse.runtime.ort import OrtRuntime, positions


class TorchRuntime(OrtRuntime):
    def __init__(
        self,
        model_dir: str | os.PathLike | None,
        threads: int | None = None,
        check: bool = True,
        model=None,
        device: str = "cpu",
    ):
        from tokenizers import Tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.dir = Path(model_dir) if model_dir is not None else None
        self.model = model.eval() if model is not None else EmoVerse.load(self.dir, check=check).eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        self.cfg = runtime_config(self.model, {})
        self.tok = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
        self.decoder_module = DecoderGraph(self.model.llm).eval()
        self.embedder = self.model.llm.get_input_embeddings()
        self.vision = self.model.vision
        self.n_layers, self.kv_heads, self.head_dim = self.cfg["kv_shape"]
        self.eos = self.cfg["eos_token_id"]
        self.pad = self.cfg["pad_token_id"]
        self._prefix_cache = {}

    @torch.no_grad()
    def visual_tokens(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.projector(self.model.vision_features(torch.from_numpy(pixels))).float().cpu().numpy()

    @torch.no_grad()
    def forward(
        self,
        embeds: np.ndarray,
        mask: np.ndarray,
        cache: list[np.ndarray],
        logits_index: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        t = embeds.shape[1]
        pos = positions(mask, cache[0].shape[2], t)
        index = torch.arange(t) if logits_index is None else torch.as_tensor(np.asarray(logits_index, np.int64))

        def dev(a: np.ndarray | torch.Tensor) -> torch.Tensor:
            return (torch.from_numpy(a) if isinstance(a, np.ndarray) else a).to(self.device)

        out = self.decoder_module(
            dev(embeds.astype(np.float32)),
            dev(mask.astype(np.int64)),
            dev(pos),
            dev(index),
            *(dev(np.ascontiguousarray(c)) for c in cache),
        )
        # fp32 out under bf16 autocast too
        return out[0].float().cpu().numpy(), [t.float().cpu().numpy() for t in out[1:]]

    @torch.no_grad()
    def token_embeds(self, ids: np.ndarray) -> np.ndarray:
        return self.embedder(torch.from_numpy(ids.astype(np.int64)).to(self.device)).float().cpu().numpy()
