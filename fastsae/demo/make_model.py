"""Train the embedded demo model: ``python -m fastsae.demo.make_model``.

1. A byte-level BPE tokenizer (``tokenizers``, 4,096 tokens) on the corpus's train split.
2. A 3-layer, d_model=128 ``HookedTransformer`` (1.66M parameters, 6.7 MB in float32) trained for
   next-token prediction on the train split, chunked exactly as :mod:`fastsae.data.text` chunks
   text for activations (``bos="chunk"``, 128 tokens).
3. The held-out loss on the held-out chapters, against a unigram model fitted on the train split.

Everything is seeded and the batch order comes from one ``torch.Generator``; training runs on one
CPU thread, so the same seed gives the same weights, bit for bit, on the same torch and CPU
(checked on short runs; with two threads two runs were measured to differ: a parallel reduction
changes its order). The committed assets took 379 s on the 2-core CPU machine. Writes ``fastsae/demo/assets/`` atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsae.cli import add_dataclass_arguments, dataclass_from_args
from fastsae.data.text import chunk_token_stream
from fastsae.demo import corpus
from fastsae.demo.model import (
    ASSETS,
    CONFIG,
    METRICS,
    MODEL_NAME,
    TOKENIZER,
    WEIGHTS,
    hooked_config,
    wrap_tokenizer,
)
from fastsae.io import atomic_directory

__all__ = ["DemoTrainConfig", "main", "train_demo_model"]

BOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class DemoTrainConfig:
    """How the demo model is trained (the defaults made the committed assets)."""

    seed: int = 0
    """Seeds the model's initialisation and the batch order."""
    vocab_size: int = 4096
    """BPE vocabulary size, the two special tokens included."""
    n_layers: int = 3
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads (d_head = d_model / n_heads)."""
    context_size: int = 128
    """Tokens per training sequence (and n_ctx)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    steps: int = 450
    """Optimizer steps (about 1.9 epochs of the 0.95M train tokens)."""
    lr: float = 3e-3
    """Peak AdamW learning rate, after a linear warm-up, then cosine decay to lr / 10."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    threads: int = 1
    """torch CPU threads. One thread is bit-reproducible; two were measured not to be (a parallel
    reduction in the backward changes order), and gain little at this size."""
    out: str = str(ASSETS)
    """Directory the assets are written to."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.context_size < 2:
            raise ValueError(f"context_size={self.context_size} must be >= 2")


def train_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE on the train split; prepends BOS when asked for special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.documents("train"), trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _sequences(tokenizer: Any, split: str, context_size: int) -> Tensor:
    """LongTensor [n, context_size] of one split, chunked like the activation pipeline."""
    docs = [
        e.ids for e in tokenizer.encode_batch(corpus.documents(split), add_special_tokens=False)
    ]
    seqs = list(
        chunk_token_stream(docs, context_size, bos="chunk", bos_token_id=tokenizer.token_to_id(BOS))
    )
    return torch.stack(seqs)


def _lr(cfg: DemoTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, sequences: Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of ``sequences``."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        loss = model(batch, return_type="loss", loss_per_token=True)  # [b, ctx - 1]
        total += loss.double().sum().item()
        count += loss.numel()
    return total / count


def unigram_loss(train: Tensor, held_out: Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of the held-out targets under add-one-smoothed train frequencies."""
    counts = torch.bincount(train[:, 1:].reshape(-1), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[held_out[:, 1:].reshape(-1)].mean().item()


def train_demo_model(cfg: DemoTrainConfig) -> dict[str, Any]:
    """Train the tokenizer and the model and write the assets to ``cfg.out``; returns the metrics."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    tokenizer = train_tokenizer(cfg.vocab_size)
    train = _sequences(tokenizer, "train", cfg.context_size)
    held_out = _sequences(tokenizer, "held_out", cfg.context_size)
    special = {"bos_token": BOS, "eos_token": BOS, "pad_token": PAD}
    ht_config = {
        "model_name": MODEL_NAME,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_ctx": cfg.context_size,
        "d_head": cfg.d_model // cfg.n_heads,
        "n_heads": cfg.n_heads,
        "d_mlp": 4 * cfg.d_model,
        "d_vocab": cfg.vocab_size,
        "act_fn": "gelu_new",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "default_prepend_bos": True,
        "seed": cfg.seed,
    }
    model = HookedTransformer(
        hooked_config(ht_config, device="cpu"),
        tokenizer=wrap_tokenizer(tokenizer.to_str(), special),
        move_to_device=False,
    )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    model.train()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        batch = train[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, step)
        loss = model(batch, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f}s")
    model.eval()
    train_seconds = time.perf_counter() - started
    model_loss = held_out_loss(model, held_out)
    uni_loss = unigram_loss(train, held_out, cfg.vocab_size)
    metrics = {
        "held_out_loss": model_loss,
        "unigram_held_out_loss": uni_loss,
        "held_out_perplexity": math.exp(model_loss),
        "unigram_held_out_perplexity": math.exp(uni_loss),
        "held_out_tokens": int(held_out[:, 1:].numel()),
        "train_tokens": int(train.numel()),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context_size,
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": corpus.LICENCE,
        "held_out_split": f"every {corpus.HELD_OUT_EVERY}th chapter (fastsae.demo.corpus)",
        "torch": torch.__version__,
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "out"},
    }
    state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    config = {"hooked_transformer": ht_config, "tokenizer": special}
    atomic_directory(
        cfg.out,
        {
            TOKENIZER: lambda p: p.write_text(tokenizer.to_str()),
            WEIGHTS: lambda p: save_file(state, str(p)),
            METRICS: lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"),
            CONFIG: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        },
    )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.demo.make_model",
        description="Train the embedded demo tokenizer and model on the embedded corpus.",
    )
    add_dataclass_arguments(parser, DemoTrainConfig)
    cfg = dataclass_from_args(DemoTrainConfig, parser.parse_args(argv))
    metrics = train_demo_model(cfg)
    print(
        f"held-out loss {metrics['held_out_loss']:.3f} nats vs unigram "
        f"{metrics['unigram_held_out_loss']:.3f} ({metrics['train_seconds']:.0f}s) -> {Path(cfg.out)}"
    )
    return metrics


if __name__ == "__main__":
    main()
