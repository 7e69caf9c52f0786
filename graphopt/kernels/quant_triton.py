"""Triton kernels for graphopt's packed quantized linear layers (formats: :mod:`graphopt.kernels.quant`).

- :func:`weight_only_matmul`: ``x @ W.T`` for int8 / int4 / ternary codes with per-channel or
  per-group scales, float16 / bfloat16 / float32 activations, float32 accumulation. The kernel reads
  the stored layout as it is (rows of ``W`` contiguous along K: int8 bytes, int4 two per byte,
  ternary four per byte) and unpacks in registers with shifts and ``tl.join``; nothing is
  converted at load and no second copy of the weights exists. Where a K tile lies inside one group
  (``group_size`` a multiple of the tile), the codes go into the dot as they are and the group's
  scale multiplies the tile's partial product afterwards; otherwise each tile is dequantized before
  its dot. Small M (decoding, M <= 16) runs split-K: the K range is cut into slices that separate
  programs reduce, so that a batch-1 GEMV fills the GPU; partial sums go to a float32 buffer that is
  summed afterwards (deterministic: no atomics).
- :func:`int8_matmul`: the w8a8 GEMM, int8 activation codes x int8 weight codes with int32
  accumulation, then ``(acc + a_offset[m] * colsum(W)[n]) * a_scale[m] * w_scale[n]``. Per-token
  symmetric codes have ``a_offset = 0``; onnxruntime-style per-tensor uint8 codes ``q`` with zero
  point ``z`` are passed as ``q - 128`` with ``a_offset = 128 - z`` (exact integer arithmetic).

Both run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests). Triton is
imported on first use. Tiles: a heuristic by M (:func:`weight_only_config`, :func:`int8_config`) and,
on a GPU, a few alternatives timed once per shape (:func:`tuned`); docs/kernels.md says why and what
remains to be measured on a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: the kernels' scheme codes (constexpr): how a row of packed bytes unpacks
SCHEME_IDS = {"int8": 0, "int4": 1, "ternary": 2}


@dataclass(frozen=True)
class TileConfig:
    """One launch's tiles: ``block_*`` sizes, ``split_k`` slices of K, and Triton's warps / stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(x: Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter; say so instead of failing deep down."""
    if not x.is_cuda and not interpreted():
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (this input is on {x.device}); on CPU it runs "
                           "only under TRITON_INTERPRET=1, set before triton is imported (slow, for tests). "
                           "Use backend='torch' or 'auto', or move the model to a GPU")


def _power_of_two_divisor(n: int, at_most: int) -> int:
    """The largest power of two <= ``at_most`` dividing ``n`` (0 when it is below 16, the smallest dot)."""
    p = at_most
    while p >= 16 and n % p:
        p //= 2
    return p if p >= 16 else 0


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough to exercise split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


def weight_only_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> TileConfig:
    """Tiles for :func:`weight_only_matmul`: split-K GEMV tiles for M <= 16, GEMM tiles above."""
    if m <= 16:
        block_n, block_k = 32, 128
        tiles = -(-n // block_n)
        k_tiles = -(-k // block_k)
        split = max(1, min(k_tiles, (2 * _sm_count(device)) // max(tiles, 1)))
        return TileConfig(16, block_n, block_k, split_k=split, num_warps=4, num_stages=2)
    block_k = 64
    if group_size > 0:  # a K tile inside one group: scales after the dot
        block_k = _power_of_two_divisor(group_size, 64) or 64
    big = m >= 256
    return TileConfig(128 if big else 64, 128 if big else 64, block_k, num_warps=8 if big else 4, num_stages=3)


def int8_config(m: int, n: int, k: int) -> TileConfig:
    if m <= 16:
        return TileConfig(16, 64, 128, num_warps=4, num_stages=2)
    big = m >= 256
    return TileConfig(128 if big else 64, 128 if big else 64, 64, num_warps=8 if big else 4, num_stages=3)


def weight_only_candidates(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[TileConfig]:
    """The heuristic's tiles first, then the alternatives timed once per shape on a GPU (:func:`tuned`)."""
    first = weight_only_config(m, n, k, group_size, device)
    if device.type != "cuda":
        return [first]
    if m <= 16:
        alternatives = [TileConfig(16, bn, bk, split_k=sk, num_warps=4, num_stages=st)
                        for bn, bk, sk, st in ((64, 128, 1, 3), (32, 256, 2, 3), (64, 256, 4, 2), (128, 128, 2, 3),
                                               (32, 128, 8, 3), (16, 256, 1, 4))]
    else:
        bk = first.block_k
        alternatives = [TileConfig(bm, bn, bk, num_warps=w, num_stages=st)
                        for bm, bn, w, st in ((64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3),
                                              (64, 64, 4, 3))]
    return list(dict.fromkeys([first, *alternatives]))


def int8_candidates(m: int, n: int, k: int, device: torch.device) -> list[TileConfig]:
    first = int8_config(m, n, k)
    if device.type != "cuda":
        return [first]
    if m <= 16:
        alternatives = [TileConfig(16, bn, bk, num_warps=4, num_stages=st)
                        for bn, bk, st in ((32, 128, 3), (64, 256, 3), (128, 128, 3))]
    else:
        alternatives = [TileConfig(bm, bn, 64 if bn < 256 else 32, num_warps=w, num_stages=st)
                        for bm, bn, w, st in ((128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4))]
    return list(dict.fromkeys([first, *alternatives]))


_TUNED: dict[tuple, TileConfig] = {}


def m_bucket(m: int) -> int:
    """Shapes tuned together: M rounded up to a power of two."""
    return 1 << max(m - 1, 0).bit_length()


def tuned(key: tuple, candidates: Callable[[], list[TileConfig]], launch: Callable[[TileConfig], object]
          ) -> TileConfig:
    """The fastest of ``candidates()`` for ``key``, timed on the first call (GPU only; kept per process, so
    later calls cost one dict lookup and ``candidates`` is built once).

    Not while a CUDA graph is being captured (timing needs synchronisation): the heuristic's tiles then.
    ``GRAPHOPT_TRITON_TUNE=0`` turns timing off.
    """
    if key in _TUNED:  # every call after the first: one dict lookup
        return _TUNED[key]
    candidates = candidates()
    if len(candidates) > 1 and torch.cuda.is_current_stream_capturing():  # not kept: the next call tunes
        return candidates[0]
    if len(candidates) == 1 or os.environ.get("GRAPHOPT_TRITON_TUNE") == "0":
        _TUNED[key] = candidates[0]
        return candidates[0]
    import triton.testing

    times = {}
    for cfg in candidates:
        try:
            times[cfg] = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a tile that does not compile (shared memory, say) is not a candidate
            log.debug("tile %s failed: %s", cfg, e)
    _TUNED[key] = min(times, key=times.__getitem__) if times else candidates[0]
    log.info("tuned %s: %s", key, _TUNED[key])
    return _TUNED[key]


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """Build the kernels once per mode (``triton.jit`` reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def weight_only(X, Wq, S, Y, M, N, K, group, k_per_split, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
                    SCHEME: tl.constexpr, PER_CHANNEL: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & (rk < K)[None, :], other=0.0)
            if SCHEME == 0:
                w = tl.load(Wq + rn[:, None] * stride_wn + rk[None, :], mask=nmask[:, None] & (rk < K)[None, :],
                            other=0).to(tl.int32)
            elif SCHEME == 1:  # column 2j in the low nibble of byte j, stored + 8
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(Wq + rn[:, None] * stride_wn + rb[None, :],
                            mask=nmask[:, None] & (rb < (K + 1) // 2)[None, :], other=0x88).to(tl.int32)
                w = tl.reshape(tl.join(b & 0xF, (b >> 4) & 0xF), (BLOCK_N, BLOCK_K)) - 8
            else:  # ternary: column 4j + i at bits 2i of byte j, stored + 1
                rb = k0 // 4 + tl.arange(0, BLOCK_K // 4)
                b = tl.load(Wq + rn[:, None] * stride_wn + rb[None, :],
                            mask=nmask[:, None] & (rb < (K + 3) // 4)[None, :], other=0x55).to(tl.int32)
                pairs = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, (b >> 6) & 3))  # [j, i % 2, i // 2]
                w = tl.reshape(pairs, (BLOCK_N, BLOCK_K)) - 1
            if SCALE_AFTER_DOT:
                wt = tl.trans(w.to(x.dtype))
                part = tl.dot(x, wt, input_precision="ieee") if IEEE else tl.dot(x, wt)  # IEEE: constexpr
                if PER_CHANNEL:
                    acc += part
                else:
                    s = tl.load(S + rn * stride_sn + k0 // group, mask=nmask, other=0.0).to(tl.float32)
                    acc += part * s[None, :]
            else:  # dequantize the tile: each column's own group scale
                s = tl.load(S + rn[:, None] * stride_sn + (rk // group)[None, :],
                            mask=nmask[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
                wt = tl.trans((w.to(tl.float32) * s).to(x.dtype))
                if IEEE:
                    acc += tl.dot(x, wt, input_precision="ieee")
                else:
                    acc += tl.dot(x, wt)
        if PER_CHANNEL:
            acc *= tl.load(S + rn * stride_sn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def int8_gemm(A, Wq, AS, AOFF, WS, Y, M, N, K, stride_am, stride_wn, stride_ym,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        colsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            a = tl.load(A + rm[:, None] * stride_am + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
            w = tl.load(Wq + rn[:, None] * stride_wn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
            colsum += tl.sum(w.to(tl.int32), axis=1)
        a_off = tl.load(AOFF + rm, mask=mmask, other=0)
        a_scale = tl.load(AS + rm, mask=mmask, other=0.0)
        w_scale = tl.load(WS + rn, mask=nmask, other=0.0).to(tl.float32)
        total = (acc + a_off[:, None] * colsum[None, :]).to(tl.float32)
        y = total * a_scale[:, None] * w_scale[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], y.to(Y.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])

    return weight_only, int8_gemm


def weight_only_matmul(x: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, in_features: int,
                       config: TileConfig | None = None) -> Tensor:
    """``x @ W.T`` (``x``: ``[..., K]``; ``qweight`` packed ``[N, ceil(K / per_byte)]``, ``scale`` ``[N, groups]``)."""
    check_device(x)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernels take float16 / bfloat16 / float32 activations, not {x.dtype}")
    k, n = in_features, qweight.shape[0]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous()
    m = x2.shape[0]

    def launch(cfg: TileConfig) -> Tensor:
        return _weight_only_launch(x2, qweight, scale, scheme, group_size, k, cfg)

    if config is None:
        key = ("weight_only", m_bucket(m), n, k, scheme, group_size, x.dtype, x.device)
        config = tuned(key, lambda: weight_only_candidates(m, n, k, group_size, x.device), launch)
    return launch(config).reshape(*x.shape[:-1], n)


def _weight_only_launch(x2: Tensor, qweight: Tensor, scale: Tensor, scheme: str, group_size: int, k: int,
                        cfg: TileConfig) -> Tensor:
    import triton

    m, n = x2.shape[0], qweight.shape[0]
    per_channel = group_size <= 0
    after_dot = per_channel or group_size % cfg.block_k == 0
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    out = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else x2.dtype, device=x2.device)
    weight_only, _ = _kernels(interpreted())
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    weight_only[grid](x2, qweight, scale, out, m, n, k, max(group_size, 1), k_per_split, x2.stride(0),
                      qweight.shape[1], scale.stride(0), out.stride(0), out.stride(1), SCHEME=SCHEME_IDS[scheme],
                      PER_CHANNEL=per_channel, SCALE_AFTER_DOT=after_dot, IEEE=x2.dtype == torch.float32,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
    return out[0] if split == 1 else out.sum(0).to(x2.dtype)


def int8_matmul(a: Tensor, qweight: Tensor, a_scale: Tensor, a_offset: Tensor, w_scale: Tensor,
                out_dtype: torch.dtype, config: TileConfig | None = None) -> Tensor:
    """``(a @ W.T + a_offset[:, None] * W.sum(1)) * a_scale[:, None] * w_scale`` with ``a`` int8 ``[M, K]``
    and ``qweight`` int8 ``[N, K]``; ``a_scale`` float32 ``[M]``, ``a_offset`` int32 ``[M]``, ``w_scale`` ``[N]``."""
    check_device(a)
    m, k = a.shape
    n = qweight.shape[0]
    args = (a.contiguous(), qweight.contiguous(), a_scale.float().contiguous(), a_offset.to(torch.int32).contiguous(),
            w_scale.contiguous())

    def launch(cfg: TileConfig) -> Tensor:
        return _int8_launch(*args, out_dtype, cfg)

    if config is None:
        config = tuned(("int8", m_bucket(m), n, k, out_dtype, a.device), lambda: int8_candidates(m, n, k, a.device),
                       launch)
    return launch(config)


def _int8_launch(a: Tensor, qweight: Tensor, a_scale: Tensor, a_offset: Tensor, w_scale: Tensor,
                 out_dtype: torch.dtype, cfg: TileConfig) -> Tensor:
    import triton

    (m, k), n = a.shape, qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    _, int8_gemm = _kernels(interpreted())
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    int8_gemm[grid](a, qweight, a_scale, a_offset, w_scale, out, m, n, k, k, qweight.stride(0), out.stride(0),
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
    return out
