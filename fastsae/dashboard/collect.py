"""One streaming pass of feature statistics, in memory independent of the number of tokens.

For every feature, :class:`FeatureCollector` keeps

- the firing count and the activation sum (density, mean);
- a histogram over fixed log2-spaced bins (:data:`BINS_PER_OCTAVE` per octave, from
  ``2**LOW_OCTAVE`` to ``2**HIGH_OCTAVE``; values outside land in the end bins);
- the ``top`` highest activations, each with its context window (token ids and this feature's
  activation at every token of the window);
- ``samples`` firing events drawn uniformly without replacement, by bottom-k priority sampling
  (each event gets an independent uniform key; the events with the smallest keys are kept, which
  is the reservoir-sampling distribution; Cohen & Kaplan 2007), with their windows too.

Both bounded sets are updated with one vectorised merge per batch: the batch's best candidates per
feature are ranked, and the union with the state is cut back to its size with ``topk``. State:
``d_sae × (top + samples) × window`` token ids and activations, whatever the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BINS_PER_OCTAVE",
    "HIGH_OCTAVE",
    "LOW_OCTAVE",
    "FeatureCollector",
    "Bounded",
    "bin_edges",
]

BINS_PER_OCTAVE = 4
LOW_OCTAVE = -12
HIGH_OCTAVE = 12
N_BINS = (HIGH_OCTAVE - LOW_OCTAVE) * BINS_PER_OCTAVE
#: Events whose context windows are looked up at once: bounds the temporary [chunk, window]
#: tensors however many slots a batch fills.
WINDOW_CHUNK = 16384


def bin_edges() -> Tensor:
    """``[N_BINS + 1]`` float64 histogram bin edges (the first and last bins are open-ended)."""
    return torch.exp2(torch.arange(N_BINS + 1, dtype=torch.float64) / BINS_PER_OCTAVE + LOW_OCTAVE)


def _bin(values: Tensor) -> Tensor:
    b = torch.floor((torch.log2(values.double()) - LOW_OCTAVE) * BINS_PER_OCTAVE).long()
    return b.clamp_(0, N_BINS - 1)


@dataclass
class Bounded:
    """``size`` kept events per feature, best key first; empty slots have ``key = -inf``.

    key, value: ``[d_sae, size]`` float32; where: ``[d_sae, size]`` int64 global token id
    (``sequence * seq_len + position``); tokens: ``[d_sae, size, window]`` int32 (-1 outside the
    sequence); acts: ``[d_sae, size, window]`` float32, this feature's activation per token.
    """

    key: Tensor
    value: Tensor
    where: Tensor
    tokens: Tensor
    acts: Tensor

    @classmethod
    def empty(cls, d_sae: int, size: int, window: int, device) -> Bounded:
        return cls(
            key=torch.full((d_sae, size), -torch.inf, device=device),
            value=torch.zeros(d_sae, size, device=device),
            where=torch.full((d_sae, size), -1, dtype=torch.long, device=device),
            tokens=torch.full((d_sae, size, window), -1, dtype=torch.int32, device=device),
            acts=torch.zeros(d_sae, size, window, device=device),
        )


class FeatureCollector:
    """Streaming per-feature statistics over batches of sparse codes; see the module docstring.

    Args:
        d_sae: number of features.
        top: contexts kept per feature by activation.
        samples: uniformly sampled firing events kept per feature.
        left, right: tokens of context before and after the firing token.
        seed: seeds the sampling keys.
    """

    def __init__(
        self,
        d_sae: int,
        *,
        top: int = 20,
        samples: int = 24,
        left: int = 24,
        right: int = 8,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        for name, value in (("d_sae", d_sae), ("top", top), ("samples", samples)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if left < 0 or right < 0:
            raise ValueError(f"left={left} and right={right} must be >= 0")
        self.d_sae, self.left, self.right = d_sae, left, right
        self.window = left + 1 + right
        self.device = torch.device(device)
        self.count = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae, N_BINS, dtype=torch.long, device=device)
        self.top = Bounded.empty(d_sae, top, self.window, device)
        self.samples = Bounded.empty(d_sae, samples, self.window, device)
        self.tokens_seen = 0
        self.sequences_seen = 0
        self.seq_len: int | None = None
        self._gen = torch.Generator(device=device).manual_seed(seed)

    def update(self, tokens: Tensor, values: Tensor, indices: Tensor, keep: Tensor) -> None:
        """Add one batch.

        Args:
            tokens: ``[b, s]`` token ids.
            values, indices: ``[b, s, w]`` sparse codes (zeros are padding).
            keep: ``bool [b, s]``: positions that count as tokens (BOS and pad excluded).
        """
        b, s = tokens.shape
        if values.shape[:2] != (b, s) or values.shape != indices.shape or keep.shape != (b, s):
            raise ValueError(
                f"tokens {tuple(tokens.shape)}, values {tuple(values.shape)}, indices "
                f"{tuple(indices.shape)} and keep {tuple(keep.shape)} do not match"
            )
        if self.seq_len is None:
            self.seq_len = s
        elif s != self.seq_len:
            raise ValueError(f"sequences have length {s}, earlier batches {self.seq_len}")
        dev = self.device
        tokens, values, indices, keep = (t.to(dev) for t in (tokens, values, indices, keep))
        values = values.float() * keep.unsqueeze(-1)
        fire = values > 0
        bi, si, wi = fire.nonzero(as_tuple=True)
        f = indices[bi, si, wi].long()
        v = values[bi, si, wi]
        self.count += torch.bincount(f, minlength=self.d_sae)
        self.total.index_add_(0, f, v.double())
        self.hist.view(-1).index_add_(0, f * N_BINS + _bin(v), torch.ones_like(f))
        # every firing event of the batch keyed by (row, position, feature), sorted: a context
        # window's activations are then looked up with one searchsorted
        flat_key = (bi * s + si) * self.d_sae + f
        flat_key, order = torch.sort(flat_key)
        lookup = (flat_key, v[order])
        ctx = (tokens, lookup, bi, si, f)
        self._merge(self.top, v, v, ctx)
        u = torch.rand(v.shape, generator=self._gen, device=dev)
        self._merge(self.samples, -u, v, ctx)
        self.tokens_seen += int(keep.sum())
        self.sequences_seen += b

    def _merge(self, state: Bounded, key: Tensor, v: Tensor, ctx) -> None:
        tokens, lookup, bi, si, f = ctx
        size = state.key.shape[1]
        # rank the batch's events within each feature by key, keep the best `size` of each
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(f[order], stable=True)]
        fs = f[order]
        starts = torch.searchsorted(fs, fs, right=False)
        rank = torch.arange(fs.numel(), device=fs.device) - starts
        sel = rank < size
        order, fs, rank = order[sel], fs[sel], rank[sel]
        cand_key = torch.full_like(state.key, -torch.inf)
        cand_ref = torch.full(state.key.shape, -1, dtype=torch.long, device=state.key.device)
        cand_key[fs, rank] = key[order]
        cand_ref[fs, rank] = order
        merged_key = torch.cat([state.key, cand_key], 1)
        best = torch.topk(merged_key, size, dim=1)
        from_old = best.indices < size
        new_ref = torch.gather(cand_ref, 1, (best.indices - size).clamp(min=0))
        new_ref = torch.where(from_old, -1, new_ref)
        old_slot = best.indices.clamp(max=size - 1)
        for name in ("value", "where", "tokens", "acts"):
            old = getattr(state, name)
            idx = old_slot if old.ndim == 2 else old_slot.unsqueeze(-1).expand(-1, -1, old.shape[2])
            setattr(state, name, torch.gather(old, 1, idx))
        state.key = best.values
        empty = state.key == -torch.inf
        state.value.masked_fill_(empty, 0)
        state.where.masked_fill_(empty, -1)
        state.tokens.masked_fill_(empty.unsqueeze(-1), -1)
        state.acts.masked_fill_(empty.unsqueeze(-1), 0)
        fill_f, fill_slot = (new_ref >= 0).nonzero(as_tuple=True)
        if fill_f.numel() == 0:
            return
        e = new_ref[fill_f, fill_slot]
        state.value[fill_f, fill_slot] = v[e]
        seq_base = self.sequences_seen
        state.where[fill_f, fill_slot] = (seq_base + bi[e]) * self.seq_len + si[e]
        # in chunks: a window gathers [E, window, w] indices, and E is large in the first batches
        for c in range(0, e.numel(), WINDOW_CHUNK):
            ec, fc, sc = (
                e[c : c + WINDOW_CHUNK],
                fill_f[c : c + WINDOW_CHUNK],
                fill_slot[c : c + WINDOW_CHUNK],
            )
            win_tokens, win_acts = self._windows(tokens, lookup, bi[ec], si[ec], f[ec])
            state.tokens[fc, sc] = win_tokens
            state.acts[fc, sc] = win_acts

    def _windows(self, tokens, lookup, bi, si, f) -> tuple[Tensor, Tensor]:
        """``[E, window]`` token ids (-1 outside the sequence) and feature-``f`` activations."""
        keys, vals = lookup
        s = tokens.shape[1]
        offs = torch.arange(-self.left, self.right + 1, device=tokens.device)
        pos = si.unsqueeze(1) + offs  # [E, W]
        inside = (pos >= 0) & (pos < s)
        pc = pos.clamp(0, s - 1)
        rows = bi.unsqueeze(1).expand_as(pc)
        win_tokens = torch.where(inside, tokens[rows, pc], -1).int()
        query = (rows * s + pc) * self.d_sae + f.unsqueeze(1)
        at = torch.searchsorted(keys, query).clamp_(max=max(keys.numel() - 1, 0))
        hit = (keys[at] == query) & inside
        win_acts = torch.where(hit, vals[at], 0.0)
        return win_tokens, win_acts

    # -- results ---------------------------------------------------------------------------------

    @property
    def density(self) -> Tensor:
        """``[d_sae]`` float64 fraction of tokens on which each feature fired."""
        return self.count.double() / max(self.tokens_seen, 1)

    @property
    def max_activation(self) -> Tensor:
        """``[d_sae]`` float32 (0 for a feature that never fired)."""
        return self.top.value[:, 0]
