"""Edits of feature activations, applied by :class:`fastsae.analysis.Splice` at its sites.

Each edit maps sparse codes ``(values, indices) [b, s, w]`` to new sparse codes of the same leading
shape; a feature that is not active at a position can be switched on (``Clamp``, ``Patch``) by
appending columns, which the sparse decoder handles like any other. ``positions`` restricts an edit
to some sequence positions: ``None`` (all), a list of ints, a bool ``[s]`` or ``[b, s]`` tensor.

Example::

    with Splice(model, sae) as sp:
        sp.edit(sae_hook, Ablate([12, 40]), Clamp([7], 5.0, positions=[3]))
        logits = model(tokens)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastsae.analysis.codes import SparseCodes

__all__ = ["Ablate", "Clamp", "Edit", "Patch", "Scale"]


def _feature_tensor(features: int | Sequence[int] | Tensor, d_sae: int) -> Tensor:
    f = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if f.numel() == 0:
        raise ValueError("features is empty; name at least one feature")
    bad = f[(f < 0) | (f >= d_sae)]
    if bad.numel():
        raise ValueError(f"features {bad.tolist()} are out of range for d_sae={d_sae}")
    return f


def _position_mask(positions, lead: tuple[int, int], device) -> Tensor:
    """``bool [b, s, 1]``: where an edit applies."""
    b, s = lead
    if positions is None:
        return torch.ones(b, s, 1, dtype=torch.bool, device=device)
    p = torch.as_tensor(positions, device=device)
    if p.dtype == torch.bool:
        if p.shape not in ((s,), (b, s)):
            raise ValueError(
                f"a bool positions mask must be [{s}] or [{b}, {s}], got {tuple(p.shape)}"
            )
        return p.expand(b, s).unsqueeze(-1)
    p = p.long().reshape(-1)
    if p.numel() and (p.min() < -s or p.max() >= s):
        raise ValueError(f"positions {p.tolist()} are out of range for sequences of {s}")
    mask = torch.zeros(s, dtype=torch.bool, device=device)
    mask[p] = True
    return mask.expand(b, s).unsqueeze(-1)


class Edit:
    """Base class. ``apply(codes, d_sae)`` returns edited :class:`SparseCodes` ``[b, s, w']``."""

    features: Tensor | Sequence[int] | int
    positions: object = None

    def apply(self, codes: SparseCodes, d_sae: int) -> SparseCodes:
        raise NotImplementedError

    def _hits(self, codes: SparseCodes, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
        f = _feature_tensor(self.features, d_sae).to(codes.indices.device)
        pos = _position_mask(self.positions, tuple(codes.values.shape[:2]), codes.values.device)
        hit = torch.isin(codes.indices, f) & pos
        return f, pos, hit


@dataclass
class Ablate(Edit):
    """Set ``features`` to zero (at ``positions``)."""

    features: Tensor | Sequence[int] | int
    positions: object = None

    def apply(self, codes: SparseCodes, d_sae: int) -> SparseCodes:
        _, _, hit = self._hits(codes, d_sae)
        return SparseCodes(codes.values.masked_fill(hit, 0), codes.indices)


@dataclass
class Scale(Edit):
    """Multiply ``features`` by ``factor`` where they are active."""

    features: Tensor | Sequence[int] | int
    factor: float
    positions: object = None

    def apply(self, codes: SparseCodes, d_sae: int) -> SparseCodes:
        _, _, hit = self._hits(codes, d_sae)
        return SparseCodes(
            torch.where(hit, codes.values * self.factor, codes.values), codes.indices
        )


def _append(codes: SparseCodes, values: Tensor, indices: Tensor) -> SparseCodes:
    return SparseCodes(
        torch.cat([codes.values, values.to(codes.values.dtype)], -1),
        torch.cat([codes.indices, indices], -1),
    )


@dataclass
class Clamp(Edit):
    """Set ``features`` to ``value`` at ``positions``, whether or not they were active."""

    features: Tensor | Sequence[int] | int
    value: float
    positions: object = None

    def apply(self, codes: SparseCodes, d_sae: int) -> SparseCodes:
        f, pos, hit = self._hits(codes, d_sae)
        zeroed = SparseCodes(codes.values.masked_fill(hit, 0), codes.indices)
        b, s = codes.values.shape[:2]
        new_values = (pos * float(self.value)).expand(b, s, f.numel())
        return _append(zeroed, new_values, f.expand(b, s, f.numel()))


@dataclass
class Patch(Edit):
    """Replace ``features`` by their activations in ``source`` (codes read from another prompt of
    the same shape ``[b, s, w_src]``, e.g. ``Splice.codes[hook]`` of an earlier run)."""

    features: Tensor | Sequence[int] | int
    source: SparseCodes
    positions: object = None

    def apply(self, codes: SparseCodes, d_sae: int) -> SparseCodes:
        f, pos, hit = self._hits(codes, d_sae)
        src = self.source
        if src.values.shape[:2] != codes.values.shape[:2]:
            raise ValueError(
                f"Patch source has leading shape {tuple(src.values.shape[:2])}, the run has "
                f"{tuple(codes.values.shape[:2])}: patch between prompts of the same shape"
            )
        keep = torch.isin(src.indices, f) & pos
        zeroed = SparseCodes(codes.values.masked_fill(hit, 0), codes.indices)
        return _append(zeroed, src.values.detach() * keep, src.indices.to(codes.indices.device))
