"""GPTQ: Hessian-aware rounding of one layer's weights (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers").

Columns are quantized one at a time; the rounding error of each column is spread over the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (``H = XᵀX``), so the layer's
*outputs* on calibration data change as little as possible, not its weights. Lazy batch updates in
blocks of 128 columns, damping of ``H``'s diagonal, optional activation order (largest ``H_ii``
first, with group scales fixed up front so that groups stay contiguous in storage).
"""

from __future__ import annotations

import torch

from graphopt.nn.quant import round_codes, weight_scales


def permute_rows_(view: torch.Tensor, order: list[int]) -> None:
    """``view[order]`` written into ``view`` itself, a row at a time along the permutation's cycles (no copy of the
    matrix; a transposed view permutes columns)."""
    done = [False] * len(order)
    for start, target in enumerate(order):
        if done[start] or target == start:
            continue
        saved, i = view[start].clone(), start
        while True:  # row i becomes the old row order[i]; the old row start was saved
            done[i] = True
            if order[i] == start:
                view[i].copy_(saved)
                break
            view[i].copy_(view[order[i]])
            i = order[i]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: str, group_size: int, *,
                  damp: float = 0.01, act_order: bool = False, block: int = 128, qmax: int | None = None,
                  overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8 ``[out, in]``) and scales (``[out, groups]``) for ``weight`` given its input Hessian.

    ``qmax`` narrows int8 / int4 codes to ``[-qmax, qmax]`` (w8a8's 7-bit weights). The math runs on the
    weight's device, in float64 where the device has it (else float32 with at least 1% damping). Input
    features that were zero in every calibration batch (``H_ii = 0``) carry no data: their columns are rounded
    to nearest (the reference algorithm zeroes them, which is wrong wherever such a feature is non-zero).
    ``overwrite``: the Hessian (of the device and dtype the math runs in) is used as scratch space, so the
    solve holds one ``k x k`` matrix, not four (a 8192-wide layer: 0.5 GiB in float64, not 2).
    """
    out, k = weight.shape
    device = weight.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    if dtype is torch.float32:
        damp = max(damp, 0.01)
    w = weight.detach().to(device=device, dtype=dtype)
    if w.data_ptr() == weight.data_ptr():
        w = w.clone()
    h = hessian.to(device=device, dtype=dtype)
    if (h.data_ptr() == hessian.data_ptr() and not overwrite) or not h.is_contiguous():
        h = h.clone(memory_format=torch.contiguous_format)
    importance = torch.diag(h).clone()  # each input's E[x²]: what an error in its column costs
    dead = importance == 0
    h[dead, dead] = 1.0  # no correlation with the others: the column is rounded on its own
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    g = k if group_size <= 0 else group_size
    n_groups = -(-k // g)
    scales = torch.zeros(out, n_groups, dtype=dtype, device=device)
    static = act_order or group_size <= 0
    if static:  # fixed from the original weights: needed when columns are visited out of order
        scales[:] = weight_scales(w, scheme, group_size, qmax, importance=importance)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=device)
    if act_order:  # H[perm][:, perm] and W[:, perm], in place
        order = perm.tolist()
        for view in (h, h.T, w.T):
            permute_rows_(view, order)
    # The upper Cholesky factor of H's inverse, each step in place: on H's column-major view (H is symmetric up to
    # rounding: its upper triangle is read), which LAPACK factors where it lies; a row-major one it copies first.
    f = h.mT
    try:
        torch.linalg.cholesky(f, out=f)
        torch.cholesky_inverse(f, out=f)
        hinv = torch.linalg.cholesky(f, upper=True, out=f)
    except torch.linalg.LinAlgError:
        raise ValueError(f"GPTQ: the Hessian of the layer's inputs is not positive definite at damp={damp:g} (the "
                         "calibration inputs do not span every input feature); give damp > 0 (default 0.01) or "
                         "more varied calibration data") from None
    codes = torch.zeros(out, k, dtype=torch.int8, device=device)
    order = perm.tolist()  # read on the host once: an int() of a CUDA element per column would sync each time
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, err1, hinv1 = w[:, start:end].clone(), torch.zeros(out, end - start, dtype=dtype, device=device), \
            hinv[start:end, start:end]
        for i in range(end - start):
            col = order[start + i]
            group = col // g
            if not static and col % g == 0:  # a new group: its scale from the weights as updated so far
                span = min(g, k - col)
                here = w1[:, i:i + span]  # the group's columns: the rest of this block, then the next ones of w
                group_w = here if here.shape[1] == span else torch.cat([here, w[:, end:end + span - here.shape[1]]], 1)
                scales[:, group] = weight_scales(group_w, scheme, 0, qmax, importance=importance[col:col + span])[:, 0]
            q = round_codes(w1[:, i], scales[:, group], scheme, qmax)
            codes[:, start + i] = q
            err = (w1[:, i] - q * scales[:, group]) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, end:].addmm_(err1, hinv[start:end, end:], alpha=-1)  # in place: no out x k temporary
    if act_order:  # back to the weight's column order, in place (codes[:, argsort(perm)] would copy them)
        permute_rows_(codes.T, torch.argsort(perm).tolist())
    return codes, scales.to(torch.float32)
