"""A lean EmoVerse runtime on ONNX Runtime: numpy, onnxruntime, tokenizers and pillow — no torch, no
transformers — so it runs where the training stack does not (Jetson, a slim container).

KV-cache greedy decoding, closed-label answers by scoring the candidate labels in one prefill, ECPE answers
by scoring its candidate cause sets the same way (or decoded under the `k_emotion,c;...` grammar), token
streaming for ERI, and batched requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emoverse.artifacts import ArtifactError, cpu_kernel_flags, verify
from emoverse.imaging import load_pixels
from emoverse.tasks import IMAGE_PLACEHOLDER, TASKS, Task, get_task

if TYPE_CHECKING:
    import onnxruntime

RUNTIME_FORMAT = "emoverse-runtime/2"  # the decoder takes logits_index (export.bundle writes the same)
TIED_FILE = "tied_embedding.bin"  # beside the graphs: a quantized tied table both embed and decoder read
SCORE_ROWS = 32  # candidate continuations teacher-forced per decoder call (bounds the copies of the KV cache)
# A candidate's summed log-probability is at most its first token's, so when only the best candidate matters,
# those whose first token is more than this (nats) below the top one wait for a second pass, needed only if
# one's bound still reaches the best complete score. The top label's later tokens ('.', 'ness') cost ~0 nats:
# with 0, the release bundle needed a second pass in none of 100 MER and 100 FER test requests.
PRUNE_MARGIN = 0.0
# Graphs whose intra-op threads spin after a run (see OrtRuntime._open_graph); scripts/latency_ab.py varies it.
SPINNING_GRAPHS = ("decoder",)
# Tensors a graph builds from its stored ones when it loads (the INT8 prefill decoder's int8 weights `.w8` and
# row scales `.w8s`, export.w4lora_onnx names them so): the runtime computes them itself, see `load_time_tensors`.
LOAD_TIME_SUFFIXES = (".w8", ".w8s")
# The graphs that carry such tensors; only these are parsed for them (parsing the 4-bit decoder costs ~0.2 s).
LOAD_TIME_GRAPHS = ("decoder_prefill",)
# The graphs with u8s8 integer GEMMs, opened with `session_options(integer_gemms=True)`.
INTEGER_GEMM_GRAPHS = ("decoder_prefill",)


def decoder_weight_bytes(bundle: Path, graphs: dict[str, str]) -> int:
    """Bytes of the decoders' weights on disk: their graphs, and every external data file they read (the tied
    table shared with embed, the weights the INT8 prefill decoder shares with the decoder), each counted once."""
    import onnx

    files = set()
    for key in ("decoder", "decoder_prefill"):
        if graphs.get(key):
            path = Path(bundle) / graphs[key]
            files.add(path)
            model = onnx.load(str(path), load_external_data=False)
            for t in model.graph.initializer:
                files |= {path.parent / e.value for e in t.external_data if e.key == "location"}
    return sum(f.stat().st_size for f in files)


# CPU flags whose u8s8 kernels accumulate in 32 bits (VNNI's vpdpbusd, AMX's tdpbusd): exact without the option.
EXACT_U8S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def u8s8_gemms_saturate(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> bool:
    """Whether onnxruntime's u8s8 GEMMs can saturate on this CPU (its flags read from `cpuinfo`, `machine` as
    platform.machine() names it): x86 without VNNI or AMX-INT8. True on an x86 whose flags cannot be read (not
    Linux): there, exact is the safe side."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False  # the option is x86's; ARM's int8 dot products accumulate in 32 bits
    flags = cpu_kernel_flags(cpuinfo)
    return flags is None or not set(EXACT_U8S8_FLAGS) & set(flags)


def session_options(integer_gemms: bool = False) -> onnxruntime.SessionOptions:
    """onnxruntime SessionOptions for a bundle graph; `integer_gemms` for one with u8s8 integer GEMMs
    (INTEGER_GEMM_GRAPHS: the INT8 prefill decoder's MatMulInteger).

    Why: on x86 CPUs without VNNI (AVX2 only, e.g. AMD EPYC Zen 3; or AVX-512 without VNNI), onnxruntime's u8s8
    GEMMs add pairs of u8*s8 products in 16 bits, which saturate when weights leave [-64, 63]. Measured on such an
    EPYC with onnxruntime 1.32: 0.4% of a per-row int8 GEMM's outputs wrong, by up to 12% of their range.
    session.x64quantprecision makes onnxruntime run them as u8u8 (exact), so it is set on such CPUs only: on an
    Intel Xeon with AMX-INT8 it made the INT8 prefill bundle's closed answers 35-40% slower (p50 FER 63 -> 100
    ms) and moved none of them. Only for those graphs: on that EPYC the same option broke a graph with
    per-channel DequantizeLinear weights (the TensorRT form), whose zero points its rewrite reshaped wrongly."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if integer_gemms and u8s8_gemms_saturate():
        opts.add_session_config_entry("session.x64quantprecision", "1")
    return opts


class RequestError(ValueError):
    """A request the runtime cannot answer (bad image, unknown task, too long); the runtime keeps serving."""


@dataclass
class Answer:
    task: str
    text: str
    label: str | None = None
    scores: dict[str, float] | None = None


def _pixels(path: str, size: int) -> np.ndarray:
    return load_pixels(path, size, RequestError)


class OrtRuntime:
    # defaults for runtimes that reuse this class's scoring without its graphs (runtime/torch_ref.py)
    label_margin: float | None = None  # exact label scoring
    closing_from_cache = False  # a closing re-prefills prompt + text (see `_closings`)
    decoder = prefill_decoder = None  # sessions (OrtRuntime opens them; the PyTorch backend has its own call)
    int8_prefill_tasks: frozenset[str] | None = None
    _exact_prompts = False  # set by `_for_tasks` around the calls of one request batch

    def __init__(
        self,
        bundle: str | os.PathLike,
        providers: list[str] | None = None,
        threads: int | None = None,
        check: bool = True,
    ):
        from tokenizers import Tokenizer

        self.dir = Path(bundle)
        if check:
            verify(self.dir, kind="emoverse-bundle")
        self.cfg = json.loads((self.dir / "runtime.json").read_text())
        if self.cfg.get("format") != RUNTIME_FORMAT:
            raise ArtifactError(
                f"{self.dir}/runtime.json: bundle format {self.cfg.get('format')!r}, this runtime reads "
                f"{RUNTIME_FORMAT!r}: export the bundle again"
            )
        for graph in self.cfg["graphs"].values():
            check_graph_paths(self.dir, graph)
        self.tok = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        graphs = self.cfg["graphs"]
        self.decoder = self._open_graph("decoder", graphs["decoder"], providers, threads)
        # optional: a decoder for calls of several tokens (prompts, candidate continuations) with INT8 GEMMs,
        # built at load from the same 4-bit weights (export --int8-prefill); decode steps stay on `decoder`
        self.prefill_decoder = (
            self._open_graph("decoder_prefill", graphs["decoder_prefill"], providers, threads)
            if graphs.get("decoder_prefill")
            else None
        )
        self.embedder = self._open_graph("embed", graphs["embed"], providers, threads)
        self.vision = self._open_graph("vision", graphs["vision"], providers, threads) if graphs.get("vision") else None
        self.n_layers, self.kv_heads, self.head_dim = self.cfg["kv_shape"]
        self.eos = self.cfg["eos_token_id"]
        # Closed labels decided by their first token when it leads every other label's first token by this many
        # nats (None: every winner is scored to its end, exact). An approximation chosen at export
        # (`--label-decision-margin`): it saves the one continuation call per request (~11-14 ms of ~50 on
        # 2 cores) and differs from exact scoring only when the leader's remaining tokens ('.', end) cost more.
        self.label_margin: float | None = self.cfg.get("label_decision_margin")
        self.closing_from_cache = bool(self.cfg.get("closing_from_cache", False))
        # The tasks whose requests take the INT8 prefill decoder (export --int8-prefill-tasks; None: every
        # request): per-task precision. Calls for other tasks, or for no task, stay on the 4-bit decoder.
        prefill_tasks = self.cfg.get("int8_prefill_tasks")
        self.int8_prefill_tasks: frozenset[str] | None = frozenset(prefill_tasks) if prefill_tasks else None
        self._prefix_cache: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        self.pad = self.cfg["pad_token_id"]

    def _open_graph(self, key: str, rel_path: str, providers: list[str] | None, threads: int | None):
        """A session for one bundle graph with ORT's `run(output_names, feeds) -> list` interface; the
        TensorRT backend overrides this to open the engine built from the same graph."""
        import onnxruntime as ort

        opts = session_options(integer_gemms=key in INTEGER_GEMM_GRAPHS)
        # Weight-only DequantizeLinear -> MatMul (the TensorRT INT4 form) computes in fp32 like the artifact;
        # onnxruntime's default when it fuses the pair into MatMulNBits (level 4) would round activations to int8
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if key not in SPINNING_GRAPHS:
            # Each session has its own intra-op threads, which spin after a run; the vision and embedding
            # graphs' spinning threads then compete with the decoder's prefill that follows them for the same
            # cores (FER's prefill measured 74 ms after the vision graph vs 49 ms alone on 2 cores). The
            # decoder keeps spinning: its calls follow each other (prefill, continuation, decode steps).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        path = self.dir / rel_path
        model = load_time_tensors(path) if key in LOAD_TIME_GRAPHS else None
        if model is not None:
            # external tensors the graph still names are read from beside the graph file
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        return ort.InferenceSession(
            str(path) if model is None else model, opts, providers=providers or ["CPUExecutionProvider"]
        )

    # -- prompt --------------------------------------------------------------------------------
    def encode(self, query: str, images: list[str]) -> tuple[list[int], list[bool]]:
        have = query.count(IMAGE_PLACEHOLDER)
        if have > len(images):
            raise RequestError(f"query has {have} {IMAGE_PLACEHOLDER} placeholders but only {len(images)} images")
        text = self.cfg["chat_prefix"] + IMAGE_PLACEHOLDER * (len(images) - have) + query + self.cfg["chat_suffix"]
        ids: list[int] = []
        vis: list[bool] = []
        n_visual = self.cfg["n_visual"]
        for i, seg in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += [self.pad] * n_visual
                vis += [True] * n_visual
            seg_ids = self.tok.encode(seg, add_special_tokens=False).ids
            ids += seg_ids
            vis += [False] * len(seg_ids)
        if len(ids) > self.cfg["max_length"]:
            raise RequestError(f"prompt is {len(ids)} tokens, over the bundle's max_length {self.cfg['max_length']}")
        return ids, vis

    def embed(self, query: str, images: list[str]) -> np.ndarray:
        ids, vis = self.encode(query, images)
        emb = self.token_embeds(np.array([ids]))[0]
        if images:
            if self.vision is None:
                raise RequestError(f"{self.dir}: has no vision encoder but the request has images")
            pixels = np.stack([_pixels(p, self.cfg["image_size"]) for p in images])
            emb[np.array(vis)] = self.visual_tokens(pixels).reshape(-1, emb.shape[-1])
        return emb

    def visual_tokens(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) normalised images -> (N, grid*grid, H) tokens for the LLM."""
        return self.vision.run(None, {"pixels": pixels})[0]

    # -- decoder -------------------------------------------------------------------------------
    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in range(2 * self.n_layers)]

    def forward(
        self,
        embeds: np.ndarray,
        mask: np.ndarray,
        cache: list[np.ndarray],
        logits_index: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call; logits only at `logits_index` (positions among the new tokens; default all)."""
        t = embeds.shape[1]
        feeds = {
            "inputs_embeds": embeds.astype(np.float32),
            "attention_mask": mask.astype(np.int64),
            "position_ids": positions(mask, cache[0].shape[2], t),
            "logits_index": np.arange(t, dtype=np.int64)
            if logits_index is None
            else np.asarray(logits_index, np.int64),
        }
        for i in range(self.n_layers):
            feeds[f"past_key_{i}"] = cache[2 * i]
            feeds[f"past_value_{i}"] = cache[2 * i + 1]
        out = (self._multi_token_graph() if t > 1 else self.decoder).run(None, feeds)
        return out[0], out[1:]

    def token_embeds(self, ids: np.ndarray) -> np.ndarray:
        return self.embedder.run(None, {"input_ids": ids.astype(np.int64)})[0]

    def _multi_token_graph(self):
        """The graph for calls of several tokens (prompts, candidate continuations): the INT8 prefill decoder
        where the bundle has one and the current requests' tasks take it, else the 4-bit decoder."""
        return self.decoder if self.prefill_decoder is None or self._exact_prompts else self.prefill_decoder

    @contextmanager
    def _for_tasks(self, tasks: Iterable[Task | None]) -> Iterator[None]:
        """The calls inside serve requests of these tasks: with `int8_prefill_tasks`, they take the INT8
        prefill decoder only when every one of the tasks is named there."""
        before = self._exact_prompts
        self._exact_prompts = not self._takes_int8_prefill({t.name if t is not None else None for t in tasks})
        try:
            yield
        finally:
            self._exact_prompts = before

    def _takes_int8_prefill(self, task_names: set[str | None]) -> bool:
        """Whether requests of these tasks may take the INT8 prefill decoder (every one named, or no list)."""
        return self.int8_prefill_tasks is None or task_names <= self.int8_prefill_tasks

    def _prefix(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Embeddings and KV cache of the chat prefix (system prompt + user turn opening) that starts every
        prompt: computed once per graph that prefills (a task on the 4-bit decoder must not read a cache the
        INT8 one wrote), so a request's prefill runs only over its own tokens."""
        key = id(self._multi_token_graph())
        if key not in self._prefix_cache:
            ids = self.tok.encode(self.cfg["chat_prefix"], add_special_tokens=False).ids
            emb = self.token_embeds(np.array([ids]))
            _, kv = self.forward(emb, np.ones((1, len(ids)), dtype=np.int64), self.empty_cache(1), [len(ids) - 1])
            self._prefix_cache[key] = (emb[0], kv)
        return self._prefix_cache[key]

    def prefill(self, embs: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Prompts (each (T_i, H)) -> last-position logits (B, V), KV cache, attention mask. The shared chat
        prefix comes from its cache when every prompt starts with it; prompts are left-padded after it, so
        every prompt ends in the last column (padding is masked and does not advance positions)."""
        pre_emb, pre_kv = self._prefix()
        n_pre = len(pre_emb)
        if not all(len(e) > n_pre and np.array_equal(e[:n_pre], pre_emb) for e in embs):
            n_pre = 0  # a prompt that does not start with the prefix: plain prefill
        elif len(embs) > 1:
            # Prompts of one batch that share more than the chat prefix (ECPE queries about one conversation
            # repeat it whole) have that part computed once, at batch 1, and its KV cache shared.
            common = _common_prefix(embs, n_pre)
            if common - n_pre >= 32:
                x0 = embs[0][n_pre:common][None]
                _, pre_kv = self.forward(x0, np.ones((1, common), dtype=np.int64), pre_kv, [x0.shape[1] - 1])
                n_pre = common
        n, longest = len(embs), max(len(e) for e in embs) - n_pre
        x = np.zeros((n, longest, embs[0].shape[1]), dtype=np.float32)
        mask = np.zeros((n, n_pre + longest), dtype=np.int64)
        mask[:, :n_pre] = 1
        for i, e in enumerate(embs):
            rest = e[n_pre:]
            x[i, longest - len(rest) :] = rest
            mask[i, n_pre + longest - len(rest) :] = 1
        cache = [np.repeat(kv, n, axis=0) for kv in pre_kv] if n_pre else self.empty_cache(n)
        logits, cache = self.forward(x, mask, cache, [longest - 1])
        return logits[:, -1], cache, mask

    # -- answers -------------------------------------------------------------------------------
    def stream(
        self,
        query: str,
        images: list[str] = (),
        max_new_tokens: int = 32,
        allowed: Callable[[str], Callable[[int], bool]] | None = None,
        task: Task | None = None,
    ) -> Iterator[str]:
        """Greedy decoding with a KV cache, yielding text pieces as tokens are chosen. `task`: its answer form
        applies (`Task.cut` ends the text, `Task.closing` completes it by scoring); pieces then trail the text by
        its last, unfinished word, so a cut inside a word never shows what it removes."""
        emb = self.embed(query, list(images))
        with self._for_tasks([task]):
            last, cache, mask = self.prefill([emb])
        cut = task.cut if task is not None and type(task).cut is not Task.cut else None
        ids: list[int] = []
        fed = 0  # generated tokens whose K/V the cache holds (the last one chosen may not have been fed)
        text = shown = ""
        for _ in range(max_new_tokens):
            row = last[0]
            if allowed is not None:
                row = self._constrain(row, allowed(text))
            nxt = int(row.argmax())
            if nxt == self.eos:
                break
            ids.append(nxt)
            text = self.tok.decode(ids, skip_special_tokens=True)
            if cut is not None:
                end = cut(text)
                if end is not None:
                    text = text[:end]
                    break
                ready = text[: max(text.rfind(" "), len(shown))]  # up to the last finished word
            else:
                ready = text
            if len(ready) > len(shown):
                yield ready[len(shown) :]
                shown = ready
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            logits, cache = self.forward(self.token_embeds(np.array([[nxt]])), mask, cache, [0])
            last = logits[:, -1]
            fed = len(ids)
        if len(text) > len(shown):
            yield text[len(shown) :]
        if task is not None and task.closing() is not None:
            if self.closing_from_cache:
                yield self._closing_from_cache(cache, mask, ids[:fed], text, task)
            else:
                yield self._closings([emb], [text], [task])[0]

    def _closings(self, embs: list[np.ndarray], texts: list[str], tasks: list[Task]) -> list[str]:
        """What completes each generated text: its task's closing prefix and the candidate scored best after
        prompt + text + prefix, all requests in one scoring call. The prompt is prefilled again with the text
        (not continued from the decoding cache): one prefill per answer, which on 2 AVX2 cores was a quarter of
        an ERI answer's time; `closing_from_cache` continues from the cache instead (`_closing_from_cache`)."""
        ext, cands, prefixes = [], [], []
        for emb, text, task in zip(embs, texts, tasks, strict=True):
            prefix, options = task.closing()
            ids = self.tok.encode(text + prefix, add_special_tokens=False).ids
            ext.append(np.concatenate([emb, self.token_embeds(np.array([ids]))[0]]))
            cands.append(options)
            prefixes.append(prefix)
        scores = self.score_embedded(ext, cands, list(tasks))
        return [
            prefix + task.choose(options, s)
            for prefix, task, options, s in zip(prefixes, tasks, cands, scores, strict=True)
        ]

    def _closing_from_cache(
        self, cache: list[np.ndarray], mask: np.ndarray, fed: list[int], text: str, task: Task
    ) -> str:
        """`_closings` for one request (batch 1) continued from its decoding cache instead of a second prefill
        of prompt + text: the cache is cut back to the prompt and the generated tokens that begin the tokens of
        text + closing prefix (a cut inside the generated text, or a word tokenized differently once the prefix
        follows, ends the shared part), and only the rest is fed. ERI's closing re-prefill was 25-29% of every
        ERI answer on an AVX2 EPYC (docs/history.md). Not bit-identical to `_closings` (cached K/V come from
        decode steps, not one prefill call), hence opt-in (`closing_from_cache` in runtime.json)."""
        prefix, options = task.closing()
        want = self.tok.encode(text + prefix, add_special_tokens=False).ids
        shared = 0
        while shared < min(len(fed), len(want) - 1) and fed[shared] == want[shared]:
            shared += 1  # at least one token is fed below: its logits start the candidates' scores
        keep = mask.shape[1] - len(fed) + shared  # the prompt's columns, then the shared generated tokens
        rest = np.array([want[shared:]], dtype=np.int64)
        mask = np.concatenate([mask[:, :keep], np.ones(rest.shape, dtype=np.int64)], axis=1)
        with self._for_tasks([task]):
            at = [rest.shape[1] - 1]
            logits, cache = self.forward(self.token_embeds(rest), mask, [kv[:, :, :keep] for kv in cache], at)
            scores = self._score_from(logits[:, -1], cache, mask, [options], [task])[0]
        return prefix + task.choose(options, scores)

    def generate_many(
        self,
        items: list[tuple[str, list[str], int, Callable | None] | tuple[str, list[str], int, Callable | None, Task]],
        embs: list[np.ndarray] | None = None,
    ) -> list[str]:
        """Greedy answers of several (query, images, max_new_tokens, grammar[, task]) requests decoded together:
        one left-padded prefill, then one decoder step per token for the whole batch. Each row takes exactly
        the tokens `stream` would take alone (same constraint, same stop rules, the task's cut and closing);
        finished rows ride along. `embs`: the prompts already embedded (as answer_many has them), else
        embedded here."""
        if embs is None:
            embs = [self.embed(item[0], list(item[1])) for item in items]
        tasks: list[Task | None] = [item[4] if len(item) > 4 else None for item in items]
        with self._for_tasks(tasks):  # decode steps are single tokens: the 4-bit decoder in any case
            last, cache, mask = self.prefill(embs)
        n = len(items)
        ids: list[list[int]] = [[] for _ in range(n)]
        texts = [""] * n
        done = [False] * n
        start, fed = mask.shape[1], [0] * n  # row i's generated K/V: columns start .. start + fed[i] - 1
        for _ in range(max(item[2] for item in items)):
            nxt = np.full((n, 1), self.eos, dtype=np.int64)
            for i, item in enumerate(items):
                if done[i]:
                    continue
                max_new, allowed = item[2], item[3]
                row = last[i] if allowed is None else self._constrain(last[i], allowed(texts[i]))
                tid = int(row.argmax())
                if tid == self.eos or len(ids[i]) >= max_new:
                    done[i] = True
                    continue
                ids[i].append(tid)
                texts[i] = self.tok.decode(ids[i], skip_special_tokens=True)
                end = tasks[i].cut(texts[i]) if tasks[i] is not None else None
                if end is not None:
                    texts[i] = texts[i][:end]
                    done[i] = True
                    continue
                nxt[i, 0] = tid
            if all(done):
                break
            mask = np.concatenate([mask, np.ones((n, 1), dtype=np.int64)], axis=1)
            logits, cache = self.forward(self.token_embeds(nxt), mask, cache, [0])
            last = logits[:, -1]
            fed = [f + int(not done[i]) for i, f in enumerate(fed)]  # finished rows ride along on end tokens
        closing = [i for i, t in enumerate(tasks) if t is not None and t.closing() is not None]
        if closing and self.closing_from_cache:
            for i in closing:
                end = start + fed[i]
                row = [kv[i : i + 1, :, :end] for kv in cache], mask[i : i + 1, :end], ids[i][: fed[i]]
                texts[i] += self._closing_from_cache(*row, texts[i], tasks[i])
        elif closing:
            ends = self._closings([embs[i] for i in closing], [texts[i] for i in closing], [tasks[i] for i in closing])
            for i, end in zip(closing, ends, strict=True):
                texts[i] += end
        return [t.strip() for t in texts]

    def _constrain(self, row: np.ndarray, ok: Callable[[int], bool]) -> np.ndarray:
        """Keep only the best-scoring token the grammar allows (the top 64 first; the whole vocabulary in the
        rare case none of them fits), else end the answer."""
        out = np.full_like(row, -np.inf)
        top = np.argpartition(-row, 64)[:64] if row.size > 64 else np.arange(row.size)
        for candidates in (top[np.argsort(-row[top])], np.argsort(-row)):
            for tid in candidates:
                if ok(int(tid)):
                    out[tid] = row[tid]
                    return out
        out[self.eos] = 0.0
        return out

    def generate(
        self, query: str, images: list[str] = (), max_new_tokens: int = 32, allowed=None, task: Task | None = None
    ) -> str:
        return "".join(self.stream(query, images, max_new_tokens, allowed, task)).strip()

    def score(self, query: str, candidates: list[str], images: list[str] = (), task: Task | None = None) -> list[float]:
        """Sum log-probability of each candidate answer after the prompt (`task`: scored as that task's answers
        are, see `score_embedded`)."""
        return self.score_batch([(query, candidates, list(images))], task)[0]

    def score_batch(self, items: list[tuple[str, list[str], list[str]]], task: Task | None = None) -> list[list[float]]:
        """Closed-label scoring of several requests at once: one prefill of all prompts (left-padded, so
        every prompt ends in the last column), then every candidate of every request in one batch over
        the prompts' KV cache."""
        embs = [self.embed(q, list(images)) for q, _, images in items]
        return self.score_embedded(embs, [c for _, c, _ in items], [task] * len(items))

    def score_embedded(
        self, embs: list[np.ndarray], candidates: list[list[str]], tasks: list[Task | None] | None = None
    ) -> list[list[float]]:
        """Summed log-probability of every candidate of every prompt, from one prefill of all prompts, each
        request's candidates scored as its task says (`tasks[i]`; None: every candidate as given, to its end).

        `Task.score_with_end`: each candidate is followed by the end of the answer. `Task.chooses_best`: the
        request needs only its best candidate (a label task), so its candidates are scored
        branch-and-bound: the first token's log-probability bounds a candidate's sum from above (each further
        token adds a log-probability <= 0), so only candidates whose bound reaches the best complete score
        are teacher-forced to the end; the others are returned as -inf (they cannot win). The argmax is the
        same as scoring all; MER's 7 labels cost one continuation row instead of 7 in almost every request."""
        tasks = tasks or [None] * len(embs)
        with self._for_tasks(tasks):
            return self._score_embedded(embs, candidates, tasks)

    def _score_embedded(
        self, embs: list[np.ndarray], candidates: list[list[str]], tasks: list[Task | None]
    ) -> list[list[float]]:
        last, cache, mask = self.prefill(embs)
        return self._score_from(last, cache, mask, candidates, tasks)

    def _score_from(
        self,
        last: np.ndarray,
        cache: list[np.ndarray],
        mask: np.ndarray,
        candidates: list[list[str]],
        tasks: list[Task | None],
    ) -> list[list[float]]:
        """`_score_embedded` after the prefill: `last` (B, V) the logits after each prompt, `cache`/`mask` its
        KV cache and attention mask."""
        first = _log_softmax(last)
        best_only = [t is not None and t.chooses_best for t in tasks]
        end = [[self.eos] if t is not None and t.score_with_end else [] for t in tasks]
        rows = [i for i, cands in enumerate(candidates) for _ in cands]
        cand = [
            self.tok.encode(c, add_special_tokens=False).ids + end[i]
            for i, cands in enumerate(candidates)
            for c in cands
        ]
        bound = [float(first[r, c[0]]) for r, c in zip(rows, cand, strict=True)]
        full: list[float | None] = [b if len(c) == 1 else None for b, c in zip(bound, cand, strict=True)]
        by_row: dict[int, list[int]] = {}  # request -> its candidates' flat indices
        for k, r in enumerate(rows):
            by_row.setdefault(r, []).append(k)
        top = {r: max(bound[k] for k in ks) for r, ks in by_row.items()}
        if self.label_margin is not None:  # a clear first-token leader wins without its continuation
            for r, ks in by_row.items():
                ranked = sorted(ks, key=lambda k: bound[k], reverse=True)
                runner_up = bound[ranked[1]] if len(ranked) > 1 else -np.inf
                # closed labels only: their continuation ('.', end) is what the margin was measured against
                # (scripts/label_margin_dev.py); ERI's closing words are longer, and slow requests anyway
                closed_label = best_only[r] and tasks[r].closed
                if closed_label and bound[ranked[0]] - runner_up >= self.label_margin:
                    full[ranked[0]] = bound[ranked[0]]  # the others' bounds lie below it: no pass reopens them
        todo = [
            k
            for k in range(len(cand))
            if full[k] is None and (not best_only[rows[k]] or bound[k] >= top[rows[k]] - PRUNE_MARGIN)
        ]
        self._continue(cand, rows, cache, mask, todo, bound, full)
        # Second pass: a candidate left out whose bound still reaches its request's best complete score.
        best: dict[int, float] = {}
        for k, f in enumerate(full):
            if f is not None:
                best[rows[k]] = max(best.get(rows[k], -np.inf), f)
        todo = [k for k in range(len(cand)) if full[k] is None and bound[k] >= best[rows[k]]]
        self._continue(cand, rows, cache, mask, todo, bound, full)
        flat = [-np.inf if f is None else f for f in full]
        out, k = [], 0
        for cands in candidates:
            out.append(flat[k : k + len(cands)])
            k += len(cands)
        return out

    def _continue(self, cand, rows, cache, mask, todo: list[int], bound: list[float], full: list) -> None:
        """Complete the scores of candidates `todo`: teacher-force their remaining tokens over their request's
        cache, SCORE_ROWS candidates at a time (every row carries a copy of its prompt's KV cache, so ECPE's
        7 cause sets x 16 long prompts at once would hold ~100 copies of a ~600-token cache; an eval was
        OOM-killed at 16 GB that way)."""
        for start in range(0, len(todo), SCORE_ROWS):
            part = todo[start : start + SCORE_ROWS]
            rest_len = max(len(cand[k]) for k in part) - 1
            at = [rows[k] for k in part]
            rest = np.array([cand[k][:-1] + [self.pad] * (rest_len + 1 - len(cand[k])) for k in part], dtype=np.int64)
            cand_mask = np.array(
                [[1] * (len(cand[k]) - 1) + [0] * (rest_len + 1 - len(cand[k])) for k in part], dtype=np.int64
            )
            lg, _ = self.forward(
                self.token_embeds(rest),
                np.concatenate([mask[at], cand_mask], axis=1),
                [kv[at] for kv in cache],
            )
            lp = _log_softmax(lg)
            for i, k in enumerate(part):
                full[k] = bound[k] + sum(float(lp[i, j, cand[k][j + 1]]) for j in range(len(cand[k]) - 1))

    def grammar_for(self, task: str, query: str) -> Callable[[str], Callable[[int], bool]] | None:
        """The task's output grammar (tasks.py owns it; ECPE's pair form) as a token filter: given the text so
        far, which next token ids keep it a valid prefix, and whether end-of-answer is allowed yet."""
        grammar = get_task(task).grammar(query)
        if grammar is None:
            return None

        def allowed(text: str) -> Callable[[int], bool]:
            def ok(tid: int) -> bool:
                if tid == self.eos:
                    return grammar.complete(text)
                return grammar.ok_prefix(text + self.tok.decode([tid]))

            return ok

        return allowed

    def answer(self, task: str, query: str, images: list[str] = (), mode: str = "score") -> Answer:
        try:
            t = get_task(task)
        except ValueError as e:
            raise RequestError(str(e)) from None
        images = list(images)
        if t.scored and mode == "score":
            cands = t.candidates(query)
            return _scored_answer(t, cands, self.score(query, cands, images, t))
        text = self.generate(query, images, t.max_new_tokens, self.grammar_for(task, query), t)
        parsed = t.parse(text)
        return Answer(task, text, parsed.label if t.closed else None)

    def _prompt_groups(self, items: list, task_of: Callable[[object], Task]) -> list[list]:
        """`items` split (order kept within each) into those whose task takes the INT8 prefill decoder and the
        rest; one group where the bundle's decoders do not depend on the task."""
        if self.prefill_decoder is None or self.int8_prefill_tasks is None:
            return [items]
        groups: tuple[list, list] = ([], [])
        for x in items:
            groups[self._takes_int8_prefill({task_of(x).name})].append(x)
        return [groups[True], groups[False]]

    def answer_many(
        self, requests: list[dict], mode: str = "score", batch_size: int = 8
    ) -> list[Answer | RequestError]:
        """Batched requests, `batch_size` at a time: scored ones (label tasks, ECPE) in one prefill, generated ones
        decoded together (`generate_many`, with each task's grammar); a bad request yields its error in its
        place and the others are still answered."""
        out: list[Answer | RequestError | None] = [None] * len(requests)
        batch: list[tuple[int, np.ndarray, list[str], object]] = []
        gen: list[tuple[int, object, tuple, np.ndarray]] = []
        for i, r in enumerate(requests):
            try:
                t = get_task(r["task"])
                images = list(r.get("images", []))
                if t.scored and mode == "score":  # embedded alone, so a bad image or prompt fails alone
                    batch.append((i, self.embed(r["query"], images), t.candidates(r["query"]), t))
                else:  # embedded alone too, and the embedding kept for the batch
                    item = (r["query"], images, t.max_new_tokens, self.grammar_for(t.name, r["query"]), t)
                    gen.append((i, t, item, self.embed(r["query"], images)))
            except RequestError as e:
                out[i] = e
            except (ValueError, KeyError, TypeError) as e:
                out[i] = RequestError(f"request {i}: {type(e).__name__}: {e}")
        # requests whose prompts take different decoders (int8_prefill_tasks) are never batched together
        for group in self._prompt_groups(gen, lambda x: x[1]):
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                texts = self.generate_many([item for _, _, item, _ in chunk], [e for *_, e in chunk])
                for (i, t, _, _), text in zip(chunk, texts, strict=True):
                    out[i] = Answer(t.name, text, t.parse(text).label if t.closed else None)
        for group in self._prompt_groups(batch, lambda x: x[3]):
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                scored = self.score_embedded(
                    [e for _, e, _, _ in chunk], [c for _, _, c, _ in chunk], [t for *_, t in chunk]
                )
                for (i, _, cands, t), s in zip(chunk, scored, strict=True):
                    out[i] = _scored_answer(t, cands, s)
        return out  # type: ignore[return-value]


def load_time_tensors(path: Path) -> bytes | None:
    """The graph at `path` with its load-time tensors (names ending in LOAD_TIME_SUFFIXES) computed and stored
    as plain initializers, serialized; None when it has none.

    Why not leave them to onnxruntime: its constant folding computes them too, but on the release's INT8 prefill
    decoder it held 7.8 GB resident and took 16 s (the fp32 intermediates of all 30 layers stay allocated until
    the pass ends). Running the same nodes as a graph of their own, with optimizations off, lets the executor
    free each intermediate after its last reader: 1.5 s, < 0.4 GB, and the decoder's outputs are the folded
    session's bit for bit (same kernels; tests/export/test_w4lora.py)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    by_out = {o: n for n in model.graph.node for o in n.output}
    targets = [o for o in by_out if o.endswith(LOAD_TIME_SUFFIXES)]
    if not targets:
        return None
    ancestors: set[int] = set()
    stack = list(targets)
    while stack:
        node = by_out.get(stack.pop())
        if node is not None and id(node) not in ancestors:
            ancestors.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in model.graph.node if id(n) in ancestors]
    stored = {t.name: t for t in model.graph.initializer}
    read = {i for n in nodes for i in n.input}
    graph_inputs = {i.name for i in model.graph.input}
    if read & graph_inputs:
        raise ArtifactError(f"{path}: load-time tensors depend on graph inputs {sorted(read & graph_inputs)[:3]}")
    inferred = onnx.shape_inference.infer_shapes(model)  # element types of the load-time tensors (0.2 s)
    elem = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    fold = helper.make_model(
        helper.make_graph(
            nodes,
            "load_time",
            [],
            [helper.make_tensor_value_info(t, elem.get(t, TensorProto.UNDEFINED), None) for t in targets],
            [stored[i] for i in sorted(read) if i in stored],
        ),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    values = ort.InferenceSession(fold.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(targets, {})
    rest = [n for n in model.graph.node if id(n) not in ancestors]
    del model.graph.node[:]
    model.graph.node.extend(rest)
    drop_unread_initializers(model.graph)
    model.graph.initializer.extend(numpy_helper.from_array(v, t) for t, v in zip(targets, values, strict=True))
    return model.SerializeToString()


def drop_unread_initializers(graph) -> None:
    """Remove the initializers no node of `graph` (an onnx GraphProto) reads; the exporter's pruning of replaced
    nodes uses it too."""
    read = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def check_graph_paths(bundle: Path, graph: str) -> None:
    """A graph, and any external-data file it references, must lie inside the bundle folder."""
    import onnx

    root = bundle.resolve()
    path = (bundle / graph).resolve()
    if root not in path.parents:
        raise ArtifactError(f"{bundle}/runtime.json: graph path {graph!r} escapes the bundle folder")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and root not in (path.parent / entry.value).resolve().parents:
                raise ArtifactError(
                    f"{path}: external data {entry.value!r} of {tensor.name!r} escapes the bundle folder"
                )


def _scored_answer(task, candidates: list[str], scores: list[float]) -> Answer:
    """A scored answer: what the task chooses from its candidates' scores (a label task: the best one, and its
    label), with the score of every candidate scored to the end (one ruled out by its bound is left out)."""
    text = task.choose(candidates, scores)
    label = task.parse_label(text) if task.closed else None
    return Answer(task.name, text, label, {c: s for c, s in zip(candidates, scores, strict=True) if s > -np.inf})


def _common_prefix(embs: list[np.ndarray], start: int) -> int:
    """How many leading rows all prompts share (at least `start`), leaving each at least one row of its own."""
    limit = min(len(e) for e in embs) - 1
    first = embs[0]
    end = start
    while end < limit and all(np.array_equal(e[end], first[end]) for e in embs[1:]):
        end += 1
    return end


def positions(mask: np.ndarray, past: int, t: int) -> np.ndarray:
    """Position ids of the `t` new tokens: count of attended tokens before each (padding does not count)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past : past + t].astype(np.int64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


__all__ = ["OrtRuntime", "Answer", "RequestError", "TASKS"]
