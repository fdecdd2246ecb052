"""Record -> token ids with visual slots: the chat template, the image placeholder, response-only labels.

Also the image/video readers, so a bad media file fails here with its path named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emoverse.imaging import load_pixels, to_pixels
from emoverse.tasks import IMAGE_PLACEHOLDER, SYSTEM_PROMPT

IGNORE = -100


class PromptTooLong(ValueError):
    pass


class MediaError(ValueError):
    pass


@dataclass(frozen=True)
class MediaRef:
    path: str
    frame: int | None = None  # None: a still image; else the index of a frame sampled from a video
    n_frames: int = 0
    view: int | None = None  # a training view of a still image (imaging.augment); None: the image as it is

    @property
    def key(self) -> str:
        key = self.path if self.frame is None else f"{self.path}#{self.frame}/{self.n_frames}"
        return key if self.view is None else f"{key}~view{self.view}"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    visual_mask: list[bool]
    media: list[MediaRef] = field(default_factory=list)


def load_image(path: str, size: int, view: int | None = None) -> torch.Tensor:
    return torch.from_numpy(load_pixels(path, size, MediaError, view=view))


def video_frame_count(path: str) -> int:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise MediaError(
            f"{path}: reading video needs the 'video' extra (pip install imageio imageio-ffmpeg)"
        ) from None
    if not Path(path).is_file():
        raise MediaError(f"{path}: video file not found")
    try:
        meta = iio.improps(path, plugin="pyav") if _has_pyav() else iio.improps(path)
        return int(meta.shape[0])
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad video for the user
        raise MediaError(f"{path}: unreadable video ({e})") from None


def _has_pyav() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def load_video_frame(ref: MediaRef, size: int) -> torch.Tensor:
    import imageio.v3 as iio
    from PIL import Image

    try:
        frame = iio.imread(ref.path, index=ref.frame)
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"{ref.path}: cannot read frame {ref.frame} ({e})") from None

    return torch.from_numpy(to_pixels(Image.fromarray(frame), size))


class PromptBuilder:
    def __init__(self, tokenizer, n_visual: int, max_length: int, image_size: int, max_video_frames: int):
        self.tok = tokenizer
        self.n_visual = n_visual
        self.max_length = max_length
        self.image_size = image_size
        self.max_video_frames = max_video_frames
        self.pad_id = tokenizer.pad_token_id
        # "error": a listed image/video that does not exist fails the record; "drop": the record is used
        # without it (e.g. the paper's test files list MELD videos that are distributed separately)
        self.missing_media = "error"
        self.end = tokenizer.eos_token or ""

    def media_refs(self, images: list[str], videos: list[str]) -> list[MediaRef]:
        if self.missing_media == "drop":
            images = [p for p in images if Path(p).is_file()]
            videos = [v for v in videos if Path(v).is_file()]
        refs = [MediaRef(p) for p in images]
        for v in videos:
            n = video_frame_count(v)
            k = min(self.max_video_frames, n)
            idx = np.linspace(0, n - 1, k).round().astype(int) if k else []
            refs += [MediaRef(v, int(i), n) for i in idx]
        return refs

    def pixels(self, ref: MediaRef) -> torch.Tensor:
        if ref.frame is None:
            return load_image(ref.path, self.image_size, ref.view)
        return load_video_frame(ref, self.image_size)

    def render(self, query: str, n_media: int) -> str:
        """Chat-template text of the prompt, with one IMAGE_PLACEHOLDER per media item."""
        have = query.count(IMAGE_PLACEHOLDER)
        if have > n_media and self.missing_media == "drop":
            query = query.replace(IMAGE_PLACEHOLDER, "", have - n_media).lstrip()
            have = n_media
        if have > n_media:
            raise ValueError(f"query has {have} {IMAGE_PLACEHOLDER} placeholders but only {n_media} images/frames")
        user = IMAGE_PLACEHOLDER * (n_media - have) + query  # media not placed in the query go first
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        if self.tok.chat_template:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return f"{SYSTEM_PROMPT}\n\nUser: {user}\nAssistant: "

    def encode(self, query: str, response: str | None, images: list[str], videos: list[str]) -> Encoded:
        media = self.media_refs(images, videos)
        text = self.render(query, len(media))
        ids: list[int] = []
        vmask: list[bool] = []
        for i, seg in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += [self.pad_id] * self.n_visual
                vmask += [True] * self.n_visual
            seg_ids = self.tok.encode(seg, add_special_tokens=False)
            ids += seg_ids
            vmask += [False] * len(seg_ids)
        labels = [IGNORE] * len(ids)
        if response is not None:
            resp = self.tok.encode(response + self.end, add_special_tokens=False)
            ids += resp
            labels += resp
            vmask += [False] * len(resp)
        if len(ids) > self.max_length:
            raise PromptTooLong(f"{len(ids)} tokens, over the model's max_length {self.max_length}")
        return Encoded(ids, labels, vmask, media)

    def collate(self, items: list[Encoded]) -> dict:
        """Right-padded training batch."""
        width = max(len(e.input_ids) for e in items)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        return {
            "input_ids": torch.tensor(pad([e.input_ids for e in items], self.pad_id)),
            "labels": torch.tensor(pad([e.labels for e in items], IGNORE)),
            "attention_mask": torch.tensor(pad([[1] * len(e.input_ids) for e in items], 0)),
            "visual_mask": torch.tensor(pad([e.visual_mask for e in items], False)),
            "media": [m for e in items for m in e.media],
            "n_tokens": sum(len(e.input_ids) for e in items),
        }

    def collate_packed(self, items: list[Encoded]) -> dict:
        """The batch as ONE row: its records' token sequences merged into a prefix tree, each token once per
        distinct prefix, every token attending to its own ancestors only, at its depth as position (a 4-D
        attention mask and position ids). The loss is the unpacked batch's: each response token sees exactly
        its record's earlier tokens at the same positions. One ECPE conversation's targets share the whole
        conversation (about half of ECPE's training tokens), and every record shares the system prompt.

        Text-only records (visual tokens would have to follow their media); see `packable`. Each record's
        last prompt token and its response stay its own, so a response's first token is predicted from its own
        record's position even when two records' prompts are identical; and in the row a response token
        directly follows its parent (the next-token shift of the loss holds)."""
        if not packable(items):
            raise ValueError("collate_packed: records with images/videos cannot share a packed row")
        tokens, parents, labels = packed_tree(items)
        n = len(tokens)
        ancestors = torch.zeros(n, n, dtype=torch.bool)
        depth = torch.zeros(n, dtype=torch.long)
        for i, parent in enumerate(parents):  # parents come before their children
            if parent >= 0:
                ancestors[i] = ancestors[parent]
                depth[i] = depth[parent] + 1
            ancestors[i, i] = True
        return {
            "input_ids": torch.tensor([tokens]),
            "labels": torch.tensor([labels]),
            "attention_mask": ancestors[None, None],
            "position_ids": depth[None],
            "visual_mask": torch.zeros(1, n, dtype=torch.bool),
            "media": [],
            "n_tokens": sum(len(e.input_ids) for e in items),
        }


def packable(items: list[Encoded]) -> bool:
    """Whether `collate_packed` takes these records: text-only, each with a response."""
    return all(not e.media and _prompt_length(e) < len(e.input_ids) for e in items)


def _prompt_length(e: Encoded) -> int:
    return next((i for i, label in enumerate(e.labels) if label != IGNORE), len(e.labels))


class _PrefixTree:
    """The prefix tree `collate_packed` lays out, grown one record at a time (creation order: parents first).
    Shared: the tokens before each record's last prompt token; that token and the response are the record's
    own."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.labels: list[int] = []
        self._children: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def add(self, e: Encoded) -> None:
        p = _prompt_length(e)
        node = -1
        for tok in e.input_ids[: p - 1]:
            nxt = self._children.get((node, tok))
            if nxt is None:
                nxt = self._children[(node, tok)] = len(self.tokens)
                self.tokens.append(tok)
                self.parents.append(node)
                self.labels.append(IGNORE)
            node = nxt
        for tok, label in zip(e.input_ids[p - 1 :], e.labels[p - 1 :], strict=True):
            self.tokens.append(tok)
            self.parents.append(node)
            self.labels.append(label)
            node = len(self.tokens) - 1


def packed_tree(items: list[Encoded]) -> tuple[list[int], list[int], list[int]]:
    """(tokens, parent index or -1, labels) of the prefix tree of `items`, in creation order."""
    tree = _PrefixTree()
    for e in items:
        tree.add(e)
    return tree.tokens, tree.parents, tree.labels


def packed_sizes(items: list[Encoded]) -> list[int]:
    """Tokens in `collate_packed`'s row of items[:1], items[:2], ... (one tree, grown record by record)."""
    tree, sizes = _PrefixTree(), []
    for e in items:
        tree.add(e)
        sizes.append(len(tree.tokens))
    return sizes
