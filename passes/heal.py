"""``heal``: distil the original model (the teacher given to ``optimize``) into the current one.

Used after lossy passes (DyT swap, block removal, pruning, low-bit quantisation). The student is
trained on the calibration data to reproduce the teacher's outputs:

- logits (an output named ``*logits``): KL divergence at ``temperature``;
- other outputs (hidden states, pooled embeddings): a normalised MSE (``mse``, the squared error
  over the teacher's mean square), a cosine distance per position (``cosine``), or both (``auto``);
- optional per-block feature terms (``features > 0``): the normalised MSE of the outputs of the
  model's repeated blocks (the longest ``nn.ModuleList`` present in both models);
- optional block-wise reconstruction first (``blockwise=N``: N steps per block, :mod:`.heal_blocks`):
  each student block fitted to the teacher's block output, one block at a time, with memory for one
  block's activations; ``steps=0`` then skips the end-to-end part;
- optional low-rank adapters (``lora=r``, :mod:`.heal_lora`) trained instead of the weights and merged
  into them at the end (no module is added).

Positions where an ``attention_mask`` in the inputs is 0 do not count. Only parameter values
change (no structure), so no edit is recorded. The student runs in the mode it is in (``optimize``
puts it in eval mode: no dropout); the teacher runs in eval mode and is never modified (its mode is
restored). Runs are deterministic for a given ``seed``. The loss is measured on the first
``eval_batches`` calibration batches before and after training (``loss_before``/``loss_after``);
if it ends higher, the old parameters are put back and a warning says so.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from graphopt.analysis import AnalysisManager
from graphopt.analysis.blocks import first_tensor
from graphopt.analysis.calibration import mask_of
from graphopt.frontend.inputs import as_example_inputs, flatten_outputs
from graphopt.infra.contract import Pass, PassResult
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass

from .heal_blocks import heal_blocks
from .heal_lora import LoRA

log = logging.getLogger(__name__)

_CACHE_BYTES = 1 << 30  # teacher outputs kept in memory across epochs up to this size


def _renumbered(name: str, path: str, removed: list[int]) -> str | None:
    """``name`` after items ``removed`` of the ModuleList ``path`` went (None: it went with them)."""
    if not name.startswith(f"{path}."):
        return name
    index, _, rest = name[len(path) + 1:].partition(".")
    if not index.isdigit():
        return name
    if int(index) in removed:
        return None
    new = int(index) - sum(i < int(index) for i in removed)
    return f"{path}.{new}" + (f".{rest}" if rest else "")


def new_parameter_names(program: Program) -> list[str]:
    """Parameters created or replaced by earlier passes (from the Program's edit log)."""
    touched: list[tuple[str, bool]] = []  # (name, whole module) in the numbering of the edit being read
    for edit in program.edits:
        if edit.op == "replace_module":
            touched.append((edit.target, True))
        elif edit.op == "set_tensor":
            touched.append((edit.target, False))
        elif edit.op == "remove_items":  # later names count blocks without the removed ones
            removed = [int(i) for i in edit.data.get("indices", [])]
            touched = [(new, whole) for name, whole in touched
                       if (new := _renumbered(name, edit.target, removed)) is not None]
    names = [n for n, _ in program.module.named_parameters()]
    out = [n for target, whole in touched for n in names if (n.startswith(f"{target}.") if whole else n == target)]
    return list(dict.fromkeys(out))


def block_names(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Children of the longest ``nn.ModuleList`` of ``student`` that ``teacher`` has with as many children
    (its blocks; after a depth rewrite block ``i`` of one is not block ``i`` of the other, so none)."""
    teacher_modules = dict(teacher.named_modules())
    best: list[str] = []
    for name, mod in student.named_modules():
        twin = teacher_modules.get(name)
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best) and isinstance(twin, nn.ModuleList) \
                and len(twin) == len(mod):
            best = [f"{name}.{i}" if name else str(i) for i in range(len(mod))]
    return best


class _Features:
    """Forward hooks that keep the outputs of named blocks of one model during a call."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = first_tensor(out)
            if t is not None and t.is_floating_point():
                self.values[name] = t
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        values, self.values = self.values, {}
        return values

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _masked_mean(per_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-position loss ``(B, T, ...)`` over positions where ``mask`` (B, T) is set."""
    if mask is not None and per_pos.dim() >= 2 and tuple(per_pos.shape[:2]) == tuple(mask.shape):
        w = mask.to(per_pos.dtype).reshape(*mask.shape, *([1] * (per_pos.dim() - 2))).expand_as(per_pos)
        return (per_pos * w).sum() / w.sum().clamp_min(1.0)
    return per_pos.mean()


def nmse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Squared error over the teacher's mean square (scale-free), padding excluded."""
    s, t = student.float(), teacher.float()
    return _masked_mean((s - t).pow(2), mask) / _masked_mean(t.pow(2), mask).clamp_min(1e-12)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``1 - cos`` over the last dim, averaged over positions, padding excluded."""
    cos = nn.functional.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    return _masked_mean(1.0 - cos, mask)


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
              temperature: float) -> torch.Tensor:
    """``KL(teacher || student)`` of softmax(logits / T), times T², averaged over positions."""
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


@register_pass("heal", tolerance=None)
class Heal(Pass):
    """Distil the original model into the current one on calibration data (after lossy passes)."""

    needs_calibration = True
    needs_original = True

    decisive = ("steps", "lr", "loss")

    steps: Annotated[int, Range(0)] = 200
    lr: Annotated[float, Range(0, lo_open=True)] = 1e-4
    train: str = "all"  # "all" | "new" (parameters earlier passes created/replaced) | glob on names
    freeze: str = ""  # glob on names of parameters never trained (e.g. '*word_embeddings*')
    loss: Literal["auto", "mse", "cosine", "kl"] = "auto"
    features: Annotated[float, Range(0)] = 0.0
    temperature: Annotated[float, Range(0, lo_open=True)] = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: Annotated[int, Range(0)] = 10
    weight_decay: Annotated[float, Range(0)] = 0.0
    clip: Annotated[float, Range(0)] = 1.0  # 0: no clipping
    patience: Annotated[int, Range(0)] = 0
    min_delta: Annotated[float, Range(0)] = 1e-3
    eval_batches: Annotated[int, Range(1)] = 4
    blockwise: Annotated[int, Range(0)] = 0  # steps per block of block-wise reconstruction, before `steps` end-to-end
    block_lr: Annotated[float, Range(0, lo_open=True)] = 1e-3  # its learning rate
    lora: Annotated[int, Range(0)] = 0  # rank of low-rank adapters trained instead of the weights (0: off)
    lora_targets: str = "*"  # glob on the names of the Linear / Conv1D layers that get adapters
    seed: int = 0
    progress: bool | None = None

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        result = PassResult(modified=False)
        teacher, student = program.original, program.module
        self._check(program)
        batches = list(program.calib)
        if not batches:
            raise ValueError("heal: the calibration data is empty")
        params = self._trainable(program)
        adapters = None
        if self.lora:
            if self.blockwise:
                raise ValueError("heal: lora and blockwise cannot be combined yet; use one of them")
            adapters = LoRA(student, self.lora, self.lora_targets, seed=self.seed)
            params = adapters.parameters()
        blocks = block_names(student, teacher) if self.features > 0 else []
        if self.features > 0 and not blocks:
            result.note("", "features>0 but no repeated blocks common to both models: output loss only",
                        "warning")
        teacher_training = teacher.training
        flags = {id(p): p.requires_grad for p in student.parameters()}
        saved = [p.detach().clone() for p in params]
        t_hooks, s_hooks = _Features(teacher, blocks), _Features(student, blocks)
        try:
            teacher.eval()
            for p in student.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            cache: dict[int, Any] = {}
            k = min(self.eval_batches, len(batches))
            held = sorted({round(i * (len(batches) - 1) / max(1, k - 1)) for i in range(k)})
            before = self._evaluate(program, batches, held, cache, t_hooks, s_hooks)
            if self.blockwise:
                self._blockwise(program, batches, params, result)
            steps, last = self._train(program, batches, params, cache, t_hooks, s_hooks) if self.steps else (0, 0.0)
            after = self._evaluate(program, batches, held, cache, t_hooks, s_hooks)
        except BaseException:
            if adapters is not None:
                adapters.remove()
            raise
        finally:
            t_hooks.close()
            s_hooks.close()
            teacher.train(teacher_training)
            for p in student.parameters():
                p.requires_grad_(flags.get(id(p), True))
        if not math.isfinite(after) or after > before:
            with torch.no_grad():
                for p, old in zip(params, saved):
                    p.copy_(old)
            result.note("", f"held-out loss went from {before:.4g} to {after:.4g}; parameters restored "
                            f"(try a lower lr or more calibration data)", "warning")
            after = before
        else:
            result.modified = True
        if adapters is not None:  # (restored adapters are zero: merging them changes nothing)
            adapters.merge()
            result.stats["lora_layers"] = len(adapters.layers)
        result.stats.update(loss_before=before, loss_after=after, steps=steps, train_loss=last,
                            trained_params=sum(p.numel() for p in params))
        return result

    def _blockwise(self, program: Program, batches: list, params: list[nn.Parameter], result: PassResult) -> None:
        report = heal_blocks(program.original, program.module, batches, {id(p) for p in params},
                             lambda s, t, m: nmse(s, t, m) + cosine_distance(s, t, m),
                             steps=self.blockwise, lr=self.block_lr, seed=self.seed, clip=self.clip)
        for i, (before, after) in enumerate(report):
            result.note(f"block {i}", f"block-wise reconstruction loss {before:.4g} -> {after:.4g}")
        result.stats["block_loss_before"] = sum(b for b, _ in report)
        result.stats["block_loss_after"] = sum(a for _, a in report)

    # --- setup --------------------------------------------------------------------------------------
    def _check(self, program: Program) -> None:
        if program.original is None:
            raise ValueError("heal needs the original model as teacher: run it through graphopt.optimize(), "
                             "which keeps the model you pass, or set Program.original")
        if program.original is program.module:
            raise ValueError("heal: the teacher is the model being optimised; optimize(inplace=True) keeps a "
                             "copy when a pass needs the original -- pass that copy as Program.original")
        if program.calib is None:
            raise ValueError("heal needs calibration data: pass calib=<iterable of model inputs> to optimize()")
        if program.device.type == "meta":
            raise ValueError("heal needs real weights, not the meta device")

    def _trainable(self, program: Program) -> list[nn.Parameter]:
        named = dict(program.module.named_parameters())
        if self.train == "all":
            chosen = list(named)
        elif self.train == "new":
            chosen = new_parameter_names(program)
            if not chosen:
                raise ValueError("heal(train=new): no earlier pass created or replaced parameters; "
                                 "use train=all or a glob on parameter names")
        else:
            chosen = [n for n in named if fnmatch.fnmatchcase(n, self.train)]
            if not chosen:
                raise ValueError(f"heal(train={self.train!r}) matches no parameter name "
                                 f"(e.g. {next(iter(named), '?')!r}); use all, new or a glob")
        if self.freeze:
            chosen = [n for n in chosen if not fnmatch.fnmatchcase(n, self.freeze)]
            if not chosen:
                raise ValueError(f"heal: freeze={self.freeze!r} leaves no parameter to train")
        return [named[n] for n in chosen if named[n].is_floating_point()]

    # --- losses ---------------------------------------------------------------------------------------
    def _teacher(self, program: Program, index: int, inputs: Any, cache: dict[int, Any],
                 hooks: _Features) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if index in cache:
            return cache[index]
        with torch.no_grad():
            out = flatten_outputs(inputs.call(program.original))
        value = ({k: v.detach() for k, v in out.items() if v.is_floating_point()},
                 {k: v.detach() for k, v in hooks.take().items()})
        size = sum(t.numel() * t.element_size() for part in value for t in part.values())
        used = sum(t.numel() * t.element_size() for pair in cache.values() for part in pair for t in part.values())
        if used + size <= _CACHE_BYTES:
            cache[index] = value
        return value

    def _loss(self, student_out: Any, teacher_out: dict[str, torch.Tensor], s_feats: dict[str, torch.Tensor],
              t_feats: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        s_flat = flatten_outputs(student_out)
        keys = [k for k, v in teacher_out.items() if k in s_flat and s_flat[k].shape == v.shape]
        if not keys:
            raise ValueError("heal: the student's outputs share no tensor of the same name and shape with "
                             "the teacher's; nothing to distil")
        logits = [k for k in keys if k.rsplit(".", 1)[-1].endswith("logits")]
        mode = self.loss if self.loss != "auto" else ("kl" if logits else "auto")
        terms = []
        for k in (logits if mode == "kl" and logits else keys):
            s, t = s_flat[k], teacher_out[k]
            if mode == "kl":
                terms.append(kl_logits(s, t, mask, self.temperature))
            elif mode == "mse":
                terms.append(nmse(s, t, mask))
            elif mode == "cosine":
                terms.append(cosine_distance(s, t, mask))
            else:
                terms.append(nmse(s, t, mask) + cosine_distance(s, t, mask))
        loss = torch.stack(terms).mean()
        common = [k for k in t_feats if k in s_feats and s_feats[k].shape == t_feats[k].shape]
        if self.features > 0 and common:
            loss = loss + self.features * torch.stack([nmse(s_feats[k], t_feats[k], mask) for k in common]).mean()
        return loss

    def _step_loss(self, program: Program, index: int, raw: Any, cache: dict[int, Any], t_hooks: _Features,
                   s_hooks: _Features) -> torch.Tensor:
        inputs = as_example_inputs(raw).to(program.device)
        t_out, t_feats = self._teacher(program, index, inputs, cache, t_hooks)
        s_out = inputs.call(program.module)
        return self._loss(s_out, t_out, s_hooks.take(), t_feats, mask_of(inputs))

    def _evaluate(self, program: Program, batches: list[Any], held: list[int], cache: dict[int, Any],
                  t_hooks: _Features, s_hooks: _Features) -> float:
        with torch.no_grad():
            losses = [float(self._step_loss(program, i, batches[i], cache, t_hooks, s_hooks)) for i in held]
        return sum(losses) / len(losses)

    # --- training -------------------------------------------------------------------------------------
    def _order(self, n: int, gen: torch.Generator) -> Iterator[int]:
        while True:
            yield from torch.randperm(n, generator=gen).tolist()

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def _train(self, program: Program, batches: list[Any], params: list[nn.Parameter], cache: dict[int, Any],
               t_hooks: _Features, s_hooks: _Features) -> tuple[int, float]:
        gen = torch.Generator().manual_seed(self.seed)
        order = self._order(len(batches), gen)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        ema, best, since, step = math.nan, math.inf, 0, 0
        bar = tqdm(range(self.steps), desc="heal", unit="step", leave=False,
                   disable=None if self.progress is None else not self.progress)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for step in bar:
                for group in opt.param_groups:
                    group["lr"] = self.lr * self._lr_factor(step)
                i = next(order)
                loss = self._step_loss(program, i, batches[i], cache, t_hooks, s_hooks)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"heal: loss became {float(loss)} at step {step}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.clip)
                opt.step()
                value = float(loss.detach())
                ema = value if math.isnan(ema) else 0.9 * ema + 0.1 * value
                bar.set_postfix(loss=f"{ema:.4g}")
                if self.patience > 0 and step >= self.warmup:
                    if ema < best * (1.0 - self.min_delta):
                        best, since = ema, 0
                    else:
                        since += 1
                        if since >= self.patience:
                            log.info("heal: early stop at step %d (loss %.4g)", step + 1, ema)
                            break
        bar.close()
        return (step + 1 if self.steps else 0), ema
