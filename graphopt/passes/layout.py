"""channels_last: store convolution weights channels-last, so CPU convolutions run without layout reorders.

PyTorch runs 2-D and 3-D convolutions on CPU with oneDNN, which computes channels-last: given NCHW weights and
activations it reorders both on every call. A convolution whose weight is channels-last returns a
channels-last output, the element-wise layers, pads and pools after it keep that layout, and the next
convolution reads it as it is, so storing the weights once in that layout makes a network run channels-last
from its first convolution on. What it computes does not change (values, shapes and dtypes are the same;
only strides differ, and oneDNN sums in another order: rounding). EfficientNet-Lite0 in eager torch on 2
cores: 1.2-1.5x faster at batch 1, 2.2-2.5x at batch 32 (benchmarks/README.md, ``vision.py``).

Only layers that run the stock ``forward`` are converted: a subclass with a forward of its own may ``view``
its weight, which a channels-last tensor refuses; parametrized weights are computed on each call. Each such
layer is skipped with the reason, as is a layer whose weight another, skipped, layer shares. The layout is a
``set_layout`` edit (the Parameter object stays: hooks and ties keep it), which ``load`` restores after
reading the weights. The model's outputs can be channels-last-strided tensors too (a CNN's feature maps): the
same values, but ``.view`` on them needs ``.contiguous()`` first.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from graphopt.analysis import AnalysisManager
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass

#: convolutions with a channels-last layout, and the memory format of their weights
_LAYOUT = {nn.Conv2d: "channels_last", nn.ConvTranspose2d: "channels_last", nn.Conv3d: "channels_last_3d",
           nn.ConvTranspose3d: "channels_last_3d"}


def _stock_kind(module: nn.Module) -> type[nn.Module] | None:
    """The torch convolution class whose forward ``module`` runs unchanged, or None."""
    for base in _LAYOUT:
        if isinstance(module, base):
            own = type(module)
            same = own.forward is base.forward and getattr(own, "_conv_forward", None) is getattr(base, "_conv_forward",
                                                                                                   None)
            return base if same else None
    return None


@register_pass("channels_last")
class ChannelsLast(Pass):
    """Store 2-D and 3-D convolution weights channels-last (exact): CPU convolutions then skip their reorders."""

    choices = ({},)
    stage = 95  # after quantize: a later pass that rewrites a weight would write it contiguous again

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        convs: list[tuple[str, nn.Module, str]] = []
        kept: dict[int, str] = {}  # weights of convolutions left as they are -> the layer's name
        for name, module in program.module.named_modules():
            if not isinstance(module, tuple(_LAYOUT)):
                continue
            base = _stock_kind(module)
            if base is None:
                why = f"{type(module).__name__} overrides the convolution's forward (it may view its weight)"
            elif parametrize.is_parametrized(module, "weight"):
                why = "its weight is parametrized (computed on each call)"
            elif not module.weight.is_floating_point():
                why = f"its weight is {module.weight.dtype}"
            else:
                convs.append((name, module, _LAYOUT[base]))
                continue
            result.skip(name, why)
            kept[id(getattr(module, "weight", None))] = name
        converted = 0
        for name, module, layout in convs:
            if id(module.weight) in kept:
                result.skip(name, f"its weight is shared with {kept[id(module.weight)]!r}, which is left as it is")
                continue
            program.set_layout(f"{name}.weight" if name else "weight", layout)
            converted += 1
        if not convs and not result.diagnostics:
            result.note("", "no 2-D or 3-D convolutions in the model: nothing to convert")
        result.modified = converted > 0
        result.stats["converted"] = converted
        return result
