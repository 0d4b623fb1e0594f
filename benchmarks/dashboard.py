"""``python -m benchmarks.dashboard [--out docs/bench] [FILES...]``.

Builds a static page, ``<out>/index.html``, with PNG plots (matplotlib, Agg backend) from every
result line (default: ``benchmarks/results/*.jsonl``). It opens from disk with no server and no
network. For each device and each case (name and shapes) measured in any run, from the newest
run that measured that case (runs often measure a subset: ``--cases``, a data-only suite):

- *history*: every provider's time relative to the case's baseline, run after run (one point per
  run, labelled with the commit);
- *newest run*: each provider's time relative to the fastest fastsae provider (the competitors
  appear here) and its memory footprint (kept state + transient peak);
- a table of that run's rows: median, spread, ratio, roofline fraction, throughput, memory, and
  the reason for every skipped or failed provider.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from benchmarks.compare import default_files, load, run_id, runs_by_device  # noqa: E402

DEFAULT_OUT = Path(__file__).parent.parent / "docs" / "bench"
RESULTS_DIR = Path(__file__).parent / "results"
DPI = 72
COLORS = {"fastsae": "#1f77b4", "sae_lens": "#d62728", "sparsify": "#ff7f0e"}
OTHER_COLOR = "#7f7f7f"
FLOOR_COLOR = "#2ca02c"
#: Quality plots: one colour per fastsae configuration (up to 7 before repeating), none of the
#: anchors' (COLORS) so that fastsae-topk-bf16 is not drawn in sparsify's orange.
FASTSAE_QUALITY_COLORS = (
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def shapes_label(shapes: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shapes.items())


def _color(provider: str) -> str:
    for prefix, color in COLORS.items():
        if provider.startswith(prefix):
            return color
    return FLOOR_COLOR if "floor" in provider else OTHER_COLOR


def _commit_label(row: dict[str, Any]) -> str:
    return (row.get("commit") or "?")[:7] + ("*" if row.get("dirty") else "")


def _group_key(row: dict[str, Any]) -> tuple[str, str]:
    return row["case"], json.dumps(row["shapes"], sort_keys=True)


def plot_history(runs: list[list[dict[str, Any]]], key: tuple[str, str], path: Path) -> bool:
    """Time relative to the baseline, per provider, over the runs that measured ``key``."""
    series: dict[str, list[tuple[int, float]]] = {}
    labels: list[str] = []
    baseline = None
    for run in runs:
        rows = [r for r in run if _group_key(r) == key and r.get("status", "ok") == "ok"]
        if not rows:
            continue
        x = len(labels)
        labels.append(_commit_label(rows[0]))
        for r in rows:
            if r.get("ratio_vs_baseline") is not None:
                baseline = r.get("baseline")
                series.setdefault(r["provider"], []).append((x, r["ratio_vs_baseline"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for provider, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=provider, color=_color(provider))
    values = [y for points in series.values() for _, y in points]
    if max(values) / min(values) > 20:  # a log axis only where the ratios span decades
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"time / {baseline}", fontsize=8)
    ax.set_title(f"{key[0]}: history ({shapes_label(json.loads(key[1]))})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    fastsae = [r for r in rows if r["provider"].startswith("fastsae")]
    pool = fastsae or [r for r in rows if r["provider"] == rows[0].get("baseline")] or rows
    return min(pool, key=lambda r: r["median_s"]) if pool else None


def plot_newest(rows: list[dict[str, Any]], path: Path) -> bool:
    """Bars: time relative to the fastest fastsae provider; memory (kept + transient)."""
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    ref = _reference(rows)
    if ref is None:
        return False
    rows = sorted(rows, key=lambda r: r["median_s"])
    names = [r["provider"] for r in rows]
    colors = [_color(n) for n in names]
    rel = [r["median_s"] / ref["median_s"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 0.45 * len(rows) + 1.2))
    bars = left.barh(names, rel, color=colors)
    for bar, value in zip(bars, rel, strict=True):
        left.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {value:.2f}x",
            va="center",
            fontsize=7,
        )
    left.axvline(1.0, color="black", lw=0.8)
    left.set_xlabel(f"time / {ref['provider']}", fontsize=8)
    left.invert_yaxis()
    left.tick_params(labelsize=7)
    left.set_xlim(0, max(rel) * 1.3)
    state = [r.get("state_mb") or 0.0 for r in rows]
    delta = [r.get("peak_delta_mb") or 0.0 for r in rows]
    right.barh(names, state, color=colors, alpha=0.5, label="kept between calls")
    right.barh(names, delta, left=state, color=colors, label="transient peak")
    right.set_xlabel("memory (MB)", fontsize=8)
    right.invert_yaxis()
    right.tick_params(labelsize=7)
    right.set_yticklabels([])
    right.legend(fontsize=6, loc="lower right")
    case = rows[0]["case"]
    fig.suptitle(f"{case}: newest run ({shapes_label(rows[0]['shapes'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>provider</th><th>status</th><th>median</th><th>spread</th><th>vs baseline</th>"
        "<th>roofline</th><th>throughput</th><th>memory</th><th>notes</th></tr>"
    )
    body = []
    for r in rows:
        ok = r.get("status", "ok") == "ok"
        note = r.get("reason") or ""
        items = r.get("items_per_s")
        body.append(
            f"<tr class='{html.escape(r.get('status', 'ok'))}'>"
            f"<td>{html.escape(r['provider'])}</td><td>{html.escape(r.get('status', 'ok'))}</td>"
            f"<td>{_fmt(r.get('median_s') and r['median_s'] * 1e3, '.2f', ' ms') if ok else ''}</td>"
            f"<td>{_fmt(r.get('spread'), '.0%')}</td>"
            f"<td>{_fmt(r.get('ratio_vs_baseline'), '.3f', 'x')}</td>"
            f"<td>{_fmt(r.get('roofline_fraction'), '.1%')}</td>"
            f"<td>{_fmt(items, ',.0f', ' ' + (r.get('items_unit') or '') + '/s')}</td>"
            f"<td>{_fmt(r.get('memory_mb'), ',.1f', ' MB')}</td>"
            f"<td>{html.escape(note)}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case of a run: its fastest fastsae provider, and every other provider's time and
    memory relative to it (> 1: fastsae is faster / smaller)."""
    out = []
    for key in dict.fromkeys(_group_key(r) for r in rows):
        ok = [r for r in rows if _group_key(r) == key and r.get("status", "ok") == "ok"]
        ours = [r for r in ok if r["provider"].startswith("fastsae")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_s"])
        others = []
        for r in ok:
            if r["provider"].startswith("fastsae"):
                continue
            memory = None
            if r.get("memory_mb") and best.get("memory_mb"):
                memory = r["memory_mb"] / best["memory_mb"]
            others.append((r["provider"], r["median_s"] / best["median_s"], memory))
        out.append({"case": key[0], "shapes": best["shapes"], "fastsae": best, "others": others})
    return out


def latest_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every case's rows from the newest of ``runs`` (oldest first) that measured it, cases in
    the order they first appear: a run that measured only some cases hides none of the others."""
    latest: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        for key in dict.fromkeys(_group_key(r) for r in run):
            latest[key] = [r for r in run if _group_key(r) == key]
    order = list(dict.fromkeys(_group_key(r) for run in runs for r in run))
    return [r for key in order for r in latest[key]]


def anchor(device: str, key: tuple[str, str]) -> str:
    """The id of a case's section, also the stem of its PNG files."""
    return f"{slug(device)}-{slug(key[0])}-{slug(shapes_label(json.loads(key[1])))}"


def _summary_table(device: str, rows: list[dict[str, Any]]) -> str:
    body = []
    for s in summary_rows(rows):
        target = anchor(device, (s["case"], json.dumps(s["shapes"], sort_keys=True)))
        others = "; ".join(
            f"{html.escape(name)} {time:.2f}x" + ("" if mem is None else f" (memory {mem:.2f}x)")
            for name, time, mem in s["others"]
        )
        best = s["fastsae"]
        body.append(
            f"<tr><td><a href='#{target}'>{html.escape(s['case'])}</a></td>"
            f"<td>{html.escape(shapes_label(s['shapes']))}</td>"
            f"<td>{html.escape(best['provider'])}</td>"
            f"<td>{best['median_s'] * 1e3:.2f} ms</td><td>{others}</td></tr>"
        )
    head = (
        "<tr><th>case</th><th>shapes</th><th>fastest fastsae</th><th>median</th>"
        "<th>others: their time (and memory) / fastsae's</th></tr>"
    )
    return f"<table class='summary'>{head}{''.join(body)}</table>"


def _runs_table(runs: list[list[dict[str, Any]]]) -> str:
    body = []
    for run in reversed(runs):
        r = run[0]
        failed = sum(1 for x in run if x.get("status") == "error")
        body.append(
            f"<tr><td>{html.escape(run_id(run))}</td><td>{html.escape(r.get('time', ''))}</td>"
            f"<td>{html.escape(_commit_label(r))}</td><td>{html.escape(r.get('suite', ''))}</td>"
            f"<td>{r.get('threads', '')}</td><td>{len(run)}</td><td>{failed}</td></tr>"
        )
    head = (
        "<tr><th>run</th><th>time (UTC)</th><th>commit</th><th>suite</th><th>threads</th>"
        "<th>results</th><th>failed</th></tr>"
    )
    return f"<table class='runs'>{head}{''.join(body)}</table>"


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
td:first-child, th:first-child, td:last-child { text-align: left; }
tr.skipped { color: #888; } tr.error { background: #fdd; }
img { max-width: 100%; margin: 0.3em 0.6em 0.3em 0; }
.plots { display: flex; flex-wrap: wrap; align-items: flex-start; }
.env { font-size: 0.85em; color: #555; }
"""


# Marks the page once loaded, so a headless browser can tell that every plot rendered.
IMAGE_CHECK = (
    "window.addEventListener('load', function () {"
    " var imgs = Array.prototype.slice.call(document.images);"
    " var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });"
    " document.body.setAttribute('data-images-loaded', ok.length + '/' + imgs.length); });"
)


def plot_quality(result: dict[str, Any], path: Path) -> bool:
    """Held-out FVU against training seconds, one line per configuration."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    # fastsae's configurations in solid lines of colours no anchor uses; anchors dashed in theirs
    own = itertools.cycle(FASTSAE_QUALITY_COLORS)
    for name, c in result["configs"].items():
        xs = [p["seconds"] for p in c["curve"]]
        ys = [p["fvu"] for p in c["curve"]]
        mine = name.startswith("fastsae")
        ax.plot(
            xs, ys, "-" if mine else "--", label=name, color=next(own) if mine else _color(name)
        )
    ax.set_yscale("log")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out FVU")
    ax.set_title(
        f"{result['source']} d_sae={result['d_sae']} k={result['k']} "
        f"B={result['batch_size']} {result['steps']} steps",
        fontsize=9,
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _anchored(result: dict[str, Any]) -> bool:
    """Whether a quality result compares with an anchor (sparsify, SAELens), not only fastsae."""
    return any(not name.startswith("fastsae") for name in result["configs"])


def newest_quality_results(runs: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """``(run, result)`` for the newest result of every (source, d_sae, steps, with or without
    anchors) in ``runs`` (oldest first, as ``benchmarks.quality`` appends them), sorted by source,
    width, anchors first, then budget. Separate invocations (one source, one width, a longer
    budget, fastsae's architectures alone) then show side by side."""
    seen: set[tuple] = set()
    picked = []
    for run in reversed(runs):
        for result in run.get("results", []):
            key = (result["source"], result["d_sae"], result["steps"], _anchored(result))
            if key not in seen:
                seen.add(key)
                picked.append((run, result))
    return sorted(
        picked,
        key=lambda p: (p[1]["source"], p[1]["d_sae"], not _anchored(p[1]), p[1]["steps"]),
    )


def quality_section(out: Path, quality_dir: Path | None) -> list[str]:
    """The newest result of every (source, width, budget) in ``<quality_dir>/quality-*.json``
    (``benchmarks.quality``): FVU-vs-seconds plot and table, time to target and the ratios of
    that budget (each from one run: its configurations ran in lock-step)."""
    from benchmarks.quality import time_to_quality

    parts = []
    if quality_dir is None:
        return parts
    for file in sorted(Path(quality_dir).glob("quality-*.json")):
        picked = newest_quality_results(json.loads(file.read_text()).get("runs", []))
        if not picked:
            continue
        device = picked[0][0]["environment"].get("device", "")
        parts.append(f"<h2 id='quality'>Quality: {html.escape(device)}</h2>")
        parts.append(
            "<p class='env'>Held-out FVU / L0 / dead % on real activations; the target of each "
            "budget is the worst final FVU of the anchors' best configurations at that budget. "
            "See <code>benchmarks/quality.py</code>.</p>"
        )
        for run, result in picked:
            env = run["environment"]
            tq = time_to_quality(result["configs"]) or {}
            title = f"{result['source']} d_sae={result['d_sae']}, {result['steps']} steps"
            if not _anchored(result):
                title += ", fastsae's architectures"
            parts.append(
                f"<h3>{html.escape(title)}</h3><p class='env'>run "
                f"{html.escape(env.get('run_id', ''))}, commit {html.escape(_commit_label(env))}, "
                f"{env.get('threads', '?')} threads; {html.escape(run.get('note', ''))}.</p>"
            )
            if tq:
                parts.append(
                    f"<p>target FVU {tq['target_fvu']:.4f} (anchors' best configurations "
                    f"{html.escape(json.dumps(tq['best_anchor_configs']))}); fastsae-topk reaches "
                    f"it <b>{_fmt(tq['speedup_vs_best_anchor'], '.2f', 'x') or 'never'}</b> sooner "
                    f"than the best anchor (bf16: "
                    f"{_fmt(tq['speedup_bf16_vs_best_anchor'], '.2f', 'x') or 'never'}).</p>"
                )
            name = slug(f"quality-{result['source']}-{result['d_sae']}-{result['steps']}")
            name += ".png" if _anchored(result) else "-archs.png"
            plot_quality(result, out / name)
            parts.append(f"<img src='{name}' alt='quality {html.escape(title)}'>")
            head = (
                "<tr><th>configuration</th><th>held-out FVU</th><th>L0</th><th>dead %</th>"
                "<th>training s</th><th>s to target</th></tr>"
            )
            ttt = tq.get("time_to_target_s", {})
            body = []
            for cname, c in result["configs"].items():
                f = c["final"]
                body.append(
                    f"<tr><td>{html.escape(cname)}</td><td>{f['fvu']:.4f}</td>"
                    f"<td>{_fmt(f.get('l0'), '.1f')}</td><td>{_fmt(f.get('dead_pct'), '.1f')}</td>"
                    f"<td>{f['seconds']:.1f}</td><td>{_fmt(ttt.get(cname), '.1f')}</td></tr>"
                )
            parts.append(f"<table>{head}{''.join(body)}</table>")
    return parts


def build(rows: list[dict[str, Any]], out: Path, quality_dir: Path | None = None) -> Path:
    """Write ``out/index.html`` and its PNGs from ``rows``; returns the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>fastsae benchmarks</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>fastsae benchmarks</h1>",
        "<p>Generated by <code>python -m benchmarks.dashboard</code> from "
        "<code>benchmarks/results/*.jsonl</code>. Ratios compare providers measured in the same "
        "run; absolute times on shared machines are noise. See <code>docs/benchmarks.md</code>."
        "</p>",
    ]
    devices = runs_by_device(rows)
    if not devices:
        parts.append("<p id='empty'>No results yet: run <code>python -m benchmarks.run</code>.</p>")
    for device, runs in sorted(devices.items()):
        newest = runs[-1]
        env = newest[0]
        latest = latest_rows(runs)
        ceilings = env.get("ceilings") or {}
        parts.append(f"<h2>{html.escape(device)}</h2>")
        parts.append(
            f"<p class='env'>newest run {html.escape(run_id(newest))}, commit "
            f"{html.escape(_commit_label(env))}, {html.escape(env.get('device_detail', ''))}, "
            f"{env.get('threads', '?')} threads, suite {html.escape(env.get('suite', '?'))}; "
            f"ceilings {_fmt(ceilings.get('peak_flops') and ceilings['peak_flops'] / 1e9, '.1f')}"
            f" GFLOP/s, {_fmt(ceilings.get('peak_bytes_per_s') and ceilings['peak_bytes_per_s'] / 1e9, '.1f')}"
            f" GB/s; versions {html.escape(json.dumps(env.get('versions', {})))}</p>"
        )
        parts.append("<h3>Summary: each case's newest result</h3>")
        parts.append(_summary_table(device, latest))
        parts.append("<h3>Runs</h3>")
        parts.append(_runs_table(runs))
        keys = list(dict.fromkeys(_group_key(r) for r in latest))
        for key in keys:
            case_rows = [r for r in latest if _group_key(r) == key]
            base = anchor(device, key)
            parts.append(
                f"<h3 id='{base}'>{html.escape(key[0])} "
                f"<small>{html.escape(shapes_label(json.loads(key[1])))}, "
                f"{html.escape(case_rows[0].get('mode', ''))}, run "
                f"{html.escape(run_id(case_rows))} ({html.escape(_commit_label(case_rows[0]))})"
                "</small></h3>"
            )
            parts.append("<div class='plots'>")
            for kind, plot in (("newest", plot_newest), ("history", None)):
                name = f"{base}-{kind}.png"
                made = (
                    plot(case_rows, out / name)
                    if plot is not None
                    else plot_history(runs, key, out / name)
                )
                if made:
                    parts.append(f"<img src='{name}' alt='{html.escape(key[0])} {kind}'>")
            parts.append("</div>")
            parts.append(_table(case_rows))
    parts.extend(quality_section(out, quality_dir))
    parts.append(f"<script>{IMAGE_CHECK}</script></body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="default: benchmarks/results/*.jsonl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    page = build(load(args.files or default_files()), args.out, quality_dir=RESULTS_DIR)
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
