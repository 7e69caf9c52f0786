"""Exact composition of two linear layers with nothing between them (conv∘conv, linear∘linear).

Two convolutions in a row are one convolution ("Make Deep Networks Shallow Again", LayerMerge):
kernel ``k1 + (k2 - 1)·s1``, stride ``s1·s2``, padding ``p1 + p2·s1``, weight the convolution of the
two kernels, bias ``b2 + Σ W2 b1``. That is exact only where the second conv's zero padding is also
zero in the first conv's output: when the second conv has no padding, or the first is a pointwise
(1×1, stride 1, no padding) conv without bias. Groups: equal group counts merge group by group;
otherwise the result is dense. A residual ``x + f(x)`` around a single conv that keeps the shape is
that conv with 1 added at the centre of its kernel (per channel).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def why_not_mergeable(a: nn.Module, b: nn.Module, *, exact: bool = True) -> str | None:
    """Why ``b(a(x))`` cannot become one layer exactly (``exact=False``: but for the image border), or None."""
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        return None
    if not (isinstance(a, CONVS) and isinstance(b, CONVS) and type(a) is type(b)):
        return f"{type(a).__name__} then {type(b).__name__}: only Conv→Conv of one kind and Linear→Linear merge"
    for m in (a, b):
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or any(d != 1 for d in m.dilation):
            return f"a {type(m).__name__} with padding {m.padding!r} ({m.padding_mode}) / dilation {m.dilation}"
    pointwise = all(k == 1 for k in a.kernel_size) and all(s == 1 for s in a.stride) and not any(a.padding)
    if exact and any(b.padding) and not (pointwise and a.bias is None):
        return ("the second conv pads the first one's output with zeros, which the first conv does not "
                "produce at the border (exact only after a 1x1 conv without bias)")
    return None


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight ``[out, in/g, *k]`` as the dense ``[out, in, *k]`` one."""
    if groups == 1:
        return weight
    out, per_in = weight.shape[:2]
    dense = weight.new_zeros(out, per_in * groups, *weight.shape[2:])
    per_out = out // groups
    for g in range(groups):
        dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = weight[g * per_out:(g + 1) * per_out]
    return dense


def _compose_kernels(wa: torch.Tensor, wb: torch.Tensor, stride_a: tuple[int, ...]) -> torch.Tensor:
    """``W[o, i] = Σ_m W_b[o, m] ⊛ W_a[m, i]`` (strided by the first conv) for dense weights."""
    dims = wa.dim() - 2
    pad = [(kb - 1) * s for kb, s in zip(wb.shape[2:], stride_a)]
    x = wa.transpose(0, 1)  # [in, mid, *k1]: each input channel an "image"
    flipped = wb.flip(list(range(2, wb.dim())))
    y = _CONV_FN[dims](x, flipped, padding=pad, dilation=stride_a)
    return y.transpose(0, 1).contiguous()


def merge_pair(a: nn.Module, b: nn.Module) -> nn.Module:
    """One layer computing ``b(a(x))`` (call :func:`why_not_mergeable` first); float64 arithmetic."""
    wa, wb = a.weight.detach().double(), b.weight.detach().double()
    ba = a.bias.detach().double() if a.bias is not None else None
    bb = b.bias.detach().double() if b.bias is not None else None
    if isinstance(a, nn.Linear):
        weight = wb @ wa
        bias = (wb @ ba if ba is not None else 0) + (bb if bb is not None else 0)
        merged = nn.Linear(a.in_features, b.out_features, bias=ba is not None or bb is not None)
    else:
        same_groups = a.groups == b.groups
        groups = a.groups if same_groups else 1
        if same_groups:
            oa, ob = a.out_channels // groups, b.out_channels // groups
            weight = torch.cat([_compose_kernels(wa[g * oa:(g + 1) * oa], wb[g * ob:(g + 1) * ob], a.stride)
                                for g in range(groups)])
        else:
            weight = _compose_kernels(_dense(wa, a.groups), _dense(wb, b.groups), a.stride)
        kernel = tuple(weight.shape[2:])
        stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride))
        padding = tuple(pa + pb * sa for pa, pb, sa in zip(a.padding, b.padding, a.stride))
        bias = _conv_bias(wb, ba, bb, b.groups)
        merged = type(a)(a.in_channels, b.out_channels, kernel, stride=stride, padding=padding, groups=groups,
                         bias=ba is not None or bb is not None)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if merged.bias is not None:
            merged.bias.copy_(bias if isinstance(bias, torch.Tensor) else torch.zeros(merged.bias.shape))
    return merged.to(device=a.weight.device, dtype=a.weight.dtype)


def _conv_bias(wb: torch.Tensor, ba: torch.Tensor | None, bb: torch.Tensor | None, groups_b: int
               ) -> torch.Tensor | int:
    """``b_b + Σ_{m, taps} W_b[o, m] b_a[m]`` (the first conv's bias seen through the second)."""
    out = bb if bb is not None else 0
    if ba is None:
        return out
    taps = wb.sum(dim=tuple(range(2, wb.dim())))  # [out, mid/g]
    per_out, per_in = wb.shape[0] // groups_b, wb.shape[1]
    through = torch.cat([taps[g * per_out:(g + 1) * per_out] @ ba[g * per_in:(g + 1) * per_in]
                         for g in range(groups_b)])
    return through + out


def why_no_identity(layer: nn.Module, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> str | None:
    """Why ``x + layer(x)`` cannot be one layer, or None."""
    if shape_in != shape_out:
        return f"the residual adds {list(shape_in)} to {list(shape_out)}"
    if isinstance(layer, nn.Linear):
        return None if layer.in_features == layer.out_features else "in and out features differ"
    if any(s != 1 for s in layer.stride) or any(k % 2 == 0 for k in layer.kernel_size):
        return "the conv is strided or has an even kernel, so the identity has no centre tap"
    if list(layer.padding) != [(k - 1) // 2 for k in layer.kernel_size]:
        return "the conv's padding does not keep the input aligned with its output"
    return None


def add_identity(layer: nn.Module) -> None:
    """Make ``layer(x)`` compute ``x + layer(x)`` (see :func:`why_no_identity`)."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            layer.weight += torch.eye(layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
            return
        per_in = layer.in_channels // layer.groups
        centre = tuple((k - 1) // 2 for k in layer.kernel_size)
        for c in range(layer.out_channels):
            layer.weight[(c, c % per_in, *centre)] += 1.0


def macs(layer: nn.Module, shape_in: tuple[int, ...]) -> int:
    """Multiply-adds of one call of ``layer`` on an input of ``shape_in`` (output positions x weight size)."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        rows = 1
        for s in shape_in[:-1]:
            rows *= s
        return rows * weight.numel()
    positions = shape_in[0]
    for size, k, s, p in zip(shape_in[2:], layer.kernel_size, layer.stride, layer.padding):
        positions *= (size + 2 * p - k) // s + 1
    return positions * weight.numel()


def merged_chain(layers: list[nn.Module], *, exact: bool = True) -> tuple[nn.Module | None, str | None]:
    """The one layer computing ``layers`` in order (``exact=False``: padding moved to the first layer,
    so only the border differs), or the reason there is none."""
    merged = layers[0]
    for nxt in layers[1:]:
        why = why_not_mergeable(merged, nxt, exact=exact)
        if why:
            return None, why
        merged = merge_pair(merged, nxt)
    return merged, None
