"""ActivationShuffler: exactly-once delivery, mixing, reproducibility, errors, shutdown."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsae.data import ActivationCache, ActivationShuffler, TransformerLensSource, write_cache
from fastsae.data.sources import POSITION, SEQUENCE, TOKENS


def synthetic(n_seq: int, ctx: int, d: int = 4, chunk_seqs: int = 3):
    """Chunks of ``chunk_seqs`` sequences; each row's id (``tokens``) is unique and its
    activation row is the id repeated, so a row can be checked against its id."""
    for first in range(0, n_seq, chunk_seqs):
        seqs = torch.arange(first, min(first + chunk_seqs, n_seq))
        seq = seqs.repeat_interleave(ctx)
        pos = torch.arange(ctx).repeat(len(seqs))
        ids = seq * ctx + pos
        yield {
            "x": ids[:, None].float().expand(-1, d).clone(),
            TOKENS: ids,
            SEQUENCE: seq,
            POSITION: pos,
        }


def drain(shuffler):
    with shuffler:
        return list(shuffler)


def _check_exactly_once(batches, total, batch_size, drop_last=False):
    ids = torch.cat([b[TOKENS] for b in batches])
    for b in batches:  # every row travelled with its own id
        assert torch.equal(b["x"], b[TOKENS][:, None].float().expand_as(b["x"]))
    sizes = [len(b[TOKENS]) for b in batches]
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    if drop_last:
        assert sizes[-1] == batch_size and total - len(ids) < batch_size
        assert len(ids.unique()) == len(ids)  # nothing twice
    else:
        assert torch.equal(ids.sort().values, torch.arange(total))  # nothing lost, nothing twice


@pytest.mark.parametrize(
    ("n_seq", "ctx", "batch", "buffer", "refill"),
    [
        (40, 50, 64, 512, 0.5),  # many phases
        (3, 10, 64, 512, 0.5),  # the source is smaller than the buffer
        (16, 32, 32, 512, 0.5),  # the source ends exactly on a phase boundary
        (25, 37, 100, 300, 1.0),  # refill everything each phase
        (25, 37, 7, 100, 0.1),  # small batches, small refills
    ],
)
def test_every_row_exactly_once(n_seq, ctx, batch, buffer, refill):
    shuffler = ActivationShuffler(
        synthetic(n_seq, ctx), batch_size=batch, buffer_tokens=buffer, refill_fraction=refill
    )
    _check_exactly_once(drain(shuffler), n_seq * ctx, batch)


@settings(max_examples=25)
@given(
    n_seq=st.integers(1, 30),
    ctx=st.integers(1, 40),
    batch=st.integers(1, 50),
    extra=st.integers(0, 200),
    refill=st.floats(0.05, 1.0),
    chunk_seqs=st.integers(1, 5),
    drop_last=st.booleans(),
)
def test_every_row_exactly_once_property(n_seq, ctx, batch, extra, refill, chunk_seqs, drop_last):
    total = n_seq * ctx
    if drop_last and total < batch:
        return
    shuffler = ActivationShuffler(
        synthetic(n_seq, ctx, chunk_seqs=chunk_seqs),
        batch_size=batch,
        buffer_tokens=2 * batch + extra,
        refill_fraction=refill,
        drop_last=drop_last,
    )
    _check_exactly_once(drain(shuffler), total, batch, drop_last)


def test_batches_mix_sequences():
    n_seq, ctx, batch = 256, 64, 256
    batches = drain(
        ActivationShuffler(synthetic(n_seq, ctx), batch_size=batch, buffer_tokens=4096, seed=3)
    )[:-1]
    same, corr = [], []
    for b in batches:
        seq, pos = b[SEQUENCE].double(), b[POSITION].double()
        # neighbours in a batch: from the same source sequence about as often as chance
        # (1 / the sequences in the buffer = 64 / 4096), not mostly (as unshuffled rows are)
        same.append((seq[1:] == seq[:-1]).double().mean())
        # the place in the batch says nothing about the place in the source
        where = torch.arange(len(seq), dtype=torch.float64)
        corr.append(torch.corrcoef(torch.stack([where, seq * ctx + pos]))[0, 1])
        # each batch draws from many sequences
        assert len(seq.unique()) > 50
    assert torch.stack(same).mean() < 0.04
    assert abs(torch.stack(corr).mean()) < 0.05
    assert torch.stack(corr).abs().max() < 0.3


def test_same_seed_same_order_other_seed_other_order():
    def run(seed):
        shuffler = ActivationShuffler(
            synthetic(30, 20), batch_size=32, buffer_tokens=128, seed=seed
        )
        return torch.cat([b[TOKENS] for b in drain(shuffler)])

    first = run(7)
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))


def test_dtype_and_columns():
    shuffler = ActivationShuffler(
        synthetic(4, 10), batch_size=8, buffer_tokens=16, dtype=torch.bfloat16, columns=["x"]
    )
    batches = drain(shuffler)
    assert set(batches[0]) == {"x"} and batches[0]["x"].dtype == torch.bfloat16
    with pytest.raises(KeyError, match=r"columns \['y'\] are not in the source"):
        drain(ActivationShuffler(synthetic(4, 10), batch_size=8, buffer_tokens=16, columns=["y"]))


def test_source_error_surfaces_in_the_consumer():
    def broken():
        yield from synthetic(6, 10)
        raise ValueError("the model ran out of memory")

    shuffler = ActivationShuffler(broken(), batch_size=8, buffer_tokens=32)
    with pytest.raises(ValueError, match="the model ran out of memory"):
        for _ in shuffler:
            pass
    assert not any(t.is_alive() for t in shuffler._pipe.threads)


def test_early_close_stops_the_threads():
    shuffler = ActivationShuffler(synthetic(500, 50), batch_size=16, buffer_tokens=256)
    with shuffler:
        next(shuffler)
    assert not any(t.is_alive() for t in shuffler._pipe.threads)
    assert list(shuffler) == []


def test_dropping_the_shuffler_stops_the_threads():
    def endless():
        while True:
            yield {"x": torch.zeros(100, 4)}

    shuffler = ActivationShuffler(endless(), batch_size=16, buffer_tokens=256)
    next(shuffler)
    threads = shuffler._pipe.threads
    del shuffler
    gc.collect()
    for thread in threads:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="buffer_tokens=10 must be >= 2 \\* batch_size=16"):
        ActivationShuffler([], batch_size=8, buffer_tokens=10)
    with pytest.raises(ValueError, match="refill_fraction=0"):
        ActivationShuffler([], batch_size=8, buffer_tokens=16, refill_fraction=0)
    assert drain(ActivationShuffler([], batch_size=8, buffer_tokens=16)) == []


def test_live_model_exactly_once(demo_model, demo_sequences):
    """model -> shuffler: sorted back by (sequence, position), the rows are the model's rows."""
    hook = "blocks.1.hook_resid_post"
    source = TransformerLensSource(demo_model, hook)
    batches = [demo_sequences[i : i + 4] for i in range(0, 24, 4)]
    shuffler = ActivationShuffler.from_source(source, batches, batch_size=100, buffer_tokens=1000)
    got = drain(shuffler)
    merged = {k: torch.cat([b[k] for b in got]) for k in got[0]}
    order = (merged[SEQUENCE] * 128 + merged[POSITION]).argsort()
    direct = source.activations(demo_sequences)
    assert torch.equal(merged[hook][order], direct[hook])
    assert torch.equal(merged[TOKENS][order], direct[TOKENS])


def test_cache_exactly_once(tmp_path, demo_source, demo_sequences):
    write_cache(tmp_path, demo_source, list(demo_sequences[:8]), tokens=1000, shard_tokens=300)
    cache = ActivationCache(tmp_path)
    hook = cache.hooks[0]
    got = drain(
        ActivationShuffler.from_cache(cache, [hook, TOKENS], batch_size=64, buffer_tokens=256)
    )
    rows = torch.cat([b[hook] for b in got])
    assert rows.shape == (1000, 128)

    # Rows are unique, so comparing them sorted proves the same multiset.
    def by_rows(t):
        return t[torch.argsort(t[:, 0], stable=True)]

    assert torch.equal(by_rows(rows), by_rows(cache.read(hook, 0, 1000)))


@pytest.mark.gpu
def test_cuda_delivery_exactly_once_and_overlapped():
    shuffler = ActivationShuffler(
        synthetic(40, 50), batch_size=64, buffer_tokens=512, device="cuda"
    )
    seen = []
    with shuffler:
        for batch in shuffler:
            assert batch["x"].is_cuda
            # work on the compute stream that reads the batch before the next one arrives
            seen.append(batch[TOKENS].clone())
            assert torch.equal(batch["x"][:, 0].long(), batch[TOKENS])
    assert torch.equal(torch.cat(seen).sort().values.cpu(), torch.arange(2000))
