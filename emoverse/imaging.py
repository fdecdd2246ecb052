"""Image preprocessing shared by the PyTorch model and the torch-free runtime (numpy + pillow only)."""

from __future__ import annotations

import numpy as np


def to_pixels(img, size: int) -> np.ndarray:
    # Hand-written because torchvision cannot be installed beside this torch build: RGB, bilinear resize,
    # scaled to [-1, 1] as EfficientNet-Lite's TF weights expect (mean 0.5, std 0.5). (3, size, size) float32.
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def augment(img, view: int, path: str = ""):
    """One training view of an image, the same for every (path, view): a horizontal flip (half the views),
    a crop of 80-100% of each side, a rotation within +-10 degrees, brightness and contrast within +-20%.
    Why: the FER training faces (CK+ train, ~650 posed faces of ~90 subjects) are fitted within a few hundred
    steps while other subjects and corpora are not; views of each face make the projector's fit depend less on
    one subject's pose, framing and lighting. Hand-written because torchvision cannot be installed beside this
    torch build; deterministic so a resumed run sees the same views and the frozen features stay cacheable."""
    import zlib

    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([int(view), zlib.crc32(path.encode())])
    img = img.convert("RGB")
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = img.size
    cw, ch = (max(1, round(d * rng.uniform(0.8, 1.0))) for d in (w, h))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch)).rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.8, 1.2)))


def load_pixels(path: str, size: int, error: type[Exception] = ValueError, view: int | None = None) -> np.ndarray:
    """Pixels of an image file (with `view`, that training view of it: `augment`); a missing or unreadable
    file raises `error` naming the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return to_pixels(im if view is None else augment(im, view, path), size)
    except FileNotFoundError:
        raise error(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise error(f"{path}: unreadable image ({e})") from None
