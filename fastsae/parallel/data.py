"""Rank-aware training data: each data rank reads only its own slice of every global batch.

**Cache** (``cache_dir``; the exact path). Every rank runs the same seeded
:class:`~fastsae.data.ActivationShuffler`, but over *row numbers* (8 bytes a row) instead of
activations: the shuffler's order depends only on its seed and the source's row order (its
docstring), so the row numbers of global batch ``t`` are exactly the rows one process would
train on at step ``t``. Data rank ``r`` of ``p`` then reads rows ``[r B/p, (r+1) B/p)`` of that
batch from the memory-mapped shards. Nothing is read twice, nothing skipped, and the slices
concatenated in rank order are one process's batch (a test checks both). Ranks of one latent
group read the same slice.

**Live model** (no cache): data rank ``r`` runs the model over sequences ``r, r + p, r + 2p...``
and shuffles them on its own (seed ``seed + 1000 r``) into batches of ``B / p``. Every sequence
is used once per epoch, but the order is not one process's order (that would need every rank to
run the model over every sequence).

Resuming restores ``(epoch, batch)`` like :class:`~fastsae.train.data.TrainData`; the position
counts global batches, so it is the same number at any world size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.parallel.mesh import Layout
from fastsae.train.config import TrainConfig
from fastsae.train.data import TrainData

__all__ = ["RankData", "read_rows"]

#: Row numbers per chunk handed to the row shuffler.
_ROW_CHUNK = 1 << 16


def read_rows(cache, hook: str, rows: Tensor) -> Tensor:
    """Rows ``rows [m]`` (any order) of column ``hook`` of ``cache``, as ``[m, d]``; each shard
    is touched once, in address order."""
    order = torch.argsort(rows)
    srt = rows[order]
    starts = torch.tensor(cache._starts, dtype=torch.long)
    shard_of = torch.searchsorted(starts, srt, right=True) - 1
    out = None
    for i in torch.unique(shard_of).tolist():
        sel = (shard_of == i).nonzero().squeeze(-1)
        view = cache.shard_view(i, hook)
        part = view[srt[sel] - int(starts[i])]
        if out is None:
            out = torch.empty((len(rows), *part.shape[1:]), dtype=part.dtype)
        out[order[sel]] = part
    return out


class RankData(TrainData):
    """:class:`TrainData` for one rank of ``layout``: ``next_batch`` returns this rank's
    ``[batch_size / dp, d]`` slice."""

    def __init__(self, cfg: TrainConfig, *, layout: Layout, device: torch.device, log=print):
        self.layout = layout
        super().__init__(cfg, device=device, log=log)
        if cfg.cache_dir is None and layout.dp_size > 1:
            log(
                f"parallel={layout.mode}: live-model data; each of the {layout.dp_size} data "
                "ranks runs the model on its own share of the sequences (for one process's exact "
                "order, write a cache first and train with --cache-dir)"
            )

    def _epoch_chunks(self):
        if self.cfg.cache_dir is not None:
            return self._row_chunks()
        p, r = self.layout.dp_size, self.layout.dp_rank
        if p == 1:
            return super()._epoch_chunks()
        from fastsae.data import text

        cfg = self.cfg
        rows = text.load_rows(cfg.dataset, split="train")
        seqs = text.token_sequences(rows, self.opened.tokenizer, self.context_size)
        skip = self._skip_sequences
        mine = (s for i, s in enumerate(seqs) if i >= skip and (i - skip) % p == r)
        return self.source.stream(text.token_batches(mine, cfg.model_batch_size))

    def _row_chunks(self):
        for start in range(self._eval_stop, len(self.cache), _ROW_CHUNK):
            yield {"row": torch.arange(start, min(start + _ROW_CHUNK, len(self.cache)))}

    def _start_epoch(self) -> None:
        from fastsae.data import ActivationShuffler

        self.close()
        cfg, p = self.cfg, self.layout.dp_size
        cached = cfg.cache_dir is not None
        self._shuffler = ActivationShuffler(
            self._epoch_chunks(),
            batch_size=cfg.batch_size if cached else cfg.batch_size // p,
            buffer_tokens=cfg.buffer_tokens if cached else max(cfg.buffer_tokens // p, 2),
            seed=cfg.seed + self.epoch + (0 if cached else 1000 * self.layout.dp_rank),
            device=torch.device("cpu") if cached else self.device,
            dtype=torch.float32,
            columns=["row"] if cached else self.hooks,
            drop_last=True,
        )
        self._iter = iter(self._shuffler)

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        if self.cfg.cache_dir is None:
            return super().next_batch()
        rows = self._next_rows()
        b = self.cfg.batch_size // self.layout.dp_size
        mine = rows[self.layout.dp_rank * b :][:b]
        x = read_rows(self.cache, self.cfg.hook, mine).to(self.device, torch.float32)
        y = None
        if self.cfg.hook_out:
            y = read_rows(self.cache, self.cfg.hook_out, mine).to(self.device, torch.float32)
        return x, y

    def _next_rows(self) -> Tensor:
        """Row numbers ``[batch_size]`` of the next global batch (epochs as in TrainData)."""
        if self._iter is None:
            self._start_epoch()
        while True:
            try:
                batch = next(self._iter)
                break
            except StopIteration:
                if self.batch == 0:
                    raise ValueError(
                        f"the training data holds fewer than batch_size={self.cfg.batch_size} tokens"
                    ) from None
                self.epoch += 1
                self.batch = 0
                self._start_epoch()
        self.batch += 1
        return batch["row"]
