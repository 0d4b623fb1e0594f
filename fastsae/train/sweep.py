"""Sweeps: many SAEs described at once, as a YAML/JSON file, a named preset or grid flags.

``python -m fastsae.train --sweep sweep.yaml`` or ``python -m fastsae.train --d-sae 1024,4096
--k 16,32`` expand to a list of :class:`Member` s (one ``TrainConfig`` each) that
:mod:`fastsae.train.group` trains on one activation stream.

A sweep file::

    base:            # TrainConfig fields every member shares (flags on the command line win)
      total_tokens: 500000
    grid:            # the Cartesian product of these lists, one member per combination
      d_sae: [1024, 4096]
      k: [16, 32]
    members:         # and/or an explicit list; each entry overrides base (``name`` optional)
      - {architecture: batchtopk, d_sae: 4096, k: 32, name: btk}

A grid flag is any scalar ``TrainConfig`` flag given a comma-separated list (``--k 16,32,64``);
it replaces the file's grid entry for that field. Every value is converted and every member
validated before anything is loaded; an error names the flag (or the file key) and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsae.cli import _base_type, _bool
from fastsae.train.config import PRESETS, TrainConfig, load_config_file

__all__ = [
    "SHARED_FIELDS",
    "SWEEP_PRESETS",
    "Member",
    "SweepSpec",
    "expand",
    "load_sweep",
    "split_grid_flags",
]

#: Fields every member must share: they define the one activation stream and the group's loop.
SHARED_FIELDS = (
    "model",
    "dataset",
    "cache_dir",
    "context_size",
    "buffer_tokens",
    "model_batch_size",
    "batch_size",
    "eval_tokens",
    "device",
    "checkpoint_every_tokens",
    "out_dir",
    "progress",
    "wandb",
    "group_gemm",
)

#: Named sweeps (``--sweep NAME``). ``default``: eight TopK/BatchTopK SAEs on the embedded model,
#: a few minutes on two CPU cores, enough points for a Pareto plot.
SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "base": {
            "total_tokens": 150_000,
            "batch_size": 1024,
            "buffer_tokens": 8192,
            "warmup_steps": 10,
            "eval_tokens": 4096,
            "log_every": 10,
        },
        # d_sae 256 and 1024 (8x the model's d 128 at most): at 150k tokens a 2048-wide SAE was
        # still worse than a 512-wide one at every k (2026-12-02), and costs twice a 1024 one
        "grid": {"d_sae": [256, 1024], "k": [8, 16, 32]},
        "members": [
            {"architecture": "batchtopk", "d_sae": 1024, "k": 16, "name": "batchtopk-1024-k16"},
            {"architecture": "batchtopk", "d_sae": 1024, "k": 32, "name": "batchtopk-1024-k32"},
        ],
    },
}

_SHORT = {"d_sae": "n", "architecture": ""}


@dataclass
class Member:
    """One SAE of a sweep: its name (its directory under ``OUT/members``) and its config."""

    name: str
    cfg: TrainConfig


@dataclass
class SweepSpec:
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    members: list[dict[str, Any]]


def _field_types() -> dict[str, tuple[type, bool]]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def _convert(field: str, text: str, where: str) -> Any:
    kind, is_list = _field_types()[field]
    if text.lower() in ("none", "null") and _optional(field):
        return None
    convert = _bool if kind is bool else kind if kind in (int, float, str) else str
    try:
        return convert(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(
            f"{where}: {text!r} is not a valid {getattr(kind, '__name__', kind)}"
        ) from None


def _optional(field: str) -> bool:
    hint = typing.get_type_hints(TrainConfig)[field]
    return type(None) in typing.get_args(hint)


def split_grid_flags(argv: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """Take the grid flags (``--k 16,32``) out of ``argv``; returns the rest and the grid.

    Only scalar ``TrainConfig`` fields take a comma-separated list; a bad value raises a
    ValueError naming the flag (``--k: 'x' is not a valid float``)."""
    types = _field_types()
    flags = {"--" + name.replace("_", "-"): name for name, (_, is_list) in types.items()}
    rest: list[str] = []
    grid: dict[str, list[Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=")
        name = flags.get(flag)
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if name is None or value is None or "," not in value or types[name][1]:
            rest.append(arg)
            i += 1
            continue
        items = [v.strip() for v in value.split(",")]
        if any(not v for v in items):
            raise ValueError(f"{flag}: empty value in the list {value!r}")
        values = [_convert(name, v, f"{flag}") for v in items]
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"{flag}: repeated value in the list {value!r}")
        grid[name] = values
        i += 1 if eq else 2
    return rest, grid


def load_sweep(source: str) -> SweepSpec:
    """A named preset (:data:`SWEEP_PRESETS`) or a YAML/JSON sweep file."""
    if source in SWEEP_PRESETS:
        data = SWEEP_PRESETS[source]
    elif Path(source).is_file():
        data = load_config_file(source)
    else:
        raise ValueError(
            f"--sweep {source}: neither a file nor a named sweep ({', '.join(SWEEP_PRESETS)})"
        )
    unknown = sorted(set(data) - {"base", "grid", "members"})
    if unknown:
        raise ValueError(f"--sweep {source}: unknown keys {unknown}; allowed: base, grid, members")
    base = dict(data.get("base") or {})
    grid = dict(data.get("grid") or {})
    members = list(data.get("members") or [])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in [*base, *grid]:
        if key not in names:
            raise ValueError(f"--sweep {source}: {key!r} is not a TrainConfig field")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"--sweep {source}: grid.{key} must be a non-empty list")
    for i, entry in enumerate(members):
        if not isinstance(entry, dict):
            raise ValueError(f"--sweep {source}: members[{i}] must be a mapping")
        bad = sorted(set(entry) - names - {"name"})
        if bad:
            raise ValueError(f"--sweep {source}: members[{i}] has unknown fields {bad}")
    return SweepSpec(base=base, grid=grid, members=members)


def _name(overrides: dict[str, Any]) -> str:
    parts = []
    for key, value in overrides.items():
        short = _SHORT.get(key, key.replace("_", ""))
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(f"{short}{value}".replace("/", "_"))
    return "-".join(parts) or "member"


def expand(base: TrainConfig, grid: dict[str, list[Any]], members: list[dict[str, Any]]) -> list:
    """Members of the sweep: the grid's product on ``base``, then the explicit entries.

    Each member is validated (``TrainConfig.__post_init__``); an error names the member. Every
    member must agree on :data:`SHARED_FIELDS` (they read the same batches)."""
    out: list[Member] = []
    keys = list(grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    entries = [(_name(c), c) for c in combos] if grid else []
    for entry in members:
        entry = dict(entry)
        name = str(entry.pop("name", "") or _name(entry))
        entries.append((name, entry))
    if not entries:
        raise ValueError("the sweep has no members: give a grid (--k 16,32 or grid:) or members:")
    seen: set[str] = set()
    for name, overrides in entries:
        if name in seen or "/" in name or name.startswith("."):
            raise ValueError(f"member name {name!r} is repeated or not a valid directory name")
        seen.add(name)
        try:
            cfg = dataclasses.replace(base, **overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"member {name!r}: {e}") from None
        out.append(Member(name, cfg))
    for field in SHARED_FIELDS:
        values = {m.name: getattr(m.cfg, field) for m in out}
        if len({repr(v) for v in values.values()}) > 1:
            shown = ", ".join(f"{n}: {v!r}" for n, v in list(values.items())[:4])
            raise ValueError(
                f"{field} differs across members ({shown}); every member of a group reads the "
                f"same batches, so {field} must be one value"
            )
    return out


def base_config(args: argparse.Namespace, spec: SweepSpec | None) -> TrainConfig:
    """Defaults -> ``--preset`` -> ``--config`` -> the sweep's ``base`` -> the flags."""
    from fastsae.cli import dataclass_from_args

    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    if args.config:
        values.update(load_config_file(args.config))
    if spec is not None:
        values.update(spec.base)
    return dataclass_from_args(TrainConfig, args, base=TrainConfig.from_dict(values))


def wants_sweep(args: argparse.Namespace, grid: dict[str, list[Any]]) -> bool:
    """``--sweep``, a grid flag, or ``--resume`` of a group directory."""
    if args.sweep or grid:
        return True
    from fastsae.train.group import is_group_dir

    return bool(args.resume) and is_group_dir(args.resume)


def main_sweep(
    parser: argparse.ArgumentParser, args: argparse.Namespace, grid: dict[str, list[Any]]
) -> int:
    """The ``python -m fastsae.train`` path for groups; exit status 0 (every member done), 1 (a
    member failed, or the group could not start) or 130 (interrupted; resume with --resume)."""
    import json
    import sys

    from fastsae.train.group import load_group, run_group
    from fastsae.train.trainer import NonFiniteLossError

    data_seed = None
    try:
        if args.resume:
            if args.sweep or grid:
                raise ValueError("--resume of a group takes no --sweep or grid flags")
            members = load_group(args.resume)
            members = [
                Member(m.name, dataclasses.replace(m.cfg, out_dir=str(args.resume)))
                for m in members
            ]
        else:
            spec = load_sweep(args.sweep) if args.sweep else SweepSpec({}, {}, [])
            base = base_config(args, spec)
            data_seed = base.seed
            members = expand(base, {**spec.grid, **grid}, spec.members)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.print_config:
        print(json.dumps([{"name": m.name, **m.cfg.to_dict()} for m in members], indent=2))
        return 0
    print(f"sweep: {len(members)} SAEs on one activation stream: {[m.name for m in members]}")
    try:
        result = run_group(
            members,
            resume=bool(args.resume),
            stop_after_steps=args.stop_after_steps,
            data_seed=data_seed,
        )
    except (NonFiniteLossError, MemoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["status"] == "interrupted":
        return 130
    out = result["out_dir"]
    print(
        f"\n{len(members)} SAEs in {out}/members; summary: {out}/summary.md, plot: {out}/pareto.png"
    )
    print(Path(out, "summary.md").read_text())
    failed = [r["name"] for r in result["members"] if r["status"] == "failed"]
    if failed:
        print(f"failed members: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
