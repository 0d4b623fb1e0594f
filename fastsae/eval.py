"""``python -m fastsae.eval DIR``: evaluate a saved SAE on held-out tokens of its model.

Reads the SAE (fastsae, SAELens or sparsify directory) and evaluates it on the data it was trained
on: a run of ``python -m fastsae.train`` records its model, hook, dataset (or activation cache),
context size and held-out size in ``cfg.json`` (``metadata.fastsae_data``), so the evaluation
uses the same held-out tokens as the run's final evaluation. ``--model``, ``--hook``,
``--dataset`` override; an SAE that records no data needs ``--dataset`` unless its model is the
embedded demo model (whose data is the embedded corpus). What was used is printed to stderr; the
metrics go to stdout as JSON: MSE, FVU, explained variance, L0, dead %, and the CE-loss and KL
scores with the SAE spliced into the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import fastsae
from fastsae.data.text import EMBEDDED
from fastsae.demo.model import MODEL_NAME


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastsae.eval", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sae_dir", help="directory of a saved SAE")
    parser.add_argument("--model", help="model (default: the one recorded with the SAE)")
    parser.add_argument("--hook", help="input hook (default: cfg.json's hook_name)")
    parser.add_argument("--hook-out", help="output hook for transcoders")
    parser.add_argument(
        "--dataset",
        help="text: a local file, a HF dataset name or 'embedded' (default: the data recorded "
        "with the SAE)",
    )
    parser.add_argument(
        "--eval-tokens", type=int, help="held-out tokens (default: the training run's, else 16384)"
    )
    parser.add_argument("--device", default="auto")
    return parser


def _data_settings(args: argparse.Namespace, sae) -> dict:
    """TrainConfig fields that pick the evaluation data: the flags, else what the SAE records."""
    recorded = sae.cfg.metadata.get("fastsae_data") or {}
    model = args.model or sae.cfg.model_name or recorded.get("model") or EMBEDDED
    if model == MODEL_NAME:
        model = EMBEDDED
    settings = {
        "model": model,
        "hook": args.hook or sae.cfg.hook_name or recorded.get("hook"),
        "hook_out": args.hook_out or sae.cfg.hook_name_out,
        "eval_tokens": args.eval_tokens or recorded.get("eval_tokens") or 16384,
        "context_size": recorded.get("context_size") or 128,
        "model_batch_size": recorded.get("model_batch_size") or 32,
        "dataset": None,
        "cache_dir": None,
    }
    if not settings["hook"]:
        raise ValueError(f"{args.sae_dir}: cfg.json names no hook_name; pass --hook")
    if args.dataset is not None:
        settings["dataset"] = None if args.dataset == EMBEDDED else args.dataset
    elif recorded.get("cache_dir") and not args.model:
        if not Path(recorded["cache_dir"]).is_dir():
            raise ValueError(
                f"{args.sae_dir} was trained on the activation cache {recorded['cache_dir']}, "
                "which is gone; pass --dataset (and --model) to evaluate on text"
            )
        settings["cache_dir"] = recorded["cache_dir"]
    elif recorded.get("dataset"):
        settings["dataset"] = None if recorded["dataset"] == EMBEDDED else recorded["dataset"]
    elif model != EMBEDDED:
        raise ValueError(
            f"{args.sae_dir} does not record the data it was trained on (model {model!r}); pass "
            "--dataset (a local text file, a HF dataset name, or 'embedded')"
        )
    return settings


def _describe(settings: dict) -> str:
    if settings["cache_dir"]:
        data = f"the activation cache {settings['cache_dir']} (its first rows, held out)"
    elif settings["dataset"] is None:
        data = "the embedded corpus (its held-out split)"
    else:
        data = f"dataset {settings['dataset']} (its first {settings['eval_tokens']} tokens)"
    where = "" if settings["cache_dir"] else f"model {settings['model']}, "
    return f"evaluating on {where}hook {settings['hook']}, {data}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from fastsae.evaluate import model_scores, reconstruction_metrics
    from fastsae.train.config import TrainConfig
    from fastsae.train.data import TrainData
    from fastsae.train.trainer import resolve_device

    try:
        sae = fastsae.load(args.sae_dir)
        settings = _data_settings(args, sae)
        print(_describe(settings), file=sys.stderr)
        cfg = TrainConfig(
            architecture=sae.cfg.architecture, d_sae=sae.d_sae,
            k=sae.cfg.k if sae.cfg.k is not None else None,
            device=args.device, batch_size=1, buffer_tokens=2, progress=False, **settings,
        )  # fmt: skip
        device = resolve_device(args.device)
        data = TrainData(cfg, device=device)
        sae = sae.to(device).eval()
        metrics = reconstruction_metrics(sae, data.eval_batches())
        if data.is_transformer_lens:
            metrics.update(
                model_scores(sae, data.model, data.eval_tokens(), cfg.hook, hook_out=cfg.hook_out)
            )
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
