"""The streaming collector against brute force over every firing event."""

from __future__ import annotations

import pytest
import torch

from fastsae.dashboard.collect import N_BINS, FeatureCollector, _bin


def _batches(seed=0, n_batches=4, b=3, s=11, w=4, d_sae=7):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        tokens = torch.randint(0, 50, (b, s), generator=g)
        values = torch.rand(b, s, w, generator=g) * 3
        values[torch.rand(b, s, w, generator=g) < 0.4] = 0
        indices = torch.stack([torch.randperm(d_sae, generator=g)[:w] for _ in range(b * s)]).view(
            b, s, w
        )
        keep = torch.ones(b, s, dtype=torch.bool)
        keep[:, 0] = False  # BOS
        yield tokens, values, indices, keep


def test_collector_matches_brute_force():
    d_sae, top, left, right = 7, 5, 3, 2
    col = FeatureCollector(d_sae, top=top, samples=4, left=left, right=right, seed=1)
    events = {f: [] for f in range(d_sae)}  # (value, global id, window tokens, window acts)
    seqs = 0
    for tokens, values, indices, keep in _batches(d_sae=d_sae):
        col.update(tokens, values, indices, keep)
        b, s, w = values.shape
        dense = torch.zeros(b, s, d_sae).scatter_add(-1, indices, values) * keep.unsqueeze(-1)
        for bi in range(b):
            for si in range(s):
                for f in range(d_sae):
                    v = float(dense[bi, si, f])
                    if v > 0:
                        lo, hi = max(0, si - left), min(s, si + right + 1)
                        events[f].append(
                            (
                                v,
                                (seqs + bi) * s + si,
                                tokens[bi, lo:hi].tolist(),
                                dense[bi, lo:hi, f].tolist(),
                            )
                        )
        seqs += b
    assert col.tokens_seen == 4 * 3 * 10
    for f in range(d_sae):
        ev = sorted(events[f], key=lambda e: -e[0])
        assert int(col.count[f]) == len(ev)
        assert float(col.total[f]) == pytest.approx(sum(e[0] for e in ev), rel=1e-6)
        hist = torch.bincount(_bin(torch.tensor([e[0] for e in ev])), minlength=N_BINS)
        assert torch.equal(col.hist[f], hist)
        kept = col.top.value[f, : min(top, len(ev))].tolist()
        assert kept == pytest.approx([e[0] for e in ev[:top]])
        for slot in range(min(top, len(ev))):
            where = int(col.top.where[f, slot])
            (match,) = [e for e in ev if e[1] == where]
            assert match[0] == pytest.approx(float(col.top.value[f, slot]))
            toks = col.top.tokens[f, slot]
            assert toks[toks >= 0].tolist() == match[2]
            assert col.top.acts[f, slot][toks >= 0].tolist() == pytest.approx(match[3])
        # samples: distinct real events, with their own values
        n_s = min(4, len(ev))
        got = col.samples.where[f][col.samples.key[f] > -torch.inf].tolist()
        assert len(got) == len(set(got)) == n_s
        by_id = {e[1]: e[0] for e in ev}
        for slot, where in enumerate(col.samples.where[f, :n_s].tolist()):
            assert by_id[where] == pytest.approx(float(col.samples.value[f, slot]))


def test_samples_are_uniform():
    """Each of 20 equally likely events is kept with probability 5/20 over many seeds."""
    hits = torch.zeros(20)
    for seed in range(300):
        col = FeatureCollector(1, top=1, samples=5, left=0, right=0, seed=seed)
        for chunk in range(4):  # 4 batches of 5 events of feature 0
            tokens = torch.zeros(1, 5, dtype=torch.long)
            values = torch.full((1, 5, 1), 1.0 + chunk)
            col.update(
                tokens,
                values,
                torch.zeros(1, 5, 1, dtype=torch.long),
                torch.ones(1, 5, dtype=torch.bool),
            )
        hits[col.samples.where[0]] += 1
    freq = hits / 300
    assert (freq - 0.25).abs().max() < 0.1, freq  # binomial sd 0.025 per event: 4 sd


def test_collector_rejects_mismatched_shapes():
    col = FeatureCollector(4)
    with pytest.raises(ValueError, match="do not match"):
        col.update(
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 4, 1),
            torch.zeros(2, 4, 1, dtype=torch.long),
            torch.ones(2, 3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="top=0"):
        FeatureCollector(4, top=0)
