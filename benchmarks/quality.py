"""Quality benchmark: how good an SAE each library trains, and how many training seconds it takes.

``python -m benchmarks.quality [--source minilm --source embedded] [--budgets 200,1000]
[--widths 2048] [--batch 1024] [--threads 1] [--no-record]``

Activations are real (:mod:`benchmarks.quality_data`: the pretrained all-MiniLM-L6-v2 and the
embedded demo model, on the embedded KJV corpus). Every configuration sees **identical batches**
(one fixed permutation of the training rows, B rows per step) and is evaluated on the same held-out
rows (chapters no training row comes from): FVU, L0 and dead % (latents that never fired on the
held-out rows).

Configurations, each trained for every budget (steps) and width:

- ``fastsae-<arch>``: ``fastsae.train.Trainer`` with its **default flags** (only ``d_sae``, ``k``
  and ``total_tokens = budget * B`` set; the schedule knows the run length) for every
  architecture, pinned to fp32 (``autocast="fp32"``: the default ``auto`` would pick bf16 on some
  machines); ``fastsae-topk-bf16`` sets ``autocast="bf16"``. ``keep_freed_memory`` is off, so that
  the anchors, which share the process, run with glibc's default allocator settings as their
  users do.
- ``sparsify`` / ``sparsify-bf16``: EleutherAI sparsify's own step
  (:mod:`benchmarks.competitors.sparsify_step`), fp32 and under bf16 autocast.
- ``sae_lens`` / ``sae_lens-bf16``: SAELens's own ``SAETrainer.step`` on a TopK SAE
  (:mod:`benchmarks.competitors.sae_lens_step`), fp32 and under bf16 autocast.

Configurations advance **in lock-step**: step s of every configuration runs before step s + 1 of
any, so a noisy shared machine slows them all alike. Each step is timed alone (evaluation is not
counted). From the curves of held-out FVU against training seconds:

- **target** = the worst final FVU among the anchors' best configurations (each anchor's better of
  fp32 / bf16) at a budget (:func:`time_to_quality`);
- **time to target** for every configuration: training seconds until its held-out FVU first
  reaches the target; the ratio is the best anchor's time over fastsae-topk's. The summary's
  headline is the largest budget's; every budget also has its own target and ratios
  (``per_budget``), as the dashboard shows.

Results go to ``benchmarks/results/quality-<device>.json`` (a list of runs) and the FVU-vs-seconds
plots to the dashboard (``python -m benchmarks.dashboard``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import quality_data
from benchmarks.harness import RESULTS, Unavailable, environment

ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu", "gated")
ANCHORS = ("sparsify", "sparsify-bf16", "sae_lens", "sae_lens-bf16")
K = 32


@dataclass
class Runner:
    """One configuration in training: ``step()`` on the shared batch buffer, ``reconstruct(h)``."""

    name: str
    step: Callable[[], object]
    reconstruct: Callable[[Tensor], Tensor]
    encode_l0: Callable[[Tensor], Tensor] | None = None
    seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)


def _bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def fastsae_runner(name: str, x: Tensor, n: int, steps: int, arch: str, **kw) -> Runner:
    from fastsae.train import TrainConfig, Trainer

    B, d = x.shape
    extra = {"matryoshka_widths": [n // 4]} if arch == "matryoshka_batchtopk" else {}
    # glibc's defaults, as the anchors' users have them: keep_freed_memory (mallopt) is
    # process-wide, and the anchors run in this process. At these shapes it did not change
    # fastsae's step (46.4 and 45.3 ms, MiniLM d_sae 2048 bf16) but made sparsify's 27% faster.
    kw = {"keep_freed_memory": False, **kw}
    cfg = TrainConfig(
        architecture=arch,
        d_in=d,
        d_sae=n,
        k=K if arch in ("topk", "batchtopk", "matryoshka_batchtopk") else None,
        target_l0=K,
        batch_size=B,
        buffer_tokens=2 * B,
        total_tokens=steps * B,
        progress=False,
        **extra,
        **kw,
    )
    trainer = Trainer(cfg)

    @torch.no_grad()
    def reconstruct(h: Tensor) -> Tensor:
        return trainer.sae(h).recon

    @torch.no_grad()
    def codes(h: Tensor) -> Tensor:
        return trainer.sae.encode(h)

    return Runner(name, lambda: trainer.step(x), reconstruct, codes)


def anchor_runner(name: str, x: Tensor, n: int) -> Runner:
    from benchmarks.competitors import sae_lens_step, sparsify_step

    module = sparsify_step if name.startswith("sparsify") else sae_lens_step
    provider = module.make_step(x, n, K)
    if name.endswith("-bf16"):

        def step():
            with _bf16():
                return provider.step()

        def reconstruct(h):
            with _bf16():
                return provider.reconstruct(h).float()

        def codes(h):
            with _bf16():
                return provider.codes(h).float()
    else:
        step, reconstruct, codes = provider.step, provider.reconstruct, provider.codes
    return Runner(name, step, reconstruct, codes)


def _evaluate(runner: Runner, held_out: Tensor, chunk: int = 4096) -> dict:
    with torch.no_grad():
        recon = torch.cat([runner.reconstruct(h) for h in held_out.split(chunk)]).float()
        err = (recon - held_out).pow(2).sum()
        var = (held_out - held_out.mean(0)).pow(2).sum()
        out = {"fvu": float(err / var)}
        if runner.encode_l0 is not None:
            fired = None
            l0 = 0.0
            for h in held_out.split(chunk):
                c = runner.encode_l0(h) > 0
                l0 += float(c.sum())
                fired = c.any(0) if fired is None else fired | c.any(0)
            out["l0"] = l0 / held_out.shape[0]
            out["dead_pct"] = 100.0 * float((~fired).float().mean())
    return out


def run_budget(
    source: str, data: dict, n: int, steps: int, B: int, configs: list[str], eval_every: int
) -> dict:
    """Train every configuration for ``steps`` steps in lock-step; return their curves."""
    train, held_out = data["train"], data["held_out"][:8192]
    d = train.shape[1]
    x = torch.empty(B, d)
    x.copy_(train[:B])
    runners: list[Runner] = []
    skipped = {}
    for name in configs:
        torch.manual_seed(0)
        try:
            if name.startswith("fastsae-"):
                arch = name.removeprefix("fastsae-").removesuffix("-bf16")
                kw = {"autocast": "bf16" if name.endswith("-bf16") else "fp32"}
                runners.append(fastsae_runner(name, x, n, steps, arch, **kw))
            else:
                runners.append(anchor_runner(name, x, n))
        except Unavailable as exc:
            skipped[name] = str(exc)
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))
    for s in range(steps):
        start = (s * B) % (train.shape[0] - B + 1)
        batch = train[perm[start : start + B]]
        for r in runners:
            x.copy_(batch)
            t0 = time.perf_counter()
            r.step()
            r.seconds += time.perf_counter() - t0
            if (s + 1) % eval_every == 0 or s + 1 == steps:
                point = {"step": s + 1, "seconds": round(r.seconds, 3)}
                point.update(_evaluate(r, held_out))
                r.curve.append(point)
    return {
        "source": source,
        "d_in": d,
        "d_sae": n,
        "k": K,
        "batch_size": B,
        "steps": steps,
        "configs": {r.name: {"curve": r.curve, "final": r.curve[-1]} for r in runners},
        "skipped": skipped,
    }


def time_to_target(curve: list[dict], target: float) -> float | None:
    """Training seconds at which ``curve`` first reaches ``fvu <= target`` (linear
    interpolation between evaluations), or None."""
    prev = None
    for p in curve:
        if p["fvu"] <= target:
            if prev is None:
                return p["seconds"]
            frac = (prev["fvu"] - target) / max(prev["fvu"] - p["fvu"], 1e-12)
            return prev["seconds"] + frac * (p["seconds"] - prev["seconds"])
        prev = p
    return None


def time_to_quality(configs: dict) -> dict | None:
    """Target, time to target and the headline ratios from one budget's ``configs`` (name ->
    ``{"curve", "final"}``), or None without an anchor.

    The target is the worst final FVU among the anchors' best configurations (each anchor's better
    of fp32 / bf16); the ratios are the best anchor's time to it over fastsae-topk's (fp32 and
    bf16)."""
    best_anchor = {}
    for anchor in ("sparsify", "sae_lens"):
        options = [c for c in (anchor, f"{anchor}-bf16") if c in configs]
        if options:
            best_anchor[anchor] = min(options, key=lambda c: configs[c]["final"]["fvu"])
    if not best_anchor:
        return None
    target = max(configs[c]["final"]["fvu"] for c in best_anchor.values())
    ttt = {name: time_to_target(c["curve"], target) for name, c in configs.items()}
    anchors_t = [ttt[c] for c in best_anchor.values() if ttt[c] is not None]
    best_t = min(anchors_t) if anchors_t else None

    def ratio(name: str) -> float | None:
        return best_t / ttt[name] if best_t and ttt.get(name) else None

    return {
        "target_fvu": target,
        "best_anchor_configs": best_anchor,
        "time_to_target_s": ttt,
        "speedup_vs_best_anchor": ratio("fastsae-topk"),
        "speedup_bf16_vs_best_anchor": ratio("fastsae-topk-bf16"),
    }


def summarize(results: list[dict]) -> dict:
    """Per (source, width): :func:`time_to_quality` at the largest budget (the headline), and per
    budget its own target and ratios plus the final FVUs."""
    out = {}
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["source"], r["d_sae"]), []).append(r)
    for (source, n), rs in groups.items():
        longest = max(rs, key=lambda r: r["steps"])
        headline = time_to_quality(longest["configs"])
        if headline is None:
            continue
        per_budget = {}
        for r in sorted(rs, key=lambda r: r["steps"]):
            c = r["configs"]
            tq = time_to_quality(c) or {}
            per_budget[r["steps"]] = {
                "best_anchor_fvu": min(
                    (c[a]["final"]["fvu"] for a in ANCHORS if a in c), default=float("nan")
                ),
                "fastsae_topk_fvu": c.get("fastsae-topk", {}).get("final", {}).get("fvu"),
                "fastsae_topk_bf16_fvu": c.get("fastsae-topk-bf16", {}).get("final", {}).get("fvu"),
                "target_fvu": tq.get("target_fvu"),
                "speedup_vs_best_anchor": tq.get("speedup_vs_best_anchor"),
                "speedup_bf16_vs_best_anchor": tq.get("speedup_bf16_vs_best_anchor"),
            }
        out[f"{source}/{n}"] = {**headline, "per_budget": per_budget}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument("--source", action="append", choices=sorted(quality_data.SOURCES))
    p.add_argument("--budgets", default="200,1000")
    p.add_argument("--widths", default="2048")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default="", help="comma-separated subset (default: all)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    configs = [f"fastsae-{a}" for a in ARCHITECTURES] + ["fastsae-topk-bf16", *ANCHORS]
    if args.configs:
        configs = [c for c in configs if c in args.configs.split(",")]
    # the commit and state of the code that runs, read before it runs (a long run may end after
    # the checkout moved on)
    env = {**environment(), "threads": args.threads}
    budgets = [int(b) for b in args.budgets.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    results = []
    for source in args.source or ["minilm", "embedded"]:
        data = quality_data.load(source)
        for n in widths:
            for steps in budgets:
                every = max(10, math.ceil(steps / 40))
                t0 = time.perf_counter()
                res = run_budget(source, data, n, steps, args.batch, configs, every)
                results.append(res)
                print(f"{source} d_sae={n} steps={steps} ({time.perf_counter() - t0:.0f}s)")
                for name, c in res["configs"].items():
                    f = c["final"]
                    print(
                        f"  {name:24s} fvu {f['fvu']:.4f} l0 {f.get('l0', float('nan')):7.1f} "
                        f"dead {f.get('dead_pct', float('nan')):5.1f}%  train {f['seconds']:.1f}s"
                    )
    summary = summarize(results)
    print(json.dumps(summary, indent=1))
    run = {
        "environment": env,
        "note": "shared 2-core machine; configurations interleaved step by step",
        "results": results,
        "summary": summary,
    }
    if not args.no_record:
        out = args.out or RESULTS / f"quality-{run['environment']['device']}.json"
        runs = json.loads(out.read_text())["runs"] if out.exists() else []
        runs.append(run)
        out.write_text(json.dumps({"runs": runs}, indent=1))
        print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
