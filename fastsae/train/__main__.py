"""``python -m fastsae.train [--preset NAME] [--config FILE] [--resume DIR] [--flag value ...]``.

Settings are applied in order: the defaults (the ``tiny-cpu`` preset: a TopK SAE on the embedded
model and corpus), ``--preset``, ``--config`` (JSON or YAML), then the flags. ``--resume DIR``
continues a run from its newest checkpoint (or from a checkpoint directory) with the saved config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from fastsae.cli import add_dataclass_arguments, dataclass_from_args
from fastsae.train.config import PRESETS, TrainConfig, load_config_file


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: ...`` and exit status 2, without the usage block
    (the usage of every generated flag runs to dozens of lines; ``--help`` has it all)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m fastsae.train",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named preset applied first")
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of TrainConfig fields")
    parser.add_argument("--resume", metavar="DIR", help="run or checkpoint directory to continue")
    parser.add_argument(
        "--sweep",
        metavar="FILE|NAME",
        help="train a group of SAEs on one activation stream: a sweep YAML/JSON file or a named "
        "sweep (default); a comma list on any flag (--k 16,32) also makes a grid",
    )
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="N",
        help="leave with a checkpoint after N steps in this session (resume with --resume)",
    )
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults -> preset -> config file -> flags (or the checkpoint's config with --resume)."""
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ValueError(f"--stop-after-steps {args.stop_after_steps} must be >= 1")
    if args.resume:
        from fastsae.parallel.checkpoint import is_sharded, read_meta
        from fastsae.train.checkpoint import read_checkpoint
        from fastsae.train.run import resolve_resume

        for flag, value in (("--preset", args.preset), ("--config", args.config)):
            if value:
                raise ValueError(f"{flag} cannot be combined with --resume: a resumed run keeps "
                                 "the config saved in its checkpoint")  # fmt: skip
        path = resolve_resume(args.resume)
        meta = read_meta(path) if is_sharded(path) else read_checkpoint(path)[0]
        base = TrainConfig.from_dict(meta["config"])
    else:
        values: dict = dict(PRESETS[args.preset]) if args.preset else {}
        if args.config:
            values.update(load_config_file(args.config))
        base = TrainConfig.from_dict(values)
    return dataclass_from_args(TrainConfig, args, base=base)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 130 interrupted (checkpoint written), 2 bad input (one ``error:``
    line, before anything loads where it can be), 1 a failure while running (non-finite loss,
    out of memory, a write that failed)."""
    from fastsae.train.sweep import main_sweep, split_grid_flags, wants_sweep

    parser = build_parser()
    try:
        argv, grid = split_grid_flags(sys.argv[1:] if argv is None else list(argv))
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    if wants_sweep(args, grid):
        return main_sweep(parser, args, grid)
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    from fastsae.parallel.mesh import PeerFailure
    from fastsae.train.run import run
    from fastsae.train.trainer import NonFiniteLossError

    try:
        result = run(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, MemoryError, OSError, PeerFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["status"] == "interrupted":
        return 130
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports for every rank
        return 0
    print(
        f"\nsaved SAE to {result['sae_dir']} (SAELens v6 format; loads with fastsae.load or "
        "sae_lens.SAE.load_from_disk)"
    )
    for key in ("fvu", "explained_variance", "l0", "dead_pct", "ce_loss_score", "kl_score"):
        if key in result:
            print(f"  {key:20s} {result[key]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
