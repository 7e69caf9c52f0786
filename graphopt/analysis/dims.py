"""Index spaces of tensor dimensions, unified by union-find, with concat/product layouts.

Every (tensor, dim) of a captured graph gets a :class:`Space`. Rules per op relate spaces:
``unify`` says two dims index the same channels in the same order; a *layout* says a space is the
concatenation (``cat``) or the row-major product (``prod``) of smaller spaces — a channel dim split
into heads × head_dim, or q|k|v packed in one projection. Leaves of the layouts are the units that
pruning can remove; :meth:`SpaceTable.positions` maps a space's indices to leaf indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Space:
    """One index space (a union-find node). Only the root of a class carries layout and freeze info."""

    size: int
    id: int
    parent: Space | None = None
    kind: str = ""  # "" (leaf) | "cat" | "prod"
    parts: list[Space] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)  # reasons

    def __repr__(self) -> str:
        return f"Space#{self.id}({self.size}{', ' + self.kind if self.kind else ''})"


class SpaceTable:
    """Creates, unifies and lays out spaces; freezes the ones no pruning may touch."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.conflicts: list[str] = []

    def new(self, size: int) -> Space:
        s = Space(int(size), len(self.spaces))
        self.spaces.append(s)
        return s

    @staticmethod
    def find(s: Space) -> Space:
        root = s
        while root.parent is not None:
            root = root.parent
        while s.parent is not None and s.parent is not root:  # path compression
            s.parent, s = root, s.parent
        return root

    def unify(self, a: Space, b: Space, why: str = "") -> None:
        """``a`` and ``b`` index the same channels in the same order."""
        a, b = self.find(a), self.find(b)
        if a is b:
            return
        if a.size != b.size:
            self.freeze(a, f"size mismatch {a.size} vs {b.size} ({why})")
            self.freeze(b, f"size mismatch {a.size} vs {b.size} ({why})")
            return
        b.parent = a
        a.frozen += b.frozen
        if not b.kind:
            return
        if not a.kind:
            a.kind, a.parts = b.kind, b.parts
            return
        self._unify_layouts(a, b.kind, b.parts, why)

    def layout(self, s: Space, kind: str, parts: list[Space], why: str = "") -> None:
        """Declare ``s`` to be the ``cat`` or row-major ``prod`` of ``parts``."""
        if kind == "prod":
            parts = [p for p in parts if p.size != 1]
        if kind == "cat":
            parts = [p for p in parts if p.size != 0]
        if len(parts) == 1:
            self.unify(s, parts[0], why)
            return
        expected = int(np.prod([p.size for p in parts])) if kind == "prod" else sum(p.size for p in parts)
        root = self.find(s)
        if expected != root.size:
            self.freeze(root, f"layout of size {expected} on a dim of size {root.size} ({why})")
            return
        if not root.kind:
            root.kind, root.parts = kind, list(parts)
        else:
            self._unify_layouts(root, kind, parts, why)

    def _unify_layouts(self, root: Space, kind: str, parts: list[Space], why: str) -> None:
        if root.kind == kind and [self.find(p).size for p in root.parts] == [self.find(p).size for p in parts]:
            for x, y in zip(list(root.parts), parts):
                self.unify(x, y, why)
            return
        msg = (f"incompatible layouts {root.kind}{[p.size for p in root.parts]} vs "
               f"{kind}{[p.size for p in parts]} ({why})")
        self.conflicts.append(msg)
        self.freeze(root, msg)
        for p in parts:
            self.freeze(p, msg)

    def freeze(self, s: Space, reason: str) -> None:
        root = self.find(s)
        if reason not in root.frozen:
            root.frozen.append(reason)

    # --- after all rules ran -------------------------------------------------------------------
    def leaves(self, s: Space) -> list[Space]:
        """The leaf roots under ``s``'s layout (each once, in order)."""
        out: list[Space] = []
        seen: set[int] = set()

        def visit(x: Space, depth: int) -> None:
            x = self.find(x)
            if depth > 64:
                raise RecursionError(f"cyclic layout through {x}")
            if not x.kind:
                if x.id not in seen:
                    seen.add(x.id)
                    out.append(x)
                return
            for p in x.parts:
                visit(p, depth + 1)

        visit(s, 0)
        return out

    def check_products(self) -> None:
        """Freeze products whose factors share a leaf: a unit would then index two factors at once."""
        for s in self.spaces:
            if s.parent is None and s.kind == "prod":
                seen: set[int] = set()
                for part in s.parts:
                    ids = {leaf.id for leaf in self.leaves(part)}
                    if ids & seen:
                        self.freeze(s, f"product of spaces sharing a unit ({[p.size for p in s.parts]})")
                        break
                    seen |= ids

    def frozen_reasons(self) -> dict[int, list[str]]:
        """Leaf id -> reasons, for every leaf under a frozen space (freezing flows down layouts)."""
        out: dict[int, list[str]] = {}
        for s in self.spaces:
            if s.parent is None and s.frozen:
                for leaf in self.leaves(s):
                    reasons = out.setdefault(leaf.id, [])
                    reasons += [r for r in s.frozen if r not in reasons]
        return out

    def positions(self, s: Space) -> dict[int, np.ndarray]:
        """For each leaf under ``s``: the leaf index at every position of ``s`` (row-major products)."""
        s = self.find(s)
        if not s.kind:
            return {s.id: np.arange(s.size)}
        if s.kind == "cat":
            pieces = [self.positions(p) for p in s.parts]
            sizes = [self.find(p).size for p in s.parts]
            leaf_ids = {k for piece in pieces for k in piece}
            return {k: np.concatenate([piece.get(k, np.full(n, -1)) for piece, n in zip(pieces, sizes)])
                    for k in leaf_ids}
        out: dict[int, np.ndarray] = {}
        sizes = [self.find(p).size for p in s.parts]
        for i, p in enumerate(s.parts):
            inner = int(np.prod(sizes[i + 1:])) if i + 1 < len(sizes) else 1
            outer = int(np.prod(sizes[:i])) if i else 1
            for k, arr in self.positions(p).items():
                tiled = np.tile(np.repeat(arr, inner), outer)
                out[k] = np.where(out[k] >= 0, out[k], tiled) if k in out else tiled
        return out
