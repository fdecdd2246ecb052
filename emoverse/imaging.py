"""Image preprocessing shared by the PyTorch model and the torch-free runtime (numpy + pillow only)."""

from __future__ import annotations

import numpy as np


def to_pixels(img, size: int) -> np.ndarray:
    # Hand-written because torchvision cannot be installed beside this torch build: RGB, bilinear resize,
    # scaled to [-1, 1] as EfficientNet-Lite's TF weights expect (mean 0.5, std 0.5). (3, size, size) float32.
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def load_pixels(path: str, size: int, error: type[Exception] = ValueError) -> np.ndarray:
    """Pixels of an image file; a missing or unreadable file raises `error` naming the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return to_pixels(im, size)
    except FileNotFoundError:
        raise error(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise error(f"{path}: unreadable image ({e})") from None
