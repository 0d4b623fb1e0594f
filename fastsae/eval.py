"""``python -m fastsae.eval DIR``: evaluate a saved SAE on held-out tokens of its model.

Reads the SAE (fastsae, SAELens or sparsify directory), opens the model and hook recorded in its
``cfg.json`` (``--model`` / ``--hook`` override; the embedded demo model by default), and prints
the same metrics as training's final evaluation as JSON: MSE, FVU, explained variance, L0,
dead %, and the CE-loss and KL scores with the SAE spliced into the model.
"""

from __future__ import annotations

import argparse
import json
import sys

import fastsae
from fastsae.data.text import EMBEDDED
from fastsae.demo.model import MODEL_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.eval", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sae_dir", help="directory of a saved SAE")
    parser.add_argument(
        "--model", help="model (default: the one in cfg.json, else the embedded model)"
    )
    parser.add_argument("--hook", help="input hook (default: cfg.json's hook_name)")
    parser.add_argument("--hook-out", help="output hook for transcoders")
    parser.add_argument("--dataset", help="text (default: the embedded corpus's held-out split)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from fastsae.evaluate import model_scores, reconstruction_metrics
    from fastsae.train.config import TrainConfig
    from fastsae.train.data import TrainData
    from fastsae.train.trainer import resolve_device

    try:
        sae = fastsae.load(args.sae_dir)
        hook = args.hook or sae.cfg.hook_name
        if not hook:
            raise ValueError(f"{args.sae_dir}: cfg.json names no hook_name; pass --hook")
        model = args.model or sae.cfg.model_name or EMBEDDED
        if model == MODEL_NAME:
            model = EMBEDDED
        cfg = TrainConfig(
            architecture=sae.cfg.architecture, d_sae=sae.d_sae,
            k=sae.cfg.k if sae.cfg.k is not None else None,
            model=model, hook=hook, hook_out=args.hook_out or sae.cfg.hook_name_out,
            dataset=args.dataset, eval_tokens=args.eval_tokens, device=args.device,
            batch_size=1, buffer_tokens=2, progress=False,
        )  # fmt: skip
        device = resolve_device(args.device)
        data = TrainData(cfg, device=device)
        sae = sae.to(device).eval()
        metrics = reconstruction_metrics(sae, data.eval_batches())
        if data.is_transformer_lens:
            metrics.update(
                model_scores(sae, data.model, data.eval_tokens(), hook, hook_out=cfg.hook_out)
            )
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
