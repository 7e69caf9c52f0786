"""Models shaped like those of Torch-Pruning's own test suite (the ones that need no torchvision).

Written for graphopt's tests after reading that suite (VainF/Torch-Pruning, tests/): the same
structures (cascaded concatenations, splits sized from module attributes, a LeNet head, a
transposed-convolution decoder fed by a reshaped Linear, a custom normalising layer, unused
parameters, several inputs and outputs), not its code.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in, c_out, act=True):
    layers = [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.GELU()) if act else nn.Sequential(*layers)


class CascadedConcat(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c, act=False))
        self.b = nn.Sequential(_conv_bn(c, 2 * c), _conv_bn(2 * c, 2 * c, act=False))
        self.c = _conv_bn(c, 3 * c, act=False)
        self.d = _conv_bn(c, 5 * c, act=False)
        self.out = nn.Conv2d(11 * c, 6, 1)

    def forward(self, x):
        ab = torch.cat([self.a(x), self.b(x)], 1)
        abc = torch.cat([ab, self.c(x)], 1)
        return self.out(torch.cat([abc, self.d(x)], 1))


class WideAndDeep(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.deep = nn.Sequential(nn.Linear(d, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(24, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 1))
        self.wide = nn.Linear(d, 3)
        self.join = nn.Linear(4, 1)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return torch.sigmoid(self.join(torch.cat([self.wide(x), self.deep(x)], -1)))


class SplitSizedByAttributes(nn.Module):
    """Split sizes read from the layers that consume the pieces, a parallel path, a residual add."""

    def __init__(self, c=4):
        super().__init__()
        self.main = nn.Sequential(_conv_bn(c, c), _conv_bn(c, 2 * c, act=False))
        self.side = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c, act=False))
        self.merge = _conv_bn(2 * c, c, act=False)

    def forward(self, x):
        s = self.side(x)
        y = self.main(x)
        first = self.merge[0].in_channels - self.side[-1][1].num_features
        y1, y2 = torch.split(y, (first, y.shape[1] - first), 1)
        return self.merge(torch.cat([y1, s], 1)) + y2


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 12, 3)
        self.fc1, self.fc2, self.fc3 = nn.Linear(12 * 4, 30), nn.Linear(30, 20), nn.Linear(20, 10)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv1(x)), 2)
        y = F.max_pool2d(F.relu(self.conv2(y)), 2)
        y = y.view(y.shape[0], -1)
        return F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(y))))))


class ResidualMlp(nn.Module):
    def __init__(self, d=10, hidden=16):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(h)) + h)


class TwoInputsAllOutputs(nn.Module):
    """Returns every hidden activation: with outputs frozen, nothing may be pruned."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.fc = nn.Linear(6, 8), nn.Linear(5, 7), nn.Linear(15, 20)

    def forward(self, a, b):
        a, b = F.relu(self.fa(a)), F.relu(self.fb(b))
        return a, b, F.relu(self.fc(torch.cat([a, b], 1)))


class CatOnHeight(nn.Module):
    """Concatenation and split on a spatial dim: channels still couple across both branches."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c, act=False))
        self.b = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c, act=False))
        self.mix, self.out = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        ya, yb = self.a(x), self.b(x)
        y = self.mix(torch.cat([ya, yb], 2))
        top, _ = torch.split(y, [ya.shape[2], yb.shape[2]], 2)
        return self.out(top)


class LinearIntoTransposedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8 * 2 * 2)
        self.up1 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        x = F.relu(self.fc(x)).view(-1, self.up1.in_channels, 2, 2)
        x = F.relu(self.up2(F.relu(self.up1(x))))
        return self.head(torch.flatten(x, 1))


class OneChannelOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 2, stride=2), nn.BatchNorm2d(12)
        self.c3, self.b3 = nn.Conv2d(12, 1, 3, padding=1), nn.BatchNorm2d(1)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return F.relu(self.b3(self.c3(x)))


class SplitSharedBlock(nn.Module):
    """Three pieces of one tensor; the same block runs on two of them."""

    def __init__(self, c=3):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(c, c), _conv_bn(c, 4 * c, act=False))
        self.shared = _conv_bn(c, c, act=False)
        self.other = _conv_bn(2 * c, c, act=False)

    def forward(self, x):
        x = self.stem(x)
        n1, n2 = self.shared[0].in_channels, self.other[0].in_channels
        p, q, r = torch.split(x, [n1, n1, n2], 1)
        return self.shared(p) + self.shared(q) + self.other(r)


class ScaledUnitNorm(nn.Module):
    """A custom layer: L2-normalise over channels (a sum of squares), scale and shift, project."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.scale, self.shift = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d) * 0.1)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        x = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-6)
        return self.proj(x * self.scale + self.shift)


class CustomLayerNet(nn.Module):
    def __init__(self, unused=False):
        super().__init__()
        self.fc1, self.custom, self.fc2 = nn.Linear(7, 12), ScaledUnitNorm(12), nn.Linear(12, 3)
        if unused:
            self.spare = nn.Parameter(torch.randn(10))

    def forward(self, x):
        return self.fc2(self.custom(F.relu(self.fc1(x))))


#: name -> (builder, example input); ``all_outputs`` returns every hidden dim
PEER_SUITE = {
    "cascaded_concat": (CascadedConcat, lambda: torch.randn(2, 4, 5, 5)),
    "wide_and_deep": (WideAndDeep, lambda: torch.randn(4, 12)),
    "split_sized_by_attributes": (SplitSizedByAttributes, lambda: torch.randn(2, 4, 5, 5)),
    "lenet": (LeNet, lambda: torch.randn(2, 1, 14, 14)),
    "residual_mlp": (ResidualMlp, lambda: torch.randn(4, 10)),
    "all_outputs": (TwoInputsAllOutputs, lambda: (torch.randn(3, 6), torch.randn(3, 5))),
    "cat_on_height": (CatOnHeight, lambda: torch.randn(2, 4, 3, 5)),
    "linear_into_transposed_convs": (LinearIntoTransposedConvs, lambda: torch.randn(2, 16)),
    "one_channel_output": (OneChannelOutput, lambda: torch.randn(2, 3, 8, 8)),
    "split_shared_block": (SplitSharedBlock, lambda: torch.randn(2, 3, 4, 4)),
    "custom_layer": (CustomLayerNet, lambda: torch.randn(4, 7)),
    "custom_layer_unused_param": (lambda: CustomLayerNet(unused=True), lambda: torch.randn(4, 7)),
}
