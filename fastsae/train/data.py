"""Training data for ``python -m fastsae.train``: shuffled activation batches, held-out evaluation
data, and a position that makes resuming exact.

The stream is a sequence of *epochs* over the training tokens (a live model over the text, or an
activation cache). Epoch ``e`` is one :class:`~fastsae.data.ActivationShuffler` pass seeded with
``seed + e``, so the batches are a pure function of ``(seed, epoch, batch index)``. The position
``{"epoch", "batch"}`` is saved in every checkpoint; resuming rebuilds that epoch's shuffler and
skips the batches already used (for a live model this recomputes their activations: exact, at
the price of the model's forward passes).

One model, one user at a time: the shuffler's fill thread runs the model in the background while
training steps, and an evaluation runs it too (and splices hooks into it). Every model call holds
:attr:`TrainData.model_lock`, so evaluation and data never share the model concurrently (a
shared model mixed hooks across threads: wrong activations, nondeterminism, shape errors).

Held out: for the embedded corpus, its ``held_out`` split (chapters the model never saw); for
other text, the first ``eval_tokens`` of the stream, which are then left out of training; for a
cache, its first ``eval_tokens`` rows, likewise left out.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from fastsae.train.config import TrainConfig

__all__ = ["TrainData", "open_data"]


class TrainData:
    """Batches ``(x [B, d_in], y [B, d_out] or None)`` and evaluation data for one run."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        device: torch.device,
        log=print,
        extra_hooks: Sequence[str] = (),
    ):
        self.cfg = cfg
        self.device = device
        self.log = log
        self.epoch = 0
        self.batch = 0
        self._shuffler = None
        self._iter: Iterator | None = None
        self.model = None
        self.is_transformer_lens = False
        #: Held by every model call (the fill thread's and evaluation's); see the module docstring.
        self.model_lock = threading.RLock()
        self.hooks = [cfg.hook] + ([cfg.hook_out] if cfg.hook_out else [])
        for hook in extra_hooks:  # a group of SAEs reads several hooks of one pass
            if hook not in self.hooks:
                self.hooks.append(hook)
        if cfg.cache_dir is not None:
            self._open_cache()
        else:
            self._open_model()

    # -- sources -----------------------------------------------------------------------------------

    def _open_cache(self) -> None:
        from fastsae.data import ActivationCache

        cfg = self.cfg
        self.cache = ActivationCache(cfg.cache_dir, verify="open")  # every sha256 before step 1
        missing = [h for h in self.hooks if h not in self.cache.hooks]
        if missing:
            from fastsae.data.sources import unknown_hook_error

            raise unknown_hook_error(missing, list(self.cache.hooks), "hook in the cache")
        dims = self.dims = dict(self.cache.dims)
        self.d_in = dims[cfg.hook]
        self.d_out = dims[cfg.hook_out] if cfg.hook_out else None
        self.model_name = self.cache.manifest.get("model")
        self._eval_stop = min(cfg.eval_tokens, len(self.cache) // 2)
        if len(self.cache) - self._eval_stop < cfg.batch_size:
            raise ValueError(
                f"cache {cfg.cache_dir} holds {len(self.cache)} tokens; batch_size={cfg.batch_size} "
                f"plus {self._eval_stop} held-out tokens do not fit"
            )

    def _open_model(self) -> None:
        from fastsae.data import open_source, text

        cfg = self.cfg
        embedded = cfg.model == "embedded"
        opened = open_source(None if embedded else cfg.model, self.hooks, device=str(self.device))
        self.opened = opened
        self.source = opened.source
        self.model_name = opened.name
        self.model = getattr(self.source, "model", None)
        self.is_transformer_lens = type(self.source).__name__ == "TransformerLensSource"
        dims = self.dims = dict(self.source.dims)
        self.d_in = dims[cfg.hook]
        self.d_out = dims[cfg.hook_out] if cfg.hook_out else None
        self.context_size = min(cfg.context_size, opened.context_size)
        if embedded or cfg.dataset is None:
            self._eval_seqs = self._sequences(text.load_rows(cfg.dataset, split="held_out"))
            self._skip_sequences = 0
        else:
            n_eval = math.ceil(cfg.eval_tokens / self.context_size)
            self._eval_seqs = self._sequences(text.load_rows(cfg.dataset), limit=n_eval)
            self._skip_sequences = len(self._eval_seqs)

    def _sequences(self, rows, limit: int | None = None) -> list[Tensor]:
        from fastsae.data import text

        out = []
        for seq in text.token_sequences(rows, self.opened.tokenizer, self.context_size):
            out.append(seq)
            if limit is not None and len(out) >= limit:
                break
        return out

    def _epoch_chunks(self):
        from fastsae.data import text

        cfg = self.cfg
        if cfg.cache_dir is not None:
            return self.cache.chunks(self.hooks, start=self._eval_stop)
        rows = text.load_rows(cfg.dataset, split="train")
        seqs = text.token_sequences(rows, self.opened.tokenizer, self.context_size)
        if self._skip_sequences:
            seqs = (s for i, s in enumerate(seqs) if i >= self._skip_sequences)
        return self._locked(self.source.stream(text.token_batches(seqs, cfg.model_batch_size)))

    def _locked(self, chunks: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """``chunks``, each one computed while holding :attr:`model_lock`."""
        iterator = iter(chunks)
        while True:
            with self.model_lock:
                try:
                    chunk = next(iterator)
                except StopIteration:
                    return
            yield chunk

    def using_model(self) -> threading.RLock:
        """Hold the model for the duration of a ``with`` block (evaluation): the fill thread
        waits until it ends (a cache has no model; nothing waits)."""
        return self.model_lock

    def _start_epoch(self) -> None:
        from fastsae.data import ActivationShuffler

        self.close()
        cfg = self.cfg
        self._shuffler = ActivationShuffler(
            self._epoch_chunks(),
            batch_size=cfg.batch_size,
            buffer_tokens=cfg.buffer_tokens,
            seed=cfg.seed + self.epoch,
            device=self.device,
            dtype=torch.float32,
            columns=self.hooks,
            drop_last=True,
        )
        self._iter = iter(self._shuffler)

    # -- the training stream -----------------------------------------------------------------------

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        batch = self.next_columns()
        x = batch[self.cfg.hook]
        y = batch[self.cfg.hook_out] if self.cfg.hook_out else None
        # A CUDA batch is a view of a reused buffer; the step consumes it before the next call.
        return x, y

    def next_columns(self) -> dict[str, Tensor]:
        """The next shuffled batch: ``{hook: [B, d_hook]}`` for every hook in :attr:`hooks`."""
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
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off (see the module docstring)."""
        self.epoch = int(state.get("epoch", 0))
        target = int(state.get("batch", 0))
        self.batch = 0
        self._start_epoch()
        for _ in range(target):
            next(self._iter)
            self.batch += 1

    # -- evaluation --------------------------------------------------------------------------------

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Held-out ``(x [n, d_in], y [n, d_out] or None)`` chunks at ``cfg.hook`` / ``hook_out``."""
        cfg = self.cfg
        for chunk in self.eval_columns():
            yield chunk[cfg.hook], chunk[cfg.hook_out] if cfg.hook_out else None

    def eval_columns(self) -> Iterator[dict[str, Tensor]]:
        """Held-out chunks ``{hook: [n, d_hook]}`` (float32) for every hook in :attr:`hooks`:
        one cache read, or one model pass per chunk, serves every hook (a sweep evaluates all its
        members from one pass). About ``eval_tokens`` rows in all."""
        cfg = self.cfg
        if cfg.cache_dir is not None:
            for chunk in self.cache.chunks(self.hooks, start=0, stop=self._eval_stop):
                yield {h: chunk[h].float() for h in self.hooks}
            return
        from fastsae.data import text

        seen = 0
        for tokens in text.token_batches(self._eval_seqs, cfg.model_batch_size):
            with self.model_lock:
                acts = self.source.activations(tokens)
            yield {h: acts[h].float() for h in self.hooks}
            seen += acts[self.hooks[0]].shape[0]
            if seen >= cfg.eval_tokens:
                return

    def eval_tokens(self) -> Tensor:
        """``[n_seq, ctx]`` held-out token sequences (about ``eval_tokens`` tokens)."""
        n = max(1, math.ceil(self.cfg.eval_tokens / self.context_size))
        return torch.stack(self._eval_seqs[:n])

    def record(self) -> dict[str, Any]:
        """What the SAE was trained on, kept in its ``cfg.json`` (``metadata.fastsae_data``) so
        that ``python -m fastsae.eval`` evaluates on the same held-out data."""
        cfg = self.cfg
        return {
            "model": None if cfg.cache_dir is not None else cfg.model,
            "hook": cfg.hook,
            "hook_out": cfg.hook_out,
            "dataset": None if cfg.cache_dir is not None else (cfg.dataset or "embedded"),
            "cache_dir": cfg.cache_dir,
            "context_size": getattr(self, "context_size", cfg.context_size),
            "eval_tokens": cfg.eval_tokens,
            "model_batch_size": cfg.model_batch_size,
        }

    def close(self) -> None:
        if self._shuffler is not None:
            self._shuffler.close()
            self._shuffler = None
            self._iter = None


def open_data(
    cfg: TrainConfig, *, device: torch.device, log=print, extra_hooks: Sequence[str] = ()
) -> TrainData:
    return TrainData(cfg, device=device, log=log, extra_hooks=extra_hooks)
