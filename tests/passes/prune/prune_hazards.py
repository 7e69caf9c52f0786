"""Models on which a careless pruner returns a model that runs and is wrong (issue 10).

Each class is legal PyTorch that a dependency graph must read correctly: normalising reductions over
a prunable dim, size attributes used as values, Python branches on shapes, parameters the graph never
uses, conv features flattened into a Linear, and transposed convolutions.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Mlp(nn.Module):
    """in -> hidden -> (a function of the hidden vector) -> out."""

    def __init__(self, d_in=6, hidden=8, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def mix(self, h):
        raise NotImplementedError

    def forward(self, x):
        return self.fc2(self.mix(self.fc1(x)))


class SoftmaxOverChannels(_Mlp):
    def mix(self, h):
        return torch.softmax(h, dim=-1)


class CenteredChannels(_Mlp):
    def mix(self, h):
        return h - h.mean(-1, keepdim=True)


class VarianceScaled(_Mlp):
    def mix(self, h):
        return h / (h.var(-1, keepdim=True) + 1.0)


class LogSumExpShift(_Mlp):
    def mix(self, h):
        return h - torch.logsumexp(h, dim=1, keepdim=True)


class UnitNormChannels(_Mlp):
    def mix(self, h):
        return F.normalize(h, dim=-1)


class MaxShift(_Mlp):
    def mix(self, h):
        return h - h.amax(-1, keepdim=True)


class SumGate(_Mlp):
    """A sum over channels is exact under removal of dead (zero) units: this one stays prunable."""

    def mix(self, h):
        return h * torch.sigmoid(h.sum(-1, keepdim=True))


class ScalarMeanOutput(nn.Module):
    """A mean of the hidden units reaches an output (an auxiliary loss-like scalar)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h), h.pow(2).mean()


class ScaledHandAttention(nn.Module):
    """Attention written by hand: the softmax scale reads ``self.head_dim``."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        return x + self.o(out)


class WidthAsValue(nn.Module):
    """``self.width`` is a view size and also a multiplier."""

    def __init__(self):
        super().__init__()
        self.width = 12
        self.fc1, self.fc2 = nn.Linear(5, self.width), nn.Linear(self.width, 3)

    def forward(self, x):
        h = self.fc1(x).view(x.shape[0], self.width)
        return self.fc2(h * self.width)


class ShapeBranch(nn.Module):
    """Python control flow on a prunable width."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if h.shape[-1] > 8:
            h = h * 0.5
        return self.fc2(h)


class ParityDispatch(nn.Module):
    """A submodule picks its activation by the parity of the width it is given."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 10), _ParityAct(), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _ParityAct(nn.Module):
    def forward(self, h):
        return torch.tanh(h) if h.size(-1) % 4 == 2 else F.relu(h)


class UnusedParameters(nn.Module):
    """A parameter and a layer that forward never touches."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        self.spare = nn.Parameter(torch.randn(6, 4))
        self.unused = nn.Linear(7, 9)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class ConvFlattenLinear(nn.Module):
    """LeNet-shaped: conv features flattened (C x H x W) into a Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 8, 3)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 20), nn.Linear(20, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class ConvViewLinear(nn.Module):
    """VGG-shaped head: average-pooled features reshaped with ``view(n, -1)``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 10, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(10 * 4, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(x.view(x.size(0), -1))


class TransposedConvs(nn.Module):
    """An encoder-decoder with strided, grouped and dilated transposed convolutions."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1)
        self.grouped = nn.ConvTranspose2d(12, 8, 3, padding=1, groups=4)
        self.dilated = nn.ConvTranspose2d(8, 6, 3, padding=2, dilation=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = F.relu(self.down(x))
        x = F.relu(self.up(x))
        x = F.relu(self.grouped(x))
        return self.head(F.relu(self.dilated(x)))


class TransposedConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 10, 3, padding=1)
        self.b = nn.ConvTranspose1d(10, 6, 4, stride=2, padding=1)
        self.c = nn.Conv1d(6, 3, 1)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _rows() -> torch.Tensor:
    return torch.randn(4, 6)


#: name -> (class, example input)
HAZARDS = {
    "softmax_channels": (SoftmaxOverChannels, _rows),
    "centered_channels": (CenteredChannels, _rows),
    "variance_scaled": (VarianceScaled, _rows),
    "logsumexp_shift": (LogSumExpShift, _rows),
    "unit_norm_channels": (UnitNormChannels, _rows),
    "max_shift": (MaxShift, _rows),
    "sum_gate": (SumGate, _rows),
    "scalar_mean_output": (ScalarMeanOutput, _rows),
    "scaled_hand_attention": (ScaledHandAttention, lambda: torch.randn(2, 5, 16)),
    "width_as_value": (WidthAsValue, lambda: torch.randn(4, 5)),
    "shape_branch": (ShapeBranch, lambda: torch.randn(4, 5)),
    "parity_dispatch": (ParityDispatch, lambda: torch.randn(4, 5)),
    "unused_parameters": (UnusedParameters, lambda: torch.randn(4, 5)),
    "conv_flatten_linear": (ConvFlattenLinear, lambda: torch.randn(2, 1, 14, 14)),
    "conv_view_linear": (ConvViewLinear, lambda: torch.randn(2, 3, 8, 8)),
    "transposed_convs": (TransposedConvs, lambda: torch.randn(2, 3, 8, 8)),
    "transposed_conv1d": (TransposedConv1d, lambda: torch.randn(2, 4, 9)),
}
