"""``python -m fastsae.dashboard SAE_DIR --out DIR [--tokens N] [--dataset ...] [--model ...]``.

Loads the SAE (any directory :func:`fastsae.load` reads), opens its model (the embedded demo
model unless ``--model`` says otherwise), reads ``--tokens`` tokens of ``--dataset`` (default: the
embedded corpus) and writes the static site. ``--help`` lists every flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastsae.cli import add_dataclass_arguments, dataclass_from_args
from fastsae.dashboard.build import DashboardConfig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.dashboard", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "sae_dir", metavar="SAE_DIR", help="an SAE directory (fastsae, SAELens or sparsify)"
    )
    add_dataclass_arguments(parser, DashboardConfig)
    args = parser.parse_args(argv)
    try:
        cfg = dataclass_from_args(DashboardConfig, args)
    except ValueError as e:
        parser.error(str(e))

    import fastsae
    from fastsae.dashboard import build_dashboard
    from fastsae.data import text
    from fastsae.data.models import open_source
    from fastsae.demo.model import MODEL_NAME

    sae = fastsae.load(args.sae_dir).to(cfg.device)
    hook = sae.cfg.hook_name
    if hook is None:
        parser.error(f"{args.sae_dir}: cfg.json names no hook (metadata.hook_name)")
    model = cfg.model
    if model is None and sae.cfg.model_name not in (None, MODEL_NAME, "embedded"):
        model = sae.cfg.model_name
    opened = open_source(model, [hook], kind=cfg.model_kind, device=cfg.device)
    context = min(cfg.context_size, opened.context_size)
    rows = text.load_rows(cfg.dataset, split=cfg.split, streaming=cfg.dataset is not None)
    sequences = text.token_sequences(rows, opened.tokenizer, context)
    meta = {
        "sae_name": Path(args.sae_dir).resolve().name,
        "model": opened.name,
        "dataset": cfg.dataset or f"the embedded corpus ({cfg.split})",
    }
    index = build_dashboard(
        sae,
        opened.source,
        opened.tokenizer,
        text.token_batches(sequences, cfg.batch_size),
        cfg,
        hook=hook,
        meta=meta,
    )
    if cfg.neuronpedia:
        from fastsae.analysis.neuronpedia import export

        export(Path(cfg.out) / "data", Path(cfg.out) / "neuronpedia")
    print(f"dashboard: {index}")
    return index


if __name__ == "__main__":
    main(sys.argv[1:])
