"""Feature-dashboard generation: tokens per second and peak memory of ``fastsae.dashboard``.

One call builds a whole dashboard (the pass over N tokens with the SAE's fast sparse encoder,
logit effects, nearest features, the data files and :data:`PAGES` feature pages) for a random TopK
SAE on the embedded model's default hook, against the model's forward passes alone over the same
tokens (``lm-forward-only``: what any dashboard must pay). The harness reports each provider's
peak resident memory; the collector's state does not grow with N, so the ``fastsae-dashboard``
peak at N = 10^5 and 10^6 should match.

The embedded corpus has about 0.96M training tokens, so its sequences are cycled to reach N.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import Case, Unavailable

#: SAE and pass sizes. ``tokens`` is N; the full suite runs 10^5 and 10^6 (see cases.plan).
SIZES = {
    "smoke": {"tokens": 1024, "d_sae": 256, "k": 8, "context": 64, "batch": 8},
    "full": {"tokens": 100_000, "d_sae": 4096, "k": 32, "context": 128, "batch": 32},
}
#: Feature pages written per build (rendering does not depend on N).
PAGES = 50


def dashboard_generation(suite: str, tokens: int | None = None) -> Case:
    """One dashboard build of ``tokens`` tokens (default: the suite's)."""
    s = dict(SIZES[suite])
    if tokens is not None:
        s["tokens"] = tokens
    shapes = {"tokens": s["tokens"], "n": s["d_sae"], "k": s["k"], "context": s["context"]}
    common = dict(
        name="dashboard_generation",
        mode="throughput",
        baseline="lm-forward-only",
        notes=f"embedded model, random TopK SAE, top 20 + 24 samples per feature, {PAGES} pages",
        repeats=1 if s["tokens"] >= 100_000 else 2,
    )
    try:
        from fastsae.dashboard import DashboardConfig, build_dashboard
        from fastsae.data import open_source, text
    except ImportError as exc:
        reason = f"fastsae.dashboard is not importable: {exc}"
        skipped = {"fastsae-dashboard": reason, "lm-forward-only": reason}
        return Case(shapes=shapes, providers={}, skipped=skipped, **common)
    try:
        opened = open_source()
        rows = text.load_rows()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise Unavailable(f"the embedded model or corpus is not available: {exc}") from None
    import fastsae

    source = opened.source
    hook = source.hooks[0]
    torch.manual_seed(0)
    sae = fastsae.TopKSAE(d_in=source.dims[hook], d_sae=s["d_sae"], k=s["k"], hook_name=hook)
    sae.eval()
    context = min(opened.context_size, s["context"])
    corpus = list(text.token_sequences(rows, opened.tokenizer, context))
    n_seqs = -(-s["tokens"] // (context - 1)) + s["batch"]  # BOS positions do not count
    seqs = list(itertools.islice(itertools.cycle(corpus), n_seqs))
    out = Path(tempfile.mkdtemp(prefix="fastsae-dash-bench-"))
    cfg = DashboardConfig(
        out=str(out), tokens=s["tokens"], batch_size=s["batch"], max_pages=PAGES, progress=False
    )

    def dashboard() -> None:
        build_dashboard(sae, source, opened.tokenizer, text.token_batches(seqs, s["batch"]), cfg)

    def forward_only() -> None:
        seen = 0
        for chunk in source.stream(text.token_batches(seqs, s["batch"])):
            seen += chunk[hook].shape[0]
            if seen >= s["tokens"]:
                break

    return Case(
        shapes=shapes,
        providers={"fastsae-dashboard": dashboard, "lm-forward-only": forward_only},
        items=s["tokens"],
        teardown=lambda: shutil.rmtree(out, ignore_errors=True),
        **common,
    )


def _vm_hwm_mb() -> float:
    """This process's resident-set high-water mark (``VmHWM``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> dict:
    """``python -m benchmarks.analysis_cases --tokens N``: one full-size dashboard build in a
    fresh process (no harness repeats, for N too large to time several times), appended to
    ``benchmarks/results/dashboard-<device>.json``: seconds, tokens/s, and the process's peak RSS
    before and after the build."""
    import argparse
    import json
    import time

    from benchmarks.harness import environment

    parser = argparse.ArgumentParser(prog="python -m benchmarks.analysis_cases")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--suite", default="full", choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    case = dashboard_generation(args.suite, args.tokens)
    before = _vm_hwm_mb()
    start = time.perf_counter()
    case.providers["fastsae-dashboard"]()
    seconds = time.perf_counter() - start
    result = {
        "case": "dashboard_generation",
        "provider": "fastsae-dashboard",
        "shapes": case.shapes,
        "seconds": seconds,
        "tokens_per_s": args.tokens / seconds,
        "peak_rss_mb_before_build": before,
        "peak_rss_mb": _vm_hwm_mb(),
        "notes": case.notes + "; one build, fresh process (model, corpus and SAE loaded before)",
    }
    if case.teardown:
        case.teardown()
    env = environment()
    out = args.out or Path(__file__).parent / "results" / f"dashboard-{env['device']}.json"
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    out.write_text(
        json.dumps({"runs": [*runs, {"environment": env, "results": [result]}]}, indent=2) + "\n"
    )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
