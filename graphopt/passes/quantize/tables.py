"""The vocabulary projection (LM head) and embedding tables in ``quantize`` (which layers they are:
:mod:`graphopt.analysis.layers`), and tied ones kept tied.

Most language models tie the LM head to the input embedding table (one ``[vocab, hidden]`` tensor read by
both: SmolLM2's is a fifth of its weights). Quantizing the head alone would untie them: a float table plus a
packed copy, more bytes than before. So ``quantize(lm_head=true)`` quantizes a tied pair once: the head is
packed like any Linear layer, and the table becomes a :class:`QuantEmbedding` whose codes and scales are the
head's own tensors (a lookup reads rows of the head's packed weight; both layouts are ``[vocab, hidden]``
with groups along ``hidden``). The tie is logged in the Program's edit log (``tie``), so a saved model
reloads with one copy.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from ...analysis.layers import why_not_plain
from ...infra.contract import PassResult
from ...infra.program import Program
from ...nn.quant import QuantEmbedding, QuantLinear

#: schemes whose packed head a table can read: weight-only rows, as QuantEmbedding stores them
SHAREABLE = ("int8", "int4")


def why_not_table(name: str, table: nn.Embedding, heads: set[int], *, embeddings: bool, lm_head: bool, where: str,
                  skip: Sequence[str]) -> str:
    """Why ``quantize`` leaves embedding table ``name`` in float under these options (``""``: it packs it)."""
    if not embeddings:
        return "embedding table: stays in float (quantize(embeddings=true) packs its rows)"
    if id(table.weight) in heads and not lm_head:
        return "embedding table tied to the LM head, which stays in float (lm_head=true packs both, one copy)"
    if not fnmatch.fnmatchcase(name, where) or any(fnmatch.fnmatchcase(name, g) for g in skip):
        return "outside where / inside skip"
    if table.max_norm is not None:
        return (f"max_norm={table.max_norm}: the table renormalises the rows it looks up, which packed rows "
                "cannot; it stays in float")
    return why_not_plain(table, nn.Embedding)


def share_tied_table(program: Program, table: str, head: str, result: PassResult) -> bool:
    """Replace embedding ``table`` by a :class:`QuantEmbedding` reading the packed ``head``'s codes and scales
    (the same tensors); False, with a warning, when the head is not a weight-only int8 / int4 QuantLinear."""
    layer, old = program.get_submodule(head), program.get_submodule(table)
    if not (isinstance(layer, QuantLinear) and layer.scheme in SHAREABLE and layer.activations == "none"
            and layer.smooth is None and (layer.out_features, layer.in_features) == tuple(old.weight.shape)):
        result.note(table, f"tied to {head}, which was not packed as int8 / int4 weights: the table keeps the float "
                           "weight (the tie is broken: both are stored)", "warning")
        return False
    with torch.device("meta"):  # its own buffers are never filled: they are the head's
        packed = QuantEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx, scheme=layer.scheme,
                                group_size=layer.group_size, dtype=layer.scale.dtype)
    program.replace_module(table, packed)
    program.tie(f"{table}.qweight", f"{head}.qweight")
    program.tie(f"{table}.scale", f"{head}.scale")
    result.note(table, f"tied to {head}: it reads the head's packed {layer.scheme} rows (one copy)")
    return True
