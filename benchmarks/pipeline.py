"""End-to-end cases over the activation pipeline: the shuffler's throughput and a short real
training run on the embedded model.

They are hook points for :mod:`fastsae.data` and :mod:`fastsae.demo`. When those cannot be
imported, or the embedded model's assets or corpus package are missing, the case is recorded as
skipped with the reason (never as a crash). Once they import, any exception is a real failure.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from benchmarks.harness import Case, Unavailable

# Shuffler shapes: rows streamed through a buffer of BUFFER rows, served in batches of B.
SHUFFLER = {
    "smoke": {"rows": 16384, "d": 64, "B": 256, "buffer": 4096, "chunk": 1024},
    "full": {"rows": 262144, "d": 768, "B": 4096, "buffer": 65536, "chunk": 8192},
}
# Demo run: the whole of SEQS sequences of the embedded corpus goes through the model, the shuffler
# and SAE steps of B tokens (a tiny-cpu-like SAE); MODEL_BATCH sequences per model forward.
DEMO = {
    "smoke": {"seqs": 16, "B": 512, "d_sae": 1024, "k": 16, "buffer": 1024, "model_batch": 8},
    "full": {"seqs": 256, "B": 2048, "d_sae": 2048, "k": 16, "buffer": 8192, "model_batch": 32},
}


def _import_shuffler():
    try:
        from fastsae.data import ActivationShuffler
    except ImportError as exc:
        raise Unavailable(f"fastsae.data.ActivationShuffler is not importable: {exc}") from None
    return ActivationShuffler


def shuffler_throughput(B: int, d: int) -> Case:
    """Rows per second through ``ActivationShuffler`` (fill thread, seeded permutations, batch
    gathers) from an in-memory source, against the floor of a buffered shuffle: copy the rows into
    a buffer once, then gather them out in a random order."""
    suite = "full" if B >= 4096 else "smoke"
    s = SHUFFLER[suite]
    g = torch.Generator().manual_seed(4)
    data = torch.randn(s["rows"], s["d"], generator=g)
    shapes = {"rows": s["rows"], "d": s["d"], "B": s["B"], "buffer": s["buffer"]}
    common = dict(
        name="shuffler_throughput",
        mode="throughput",
        shapes=shapes,
        # every row is written into the buffer and gathered out of it: 2 reads + 2 writes
        bytes=4 * s["rows"] * s["d"] * 4,
        baseline="floor(copy+gather)",
        items=s["rows"],
        items_unit="rows",
    )
    try:
        ActivationShuffler = _import_shuffler()
    except Unavailable as exc:
        return Case(
            providers={},
            skipped={"fastsae-shuffler": str(exc), "floor(copy+gather)": str(exc)},
            **common,
        )

    def chunks():
        for start in range(0, s["rows"], s["chunk"]):
            yield {"x": data[start : start + s["chunk"]]}

    def shuffler():
        served = 0
        with ActivationShuffler(
            chunks(), batch_size=s["B"], buffer_tokens=s["buffer"], seed=0
        ) as batches:
            for batch in batches:
                served += batch["x"].shape[0]
        if served != s["rows"]:
            raise RuntimeError(f"the shuffler served {served} rows of {s['rows']}")

    buffer = torch.empty_like(data)

    def floor():
        buffer.copy_(data)
        order = torch.randperm(s["rows"], generator=g)
        for start in range(0, s["rows"], s["B"]):
            buffer.index_select(0, order[start : start + s["B"]])

    return Case(providers={"fastsae-shuffler": shuffler, "floor(copy+gather)": floor}, **common)


def _demo_pieces() -> dict[str, Any]:
    """The activation pipeline's public pieces, or :class:`Unavailable` saying what is missing."""
    try:
        from fastsae.data import ActivationShuffler, open_source, text
    except ImportError as exc:
        raise Unavailable(f"fastsae.data is not importable: {exc}") from None
    try:
        import fastsae.demo  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"fastsae.demo is not importable: {exc}") from None
    try:
        opened = open_source()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise Unavailable(f"the embedded model is not available: {exc}") from None
    try:
        rows = text.load_rows()
    except ModuleNotFoundError as exc:
        raise Unavailable(f"the embedded corpus is not available: {exc}") from None
    return {"shuffler": ActivationShuffler, "opened": opened, "text": text, "rows": rows}


def demo_training_run(suite: str) -> Case:
    """Tokens per second of a short real run: the embedded model produces the activations of a
    fixed set of sequences, the shuffler mixes them, ``Trainer.step`` trains a TopK SAE on every
    full batch. Against the model's forward passes alone over the same sequences (the part a live
    pipeline cannot avoid)."""
    s = DEMO[suite]
    common = dict(
        name="demo_training_run",
        mode="step",
        baseline="lm-forward-only",
        notes="embedded model, its default hook; a fresh Trainer and shuffler per call",
        repeats=3,
    )
    try:
        pieces = _demo_pieces()
    except Unavailable as exc:
        reason = str(exc)
        return Case(
            shapes={"seqs": s["seqs"], "B": s["B"], "n": s["d_sae"], "k": s["k"]},
            providers={},
            skipped={"fastsae-demo-train": reason, "lm-forward-only": reason},
            **common,
        )
    from fastsae.train import TrainConfig, Trainer

    opened, text = pieces["opened"], pieces["text"]
    source = opened.source
    hook = source.hooks[0]
    d_in = source.dims[hook]
    context = min(opened.context_size, 128)
    # tokenized once, outside the timed calls
    seqs = list(
        itertools.islice(text.token_sequences(pieces["rows"], opened.tokenizer, context), s["seqs"])
    )

    def forward_only() -> int:
        return sum(
            chunk[hook].shape[0]
            for chunk in source.stream(text.token_batches(seqs, s["model_batch"]))
        )

    rows = forward_only()  # untimed: how many activation rows the sequences give
    steps = rows // s["B"]
    if steps < 1:
        raise RuntimeError(f"{s['seqs']} sequences give {rows} rows < one batch of {s['B']}")

    def train() -> None:
        cfg = TrainConfig(
            d_in=d_in,
            d_sae=s["d_sae"],
            k=s["k"],
            batch_size=s["B"],
            buffer_tokens=s["buffer"],
            total_tokens=steps * s["B"],
            device=str(source.device),
            warmup_steps=0,
            progress=False,
        )
        trainer = Trainer(cfg)
        with pieces["shuffler"].from_source(
            source,
            text.token_batches(seqs, s["model_batch"]),
            batch_size=s["B"],
            buffer_tokens=s["buffer"],
            drop_last=True,
        ) as stream:
            for batch in stream:
                trainer.step(batch[hook])
        if trainer.step_count != steps:
            raise RuntimeError(f"trained {trainer.step_count} steps, expected {steps}")

    return Case(
        shapes={"seqs": s["seqs"], "B": s["B"], "d": d_in, "n": s["d_sae"], "k": s["k"]},
        providers={"fastsae-demo-train": train, "lm-forward-only": forward_only},
        # the SAE part of the cost model (TopK steps), for the roofline column
        flops=steps * (2 * s["B"] * d_in * s["d_sae"] + 8 * s["B"] * s["k"] * d_in),
        # the LM forward is outside the SAE cost model: no roofline for it
        provider_cost={"lm-forward-only": (0.0, 0.0)},
        items=steps * s["B"],
        **common,
    )
