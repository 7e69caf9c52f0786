"""Real photos with no download, and many deterministic views of them, for image-model calibration and eval.

Natural photos bundled in installed wheels (decoded with Pillow):

* matplotlib's sample data ``grace_hopper.jpg`` (a portrait in uniform; EfficientNet-Lite0's top 3:
  400 academic gown, 667 mortarboard, 652 military uniform);
* scikit-learn's sample images ``china.jpg`` (a temple; 698 palace) and ``flower.jpg`` (985 daisy);
* scikit-image's ``skimage/data`` files, read from the installed wheel without importing scikit-image
  (installed with ``--no-deps``, as the Makefile does: only its data is used): ``chelsea.png`` (a cat; 282
  tiger cat), ``coffee.png`` (967 espresso), ``rocket.jpg`` (a launch; 657 missile), ``astronaut.png``,
  ``motorcycle_left.png`` (665 moped). Its other bundled files are grey, synthetic, microscopy or a
  near-duplicate (``motorcycle_right.png``), left out.

The splits are disjoint by source photo: **calib** = china, flower, astronaut, motorcycle; **eval** =
grace_hopper, chelsea, coffee, rocket. Eight photos are few: the eval figure is agreement over many views
(:func:`photo_views`) of four scenes, so it measures stability under crops and flips, not accuracy over
ImageNet; a figure of 1.000 there is necessary, not sufficient. Many of those views are near ties between
two classes (a cat's breed, a gown or a mortarboard), where a small change of the logits flips top-1.

A missing package leaves its photos out with a log message; :func:`photos` raises when a split ends up
empty.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

ImageLike = Image.Image | torch.Tensor | np.ndarray


def _grace_hopper() -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def _sklearn(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name)).convert("RGB")

    return load


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        spec = importlib.util.find_spec("skimage")  # its folder, without running its __init__ (dependencies)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("scikit-image is not installed (pip install --no-deps scikit-image)")
        return Image.open(Path(spec.submodule_search_locations[0]) / "data" / name).convert("RGB")

    return load


#: Photo name -> (split, loader).
SOURCES: dict[str, tuple[str, Callable[[], Image.Image]]] = {
    "china": ("calib", _sklearn("china.jpg")),
    "flower": ("calib", _sklearn("flower.jpg")),
    "astronaut": ("calib", _skimage("astronaut.png")),
    "motorcycle": ("calib", _skimage("motorcycle_left.png")),
    "grace_hopper": ("eval", _grace_hopper),
    "chelsea": ("eval", _skimage("chelsea.png")),
    "coffee": ("eval", _skimage("coffee.png")),
    "rocket": ("eval", _skimage("rocket.jpg")),
}


def photos(split: Literal["calib", "eval"]) -> list[tuple[str, Image.Image]]:
    """The bundled photos of ``split`` as ``(name, RGB PIL image)``, in a fixed order."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    out = []
    for name, (where, load) in SOURCES.items():
        if where != split:
            continue
        try:
            out.append((name, load()))
        except ImportError as e:
            log.info("photo %s left out: %s", name, e)
    if not out:
        raise RuntimeError(f"no {split} photos: install matplotlib, scikit-learn and scikit-image (--no-deps), "
                           "which bundle them (make test installs them)")
    return out


def _pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.dtype != np.uint8:
        raise TypeError(f"give PIL images or uint8 arrays/tensors, got {array.dtype}")
    return Image.fromarray(array).convert("RGB")


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()


def center_view(image: ImageLike, size: int = 224, resize: int = 256) -> torch.Tensor:
    """The classic eval view: shorter side to ``resize`` (bilinear, Pillow), center crop ``size``;
    float ``[3, size, size]`` in 0..255."""
    img = _pil(image)
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return _tensor(img.crop((left, top, left + size, top + size)))


def _random_view(img: Image.Image, size: int, g: torch.Generator, scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    w, h = img.size
    u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    area = w * h * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    cw = min(w, math.sqrt(area * aspect))
    ch = min(h, math.sqrt(area / aspect))
    left, top = (w - cw) * u[2], (h - ch) * u[3]
    view = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    if torch.rand(1, generator=g).item() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _tensor(view)


#: Crop-area ranges (share of the photo) that :func:`photo_views` cycles through.
SCALES: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.25, 0.5), (0.1, 0.25))


def photo_views(images: Sequence[ImageLike | tuple[str, ImageLike]], n: int, size: int = 224,
                seed: int = 0) -> torch.Tensor:
    """``n`` deterministic views of ``images`` as float ``[n, 3, size, size]`` in 0..255.

    The first views are each image's :func:`center_view`; the others are random-resized crops
    (area shares cycling through :data:`SCALES`, aspect 3/4..4/3) flipped half the time, taking the
    images in turn. The same ``(images, n, size, seed)`` gives the same tensor; a different seed gives
    different crops (the center views stay).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pils = [_pil(im[1] if isinstance(im, tuple) else im) for im in images]
    if not pils:
        raise ValueError("no images to take views of")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = pils[i % len(pils)]
        if i < len(pils):
            out.append(center_view(img, size, resize=round(size * 256 / 224)))
        else:
            out.append(_random_view(img, size, g, SCALES[(i // len(pils)) % len(SCALES)]))
    return torch.stack(out)
