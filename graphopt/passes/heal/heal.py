"""``heal``: distil the original model (the teacher given to ``optimize``) into the current one.

Used after lossy passes (DyT swap, block removal, pruning, low-bit quantisation). The student is
trained on the calibration data to reproduce the teacher's outputs:

- logits (an output named ``*logits``): KL divergence at ``temperature``;
- other outputs (hidden states, pooled embeddings): a normalised MSE (``mse``, the squared error
  over the teacher's mean square), a cosine distance per position (``cosine``), or both (``auto``);
- optional per-block feature terms (``features > 0``): the normalised MSE of the outputs of the
  model's repeated blocks (the teacher's, :func:`graphopt.analysis.blocks.find_blocks`, matched one to one
  in the student);
- optional block-wise reconstruction first (``blockwise=N``: N steps per block, :mod:`.blockwise`):
  each student block fitted to the teacher's block output, one block at a time, with memory for one
  block's activations; ``steps=0`` then skips the end-to-end part;
- ``new_lr_scale``: a learning-rate multiplier for the parameters earlier passes created or replaced
  (from the edit log) over the others trained (the DyT recipe trains the new elementwise layers at
  10x; with ``train=new`` there are no others, and ``lr`` is theirs);
- optional low-rank adapters (``lora=r``, :mod:`.lora`) trained instead of the weights and merged
  into them at the end (no module is added).

Options left unset (``None``: ``steps``, ``lr``, ``loss``, ``freeze``, ``blockwise``, ``features``,
``new_lr_scale``) come from the recipe for the change earlier passes made (:mod:`.recipes`;
``recipe=`` picks one by name), among the language-model recipes where the model's outputs hold a
distribution at every position. An option given explicitly always wins, and ``steps`` and ``blockwise``
are one schedule: give either and the other is 0 (``heal(steps=10)`` after ``prune`` runs 10 steps, not
the recipe's block-wise stage too). On a model no earlier pass changed, heal does nothing and says so.
A share ``holdout`` of the calibration batches (at most ``eval_batches``) is never trained on: it
gives ``loss_before``/``loss_after``, decides early stopping, and the parameters with the lowest
held-out loss are the ones kept (:mod:`.run`); if no point beat the start, the old parameters
stay and a warning says so.

Positions where an ``attention_mask`` in the inputs is 0 do not count. Only parameter values
change (no structure), so no edit is recorded. The student runs in the mode it is in (``optimize``
puts it in eval mode: no dropout); the teacher runs in eval mode and is never modified (its mode is
restored). Runs are deterministic for a given ``seed``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from typing import Annotated, Any, Literal

import torch
from torch import nn

from graphopt.analysis import AnalysisManager
from graphopt.frontend.inputs import flatten_outputs
from graphopt.infra.contract import Diagnostic, Pass, PassResult
from graphopt.infra.options import Range
from graphopt.infra.program import Program
from graphopt.infra.registry import register_pass

from .blockwise import heal_blocks
from .lora import LoRA
from .losses import Features, cosine_distance, kl_logits, nmse
from .recipes import FILLED, LM_RECIPES, RECIPES, change_kind, is_language_model
from .run import HealRun

log = logging.getLogger(__name__)

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


def _eval_outputs(program: Program) -> dict[str, torch.Tensor]:
    """The model's outputs on the example inputs, run in eval mode (no running statistic moves)."""
    training = program.module.training
    program.module.eval()
    try:
        return flatten_outputs(program.run())  # (Program.run runs without autograd)
    finally:
        program.module.train(training)


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """The two modules hold the same tensor names with equal values (so there is nothing to distil)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@register_pass("heal", tolerance=None, stage=80, repairs=True)
class Heal(Pass):
    """Distil the original model into the current one on calibration data; options left none: its recipe.

    The recipe is the one for the change earlier passes made (docs/healing.md).
    """

    needs_calibration = True
    needs_original = True

    decisive = ("recipe",)

    recipe: Literal["auto", "dyt", "prune", "depth", "factorize", "quantize", "other"] = "auto"  # what unset options default to
    steps: Annotated[int, Range(0)] | None = None  # end-to-end steps (None: the recipe's)
    lr: Annotated[float, Range(0, lo_open=True)] | None = None  # AdamW learning rate (None: the recipe's)
    new_lr_scale: Annotated[float, Range(0, lo_open=True)] | None = None  # lr multiplier of the parameters earlier passes created
    train: str = "all"  # "all" | "new" (parameters earlier passes created/replaced) | glob on names
    freeze: str | None = None  # glob on names of parameters never trained (None: the recipe's)
    loss: Literal["auto", "mse", "cosine", "kl"] | None = None  # distillation loss (auto: KL on logits, else mse + cosine)
    outputs: str = "*"  # glob on the names of the outputs distilled (e.g. last_hidden_state); logits win under auto
    features: Annotated[float, Range(0)] | None = None  # weight of the per-block feature terms (None: the recipe's)
    temperature: Annotated[float, Range(0, lo_open=True)] = 1.0  # softmax temperature of the KL loss
    schedule: Literal["cosine", "constant"] = "cosine"  # learning-rate schedule after warmup
    warmup: Annotated[int, Range(0)] = 10  # steps of linear learning-rate warmup
    weight_decay: Annotated[float, Range(0)] = 0.0  # AdamW weight decay
    clip: Annotated[float, Range(0)] = 1.0  # gradient-norm clipping (0: none)
    holdout: Annotated[float, Range(0, 0.5)] = 0.1  # share of calibration batches never trained on
    eval_batches: Annotated[int, Range(1)] = 8  # the most batches held out
    eval_every: Annotated[int, Range(1)] | None = None  # steps between held-out checks (None: steps/10, >= 10)
    patience: Annotated[int, Range(0)] = 3  # held-out checks without improvement before stopping (0: never)
    min_delta: Annotated[float, Range(0)] = 1e-3  # relative improvement that counts
    blockwise: Annotated[int, Range(0)] | None = None  # steps per block of block-wise reconstruction, first
    block_lr: Annotated[float, Range(0, lo_open=True)] = 1e-3  # learning rate of the block-wise stage
    lora: Annotated[int, Range(0)] = 0  # rank of low-rank adapters trained instead of the weights (0: off)
    lora_targets: str = "*"  # glob on the names of the Linear / Conv1D layers that get adapters
    seed: int = 0  # seed of the batch order and adapter init (runs are deterministic)
    progress: bool | None = None  # show a progress bar (None: on a terminal); log lines are always written

    def resolved(self, program: Program) -> tuple[Heal, str]:
        """This pass with the options left unset filled from the recipe for the change ``program`` went through,
        and a note when the recipe had to be adapted to the model ("" otherwise)."""
        kind = change_kind(program) if self.recipe == "auto" else self.recipe
        language_model = is_language_model(_eval_outputs(program))
        recipe = (LM_RECIPES if language_model else RECIPES)[kind]
        unset = {name: getattr(recipe, name) for name in FILLED if getattr(self, name) is None}
        if ("steps" in unset) != ("blockwise" in unset):  # the schedule is the recipe's whole, or the user's
            unset["steps" if "steps" in unset else "blockwise"] = 0
        if self.lora:  # adapters: end-to-end only, with larger steps
            unset.update({k: v for k, v in (("lr", recipe.lora_lr), ("blockwise", 0),
                                            ("steps", max(recipe.steps, 200))) if k in unset})
        note = "the recipes for language models (KL on next-token distributions)" if language_model else ""
        if unset.get("blockwise"):  # the recipe's block-wise stage needs blocks that match one to one
            names, why = program.analyses.get("matching_blocks")
            if not names:
                note = "; ".join(filter(None, (note, f"no block-wise stage ({why}); end-to-end only")))
                unset.update(blockwise=0, steps=max(recipe.steps, 200) if "steps" in unset else self.steps)
        return dataclasses.replace(self, recipe=kind, **unset), note

    def run(self, program: Program, am: AnalysisManager) -> PassResult:
        self._check(program)
        if self.recipe == "auto" or any(getattr(self, name) is None for name in FILLED):
            me, note = self.resolved(program)
            result = me.run(program, am)
            chosen = ", ".join(f"{k}={getattr(me, k)!r}" for k in FILLED if getattr(self, k) is None)
            result.diagnostics.insert(0, Diagnostic("", f"recipe for {me.recipe}: {chosen or 'all options given'}",
                                                    "info"))
            if note:
                result.diagnostics.insert(1, Diagnostic("", note, "info"))
            return result
        result = PassResult(modified=False)
        teacher, student = program.original, program.module
        batches = program.calib_batches()
        if not batches:
            raise ValueError("heal: the calibration data is empty")
        held, train = self._split(len(batches), result)
        params = self._trainable(program, result)  # (raises on a train= that selects nothing)
        adapters, fast = None, set()
        if self.new_lr_scale != 1.0 and not self.lora:  # (relative to the others: none when only new ones train)
            named = dict(student.named_parameters())
            fast = {id(named[n]) for n in new_parameter_names(program)}
            fast = fast if any(id(p) not in fast for p in params) else set()
        if self.lora:
            if self.blockwise:
                raise ValueError("heal: lora and blockwise cannot be combined yet; use one of them")
            adapters = LoRA(student, self.lora, self.lora_targets, seed=self.seed)  # (raises on no targets)
            params = adapters.parameters()
        if not program.edits and _same_tensors(teacher, student):  # after every option was checked
            if adapters is not None:
                adapters.remove()
            result.note("", "the model is still the original (no earlier pass changed it): nothing to heal")
            return result
        blocks, why = am.get("matching_blocks") if self.features > 0 else ([], "")
        if self.features > 0 and not blocks:
            result.note("", f"features>0 but no per-block feature terms ({why}): output loss only", "warning")
        teacher_training = teacher.training
        flags = {id(p): p.requires_grad for p in student.parameters()}
        run = HealRun(self, program, batches, held, params, Features(teacher, blocks), Features(student, blocks),
                      fast=fast)
        try:
            teacher.eval()
            for p in student.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            before = run.check()
            if self.blockwise:
                self._blockwise(program, [batches[i] for i in train], params, result)
                run.check()
            steps, last = run.train(train) if self.steps else (0, 0.0)
            after = run.restore_best()
        except BaseException:
            if adapters is not None:
                adapters.remove()
            raise
        finally:
            run.close()
            teacher.train(teacher_training)
            for p in student.parameters():
                p.requires_grad_(flags.get(id(p), True))
            for p in params:  # the last step's gradients would stay with the model
                p.grad = None
        if after < before:
            result.modified = True
        else:
            result.note("", f"held-out loss did not improve from {before:.4g}; parameters restored "
                            f"(try a lower lr, more steps or more calibration data)", "warning")
        if adapters is not None:  # (restored adapters are zero: merging them changes nothing)
            adapters.merge()
            result.stats["lora_layers"] = len(adapters.layers)
        result.stats.update(loss_before=before, loss_after=after, steps=steps, train_loss=last,
                            best_step=run.best_step, held_out_batches=len(held),
                            trained_params=sum(p.numel() for p in params))
        return result

    def _split(self, n: int, result: PassResult) -> tuple[list[int], list[int]]:
        """Held-out batch indices (evenly spread) and the ones trained on."""
        k = min(self.eval_batches, max(1, round(self.holdout * n))) if self.holdout > 0 else 0
        if k == 0 or n < 2:
            result.note("", "no calibration batch held out (holdout=0 or a single batch): early stopping and "
                            "the before/after loss use batches that are also trained on", "warning")
            return list(range(min(n, self.eval_batches))), list(range(n))
        held = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)} if k > 1 else {n // 2})
        return held, [i for i in range(n) if i not in set(held)]

    def _blockwise(self, program: Program, batches: list, params: list[nn.Parameter], result: PassResult) -> None:
        names, why = program.analyses.get("matching_blocks")
        if not names:
            raise ValueError(f"heal(blockwise={self.blockwise}): {why}")
        report = heal_blocks(program.original, program.module, names, batches, {id(p) for p in params},
                             lambda s, t, m: nmse(s, t, m) + cosine_distance(s, t, m),
                             steps=self.blockwise, lr=self.block_lr, seed=self.seed, clip=self.clip)
        for i, (before, after) in enumerate(report):
            result.note(f"block {i}", f"block-wise reconstruction loss {before:.4g} -> {after:.4g}")
        result.stats["block_loss_before"] = sum(b for b, _ in report)
        result.stats["block_loss_after"] = sum(a for _, a in report)
        result.stats["block_losses"] = [[float(f"{b:.4g}"), float(f"{a:.4g}")] for b, a in report]

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

    def _trainable(self, program: Program, result: PassResult) -> list[nn.Parameter]:
        """The parameters ``train`` / ``freeze`` select, less those the model marks ``requires_grad=False``
        (what its owner froze stays frozen; the result says how many)."""
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
        frozen = [n for n in chosen if not named[n].requires_grad]
        if frozen:
            chosen = [n for n in chosen if named[n].requires_grad]
            if not chosen:
                raise ValueError("heal: every parameter it would train has requires_grad=False in the model; "
                                 "set requires_grad=True on those heal may change")
            result.note("", f"{len(frozen)} parameter tensor(s) with requires_grad=False stay as they are "
                            f"(e.g. {frozen[0]}); set requires_grad=True on those heal may train", "info")
        return [named[n] for n in chosen if named[n].is_floating_point()]

    # --- losses ---------------------------------------------------------------------------------------
    def loss_of(self, student_out: Any, teacher_out: dict[str, torch.Tensor], s_feats: dict[str, torch.Tensor],
                t_feats: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """The distillation loss of one batch."""
        s_flat = flatten_outputs(student_out)
        keys = [k for k, v in teacher_out.items() if k in s_flat and s_flat[k].shape == v.shape]
        if not keys:
            raise ValueError("heal: the student's outputs share no tensor of the same name and shape with "
                             "the teacher's; nothing to distil")
        chosen = [k for k in keys if fnmatch.fnmatchcase(k, self.outputs)
                  or fnmatch.fnmatchcase(k.rsplit(".", 1)[-1], self.outputs)]
        if not chosen:
            raise ValueError(f"heal(outputs={self.outputs!r}) matches none of the outputs {', '.join(keys)}")
        keys = chosen
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

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` over ``lr``: linear warmup, then cosine decay or constant."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
