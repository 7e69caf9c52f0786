"""Fused Dynamic Tanh ``y = γ ⊙ tanh(α·x) + β`` over the last dim: Triton kernels + ``graphopt::dyt``.

- :func:`dyt_reference`: plain torch (the CPU path and the test oracle).
- :func:`dyt_triton_forward` / :func:`dyt_triton_backward`: Triton kernels over a ``(rows, C)``
  view, one 2-D tile per program. The backward writes ``dx`` and per-tile column partial sums for
  ``dγ``, ``dβ``, ``dα``, reduced afterwards in torch (no atomics: deterministic). Triton is imported
  only when a kernel is first used.
- ``torch.ops.graphopt.dyt`` (:func:`dyt`): a ``torch.library`` custom op -- CPU/default impl is
  torch (via the exact identity ``tanh(z) = 2σ(2z) − 1``: faster on CPU), CUDA impl is Triton, a fake impl for export/compile, autograd through
  ``graphopt::dyt_backward``.
- :data:`ONNX_TRANSLATIONS`: the op as ONNX ``Mul/Tanh/Mul/Add`` for ``torch.onnx.export(dynamo=True,
  custom_translation_table=...)``.

``alpha`` has shape ``(1,)`` (one scalar per layer, as in the DyT paper) or ``(C,)``; ``bias`` may be
``None`` (RMSNorm-style). Math is in float32 (float64 for float64 inputs); the output has ``x``'s dtype.
"""

import functools
from typing import Any

import torch
from torch import Tensor

_BLOCK_M = 16


def dyt_reference(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``weight * tanh(alpha * x) + bias`` in float32 (or wider), returned in ``x.dtype``."""
    ct = _compute_dtype(x)
    y = weight.to(ct) * torch.tanh(alpha.to(ct) * x.to(ct))
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def dyt_backward_reference(grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor,
                           has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dalpha, dweight, dbias)`` of :func:`dyt_reference` (``dbias`` zeros without bias)."""
    c = x.shape[-1]
    ct = _compute_dtype(x)
    g, xf, a, w = grad.to(ct).reshape(-1, c), x.to(ct).reshape(-1, c), alpha.to(ct), weight.to(ct)
    t = torch.tanh(a * xf)
    dpre = g * w * (1.0 - t * t)  # d loss / d(alpha*x)
    dx = (dpre * a).reshape(x.shape).to(x.dtype)
    da_cols = (dpre * xf).sum(0)
    dalpha = (da_cols if alpha.numel() > 1 else da_cols.sum().reshape(alpha.shape)).to(alpha.dtype)
    dweight = (g * t).sum(0).to(weight.dtype)
    dbias = g.sum(0).to(weight.dtype) if has_bias else torch.zeros_like(weight)
    return dx, dalpha, dweight, dbias


# --- Triton ----------------------------------------------------------------------------------------

@functools.cache
def _triton_kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(X, A, W, B, Y, M, C, stride_x, stride_y, HAS_BIAS: tl.constexpr,
            ALPHA_PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows[:, None] < M) & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ALPHA_PER_CHANNEL:
            a = tl.load(A + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            a = tl.load(A).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        z = a * x  # tanh(z) from exp of a non-positive argument: no overflow, exact sign
        e = tl.exp(-2.0 * tl.abs(z))
        t = tl.where(z < 0, (e - 1.0) / (1.0 + e), (1.0 - e) / (1.0 + e))
        y = t * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd(G, X, A, W, DX, DW, DB, DA, M, C, stride_g, stride_x, stride_dx, HAS_BIAS: tl.constexpr,
            ALPHA_PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_m = tl.program_id(0)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows[:, None] < M) & cmask[None, :]
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ALPHA_PER_CHANNEL:
            a = tl.load(A + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            a = tl.load(A).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        z = a * x
        e = tl.exp(-2.0 * tl.abs(z))
        t = tl.where(z < 0, (e - 1.0) / (1.0 + e), (1.0 - e) / (1.0 + e))
        dpre = g * w[None, :] * (1.0 - t * t)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], (dpre * a).to(DX.dtype.element_ty), mask=mask)
        # per-tile column partial sums (masked entries are zero): row pid_m of (tiles, C) buffers
        tl.store(DW + pid_m * C + cols, tl.sum(g * t, axis=0), mask=cmask)
        tl.store(DA + pid_m * C + cols, tl.sum(dpre * x, axis=0), mask=cmask)
        if HAS_BIAS:
            tl.store(DB + pid_m * C + cols, tl.sum(g, axis=0), mask=cmask)

    return fwd, bwd


def _block_c(c: int) -> int:
    return min(1 << max(c - 1, 1).bit_length(), 256)


def _rows(t: Tensor) -> Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def dyt_triton_forward(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Triton forward (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    import triton

    fwd, _ = _triton_kernels()
    c = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty((x2.shape[0], c), dtype=x.dtype, device=x.device)
    block_c = _block_c(c)
    grid = (triton.cdiv(x2.shape[0], _BLOCK_M), triton.cdiv(c, block_c))
    fwd[grid](x2, alpha.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else weight, y,
              x2.shape[0], c, x2.stride(0), y.stride(0), HAS_BIAS=bias is not None,
              ALPHA_PER_CHANNEL=alpha.numel() > 1, BLOCK_M=_BLOCK_M, BLOCK_C=block_c)
    return y.reshape(x.shape)


def dyt_triton_backward(grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor,
                        has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton backward: ``(dx, dalpha, dweight, dbias)`` as :func:`dyt_backward_reference`."""
    import triton

    _, bwd = _triton_kernels()
    c = x.shape[-1]
    x2, g2 = _rows(x), _rows(grad)
    m = x2.shape[0]
    dx = torch.empty((m, c), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, _BLOCK_M)
    partial = torch.zeros((3, tiles, c), dtype=torch.float32, device=x.device)
    block_c = _block_c(c)
    bwd[(tiles, triton.cdiv(c, block_c))](
        g2, x2, alpha.contiguous(), weight.contiguous(), dx, partial[0], partial[1], partial[2], m, c,
        g2.stride(0), x2.stride(0), dx.stride(0), HAS_BIAS=has_bias, ALPHA_PER_CHANNEL=alpha.numel() > 1,
        BLOCK_M=_BLOCK_M, BLOCK_C=block_c)
    dw, db, da_cols = partial.sum(1)
    dalpha = da_cols if alpha.numel() > 1 else da_cols.sum().reshape(alpha.shape)
    return (dx.reshape(x.shape), dalpha.to(alpha.dtype), dw.to(weight.dtype),
            db.to(weight.dtype) if has_bias else torch.zeros_like(weight))


# --- torch.library ops -------------------------------------------------------------------------------

def _dyt_cpu(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The CPU path: ``2γ·σ(2αx) + (β − γ)`` (exactly DyT; torch's CPU sigmoid is much faster than tanh),
    in place on one float32 buffer."""
    ct = _compute_dtype(x)
    w = weight.to(ct)
    shift = bias.to(ct) - w if bias is not None else -w
    return torch.mul(x.to(ct), 2.0 * alpha.to(ct)).sigmoid_().mul_(2.0 * w).add_(shift).to(x.dtype)


@torch.library.custom_op("graphopt::dyt", mutates_args=())
def _dyt_op(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _dyt_cpu(x, alpha, weight, bias)


@_dyt_op.register_kernel("cuda")
def _dyt_cuda(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return dyt_triton_forward(x, alpha, weight, bias)


@_dyt_op.register_fake
def _dyt_fake(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(weight.shape[0] == x.shape[-1], lambda: "dyt: weight must have x.shape[-1] entries")
    return torch.empty_like(x)


@torch.library.custom_op("graphopt::dyt_backward", mutates_args=())
def _dyt_backward_op(grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor,
                     has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dyt_backward_reference(grad, x, alpha, weight, has_bias)


@_dyt_backward_op.register_kernel("cuda")
def _dyt_backward_cuda(grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor,
                       has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dyt_triton_backward(grad, x, alpha, weight, has_bias)


@_dyt_backward_op.register_fake
def _dyt_backward_fake(grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor,
                       has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(alpha), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, alpha, weight, bias = inputs
    ctx.save_for_backward(x, alpha, weight)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, alpha, weight = ctx.saved_tensors
    dx, dalpha, dweight, dbias = torch.ops.graphopt.dyt_backward(grad.contiguous(), x, alpha, weight, ctx.has_bias)
    return dx, dalpha, dweight, (dbias if ctx.has_bias else None)


_dyt_op.register_autograd(_backward, setup_context=_setup_context)


def dyt(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Fused ``weight * tanh(alpha * x) + bias`` over the last dim (``torch.ops.graphopt.dyt``)."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"dyt: weight of shape {tuple(weight.shape)} does not match the last dim of x "
                         f"{tuple(x.shape)}; move the channel dim last first")
    if alpha.numel() not in (1, weight.shape[0]):
        raise ValueError(f"dyt: alpha must have 1 or {weight.shape[0]} entries, got {alpha.numel()}")
    return torch.ops.graphopt.dyt(x, alpha.reshape(-1), weight, bias)


# --- ONNX --------------------------------------------------------------------------------------------

def _dyt_onnx(x, alpha, weight, bias=None):  # noqa: ANN001 - onnxscript values
    """``graphopt::dyt`` as ONNX: ``Add(Mul(Tanh(Mul(x, α)), γ), β)`` (parameters cast like ``x``)."""
    from onnxscript import opset18 as op

    y = op.Mul(op.Tanh(op.Mul(x, op.CastLike(alpha, x))), op.CastLike(weight, x))
    if bias is not None:
        y = op.Add(y, op.CastLike(bias, x))
    return y


#: custom op -> ONNX translation, for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``
ONNX_TRANSLATIONS = {torch.ops.graphopt.dyt.default: _dyt_onnx}
