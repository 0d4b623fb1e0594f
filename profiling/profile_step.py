"""Profile fastsae training steps phase by phase.

    python -m profiling.profile_step                      # TopK d_in=768 d_sae=16384 k=32 B=4096
    python -m profiling.profile_step --d-sae 2048 --batch 1024 --steps 3
    python -m profiling.profile_step --source demo        # the embedded model's activations
    python -m profiling.profile_step --autocast fp32 --threads 2   # the fp32 step (issue 12)
    nsys profile -t cuda,nvtx python -m profiling.profile_step --no-torch-profiler

Runs ``--warmup`` untimed steps, then ``--steps`` steps of the real ``Trainer.step`` under
``torch.profiler``, with a named range (NVTX + ``record_function`` + a timer, see
:mod:`profiling.ranges`) around every phase:

``fetch_batch``            waiting for the next batch from the shuffler (main thread)
``train_step``             one whole ``Trainer.step``
``sae.forward+loss``       the SAE's forward and loss, containing
  ``encode+topk``          the encoder and the top-k selection (and AuxK's dead-latent top-k)
  ``decode``               the sparse decode (and AuxK's decode)
``sae.backward``           autograd through the sparse kernels
``optimizer``              decoder-gradient projection and Adam
``bookkeeping``            decoder renormalisation and the firing statistics
``weight average``         folding the weights into the average (every t / (16 (gamma + 1)) steps)
``fastsae.shuffler.fill``  the shuffler's fill thread writing source rows into its buffer
``fastsae.shuffler.gather`` its batch thread gathering a batch

Writes ``<out>/trace.json`` (open it in https://ui.perfetto.dev or chrome://tracing) and prints a
table of time per phase and the heaviest operators. See ``docs/profiling.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as `python profiling/profile_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from profiling.ranges import Collector, instrument  # noqa: E402

#: Table rows in order: (range name, label, indent).
PHASES = [
    ("fetch_batch", "fetch batch (wait for the shuffler)", 0),
    ("train_step", "Trainer.step", 0),
    ("sae.forward+loss", "forward + loss", 1),
    ("encode+topk", "encode + top-k", 2),
    ("decode", "decode", 2),
    ("loss (derived)", "loss and the rest of the forward", 2),
    ("sae.backward", "backward", 1),
    ("optimizer", "optimizer", 1),
    ("bookkeeping", "bookkeeping", 1),
    ("weight average", "weight average", 1),
]
#: Labels of known background-thread ranges; others are listed under their own name.
BACKGROUND = {
    "fastsae.shuffler.fill": "shuffler fill (fill thread)",
    "fastsae.shuffler.gather": "shuffler gather (batch thread)",
}


def _synthetic_batches(args, d_in: int, device: str) -> tuple[Iterator[Any], Any]:
    """Random activations streamed through the ActivationShuffler (or, without the data
    pipeline, the same tensor every step)."""
    rows = (args.warmup + args.steps) * args.batch + args.buffer_tokens
    g = torch.Generator().manual_seed(0)
    chunk = 8192

    def chunks():
        for start in range(0, rows, chunk):
            yield {"x": torch.randn(min(chunk, rows - start), d_in, generator=g)}

    try:
        from fastsae.data import ActivationShuffler
    except ImportError:
        x = torch.randn(args.batch, d_in, generator=g).to(device)
        print("fastsae.data is not importable: every step reuses one random batch")
        return itertools.repeat(x), None
    shuffler = ActivationShuffler(
        chunks(), batch_size=args.batch, buffer_tokens=args.buffer_tokens, device=device
    )
    return (batch["x"] for batch in shuffler), shuffler


def _demo_batches(args, device: str) -> tuple[Iterator[Any], Any, int]:
    from fastsae.data import ActivationShuffler, open_source, text

    opened = open_source(device=device)
    hook = opened.source.hooks[0]
    seqs = text.token_sequences(text.load_rows(), opened.tokenizer, min(opened.context_size, 128))
    shuffler = ActivationShuffler.from_source(
        opened.source,
        text.token_batches(seqs, 32),
        batch_size=args.batch,
        buffer_tokens=args.buffer_tokens,
        device=device,
        drop_last=True,
    )
    return (batch[hook] for batch in shuffler), shuffler, opened.source.dims[hook]


def _table(collector: Collector, steps: int, wall_s: float) -> str:
    totals = collector.totals()

    def total(kind: str, name: str) -> tuple[float, int]:
        times = totals.get((kind, name), [])
        return sum(times), len(times)

    forward, _ = total("main", "sae.forward+loss")
    encode, _ = total("main", "encode+topk")
    decode, _ = total("main", "decode")
    step_total, _ = total("main", "train_step")
    lines = [
        f"{'phase':40s} {'total s':>9s} {'per step ms':>12s} {'% of steps':>10s} {'calls':>6s}",
        "-" * 81,
    ]
    for name, label, indent in PHASES:
        if name == "loss (derived)":
            seconds, calls = max(0.0, forward - encode - decode), steps
        else:
            seconds, calls = total("main", name)
        if not calls:
            continue
        share = f"{seconds / step_total:10.1%}" if step_total else ""
        lines.append(
            f"{'  ' * indent + label:40s} {seconds:9.3f} {seconds / steps * 1e3:12.2f} "
            f"{share} {calls:6d}"
        )
    for name in sorted(n for kind, n in totals if kind == "background"):
        label = BACKGROUND.get(name, name)
        seconds, calls = total("background", name)
        if calls:
            lines.append(
                f"{label:40s} {seconds:9.3f} {seconds / steps * 1e3:12.2f} {'(overlaps)':>10s} "
                f"{calls:6d}"
            )
    lines.append("-" * 81)
    lines.append(
        f"{'wall time of the profiled steps':40s} {wall_s:9.3f} {wall_s / steps * 1e3:12.2f}"
    )
    return "\n".join(lines)


def _merge_background(trace: Path, collector: Collector) -> int:
    """Add the background threads' ranges to the exported Chrome trace."""
    data = json.loads(trace.read_text())
    events = collector.trace_events(int(data.get("baseTimeNanoseconds", 0)), os.getpid())
    data["traceEvents"].extend(events)
    trace.write_text(json.dumps(data))
    return len(events)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m profiling.profile_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before profiling")
    p.add_argument("--architecture", default="topk", help="any TrainConfig architecture")
    p.add_argument("--d-in", type=int, default=768, help="input width (synthetic source)")
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=float, default=32)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--buffer-tokens", type=int, default=None, help="default: 4 x --batch")
    p.add_argument("--backend", default="auto", help="fastsae.ops backend")
    p.add_argument(
        "--autocast",
        default="auto",
        choices=("auto", "fp32", "none", "bf16"),
        help="TrainConfig.autocast (auto: what a run on this device gets; fp32 for the fp32 step)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--source",
        choices=("synthetic", "demo"),
        default="synthetic",
        help="random activations, or the embedded model's",
    )
    p.add_argument("--out", type=Path, default=Path("runs/profile"), help="trace directory")
    p.add_argument("--top", type=int, default=12, help="operators listed by self time")
    p.add_argument(
        "--sync",
        action="store_true",
        help="synchronize CUDA at the end of every range (true per-phase GPU times)",
    )
    p.add_argument(
        "--no-torch-profiler",
        action="store_true",
        help="NVTX ranges and the table only (for nsys / ncu, which bring their own)",
    )
    args = p.parse_args(argv)
    args.buffer_tokens = args.buffer_tokens or 4 * args.batch
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from fastsae.train import TrainConfig, Trainer
    from fastsae.train.trainer import resolve_device

    device = str(resolve_device(args.device))
    if args.source == "demo":
        batches, shuffler, d_in = _demo_batches(args, device)
    else:
        d_in = args.d_in
        batches, shuffler = _synthetic_batches(args, d_in, device)
    k = int(args.k) if args.architecture == "topk" else args.k
    cfg = TrainConfig(
        architecture=args.architecture,
        d_in=d_in,
        d_sae=args.d_sae,
        k=k,
        batch_size=args.batch,
        buffer_tokens=args.buffer_tokens,
        total_tokens=10**12,
        backend=args.backend,
        autocast=args.autocast,
        device=device,
        warmup_steps=0,
        progress=False,
    )
    trainer = Trainer(cfg)
    collector = Collector(sync_cuda=args.sync)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = (
        contextlib.nullcontext()
        if args.no_torch_profiler
        else torch.profiler.profile(activities=activities, record_shapes=False)
    )
    with instrument(collector):
        for _ in range(args.warmup):
            trainer.step(next(batches))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        collector.active = True
        start = time.perf_counter()
        with profiler as prof:
            for _ in range(args.steps):
                with collector.range("fetch_batch", color="blue"):
                    x = next(batches)
                with collector.range("train_step", color="white"):
                    trainer.step(x)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        wall = time.perf_counter() - start
        collector.active = False
    if shuffler is not None:
        shuffler.close()
    print(
        f"{args.steps} steps of {args.architecture} d_in={d_in} d_sae={args.d_sae} k={k} "
        f"B={args.batch} on {device}, backend {args.backend}, {torch.get_num_threads()} threads, "
        f"precision {trainer.precision.autocast} ({trainer.precision.reason})"
    )
    print(_table(collector, args.steps, wall))
    result: dict[str, Any] = {"wall_s": wall, "totals": collector.totals()}
    if not args.no_torch_profiler:
        args.out.mkdir(parents=True, exist_ok=True)
        trace = args.out / "trace.json"
        prof.export_chrome_trace(str(trace))
        added = _merge_background(trace, collector)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
        print(f"Chrome trace: {trace} ({added} background-thread ranges merged in)")
        result["trace"] = trace
    return result


if __name__ == "__main__":
    main()
