"""A group's summary table (markdown, CSV, JSON) and its Pareto plot: the sparsity /
reconstruction trade-off researchers compare SAEs by.

``pareto.png`` has one panel per quality measure the group has: FVU (lower is better), and the
CE-loss score and KL score (higher is better; only with a TransformerLens model), each against
L0. Points on the Pareto front (no other member has both a lower L0 and a better score) are
joined by a line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "pareto_front", "write_summary"]

#: Summary columns, in order.
COLUMNS = (
    "name",
    "status",
    "architecture",
    "hook",
    "d_sae",
    "k",
    "lr",
    "seed",
    "steps",
    "l0",
    "fvu",
    "explained_variance",
    "dead_pct",
    "ce_loss_score",
    "kl_score",
    "error",
)
#: (metric, label, higher is better)
PANELS = (
    ("fvu", "FVU (lower is better)", False),
    ("ce_loss_score", "CE-loss score (higher is better)", True),
    ("kl_score", "KL score (higher is better)", True),
)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points ``(l0, score)`` that no other point dominates (a lower or equal L0
    and a better or equal score, one of them strictly), sorted by L0."""
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], None
    for i in order:
        score = sign * points[i][1]
        if best is None or score > best:
            front.append(i)
            best = score
    return front


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(out_dir: str | Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv``, ``summary.json`` and ``pareto.png`` in ``out_dir``
    from one row per member (see :data:`COLUMNS`); returns the paths."""
    out_dir = Path(out_dir)
    paths = {
        "md": out_dir / "summary.md",
        "csv": out_dir / "summary.csv",
        "json": out_dir / "summary.json",
        "png": out_dir / "pareto.png",
    }
    paths["json"].write_text(json.dumps(rows, indent=1))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = [
        "| " + " | ".join(shown) + " |",
        "|" + "|".join("---" for _ in shown) + "|",
        *("| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |" for r in rows),
    ]
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(paths["png"], rows)
    return paths


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    done = [r for r in rows if r.get("l0") is not None]
    panels = [p for p in PANELS if any(r.get(p[0]) is not None for r in done)] or PANELS[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    groups = sorted({(r["architecture"], r["hook"]) for r in done})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label, higher) in zip(axes[0], panels, strict=True):
        have = [r for r in done if r.get(key) is not None]
        for gi, group in enumerate(groups):
            mine = [r for r in have if (r["architecture"], r["hook"]) == group]
            ax.scatter(
                [r["l0"] for r in mine],
                [r[key] for r in mine],
                color=colors[gi % len(colors)],
                label=f"{group[0]} @ {group[1]}",
                zorder=3,
            )
        points = [(float(r["l0"]), float(r[key])) for r in have]
        front = pareto_front(points, higher)
        if front:
            ax.plot(
                [points[i][0] for i in front],
                [points[i][1] for i in front],
                color="0.4",
                linestyle="--",
                linewidth=1,
                label="Pareto front",
                zorder=2,
            )
        for r in have:
            ax.annotate(r["name"], (r["l0"], r[key]), fontsize=6, alpha=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(_spread_ticks(float(r["l0"]) for r in have) or [1.0])
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    failed = [r["name"] for r in rows if r.get("status") == "failed"]
    title = f"{len(done)} SAEs" + (f"; failed: {', '.join(failed)}" if failed else "")
    fig.suptitle(title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _spread_ticks(values, min_ratio: float = 1.1) -> list[float]:
    """The distinct L0 values, ascending, without one within ``min_ratio`` of the previous tick
    (BatchTopK's 15.85 beside TopK's 16 printed over each other on the log axis); of two such
    values a whole number (a TopK k) is kept."""
    ticks: list[float] = []
    for v in sorted(set(values)):
        if not ticks or v >= ticks[-1] * min_ratio:
            ticks.append(v)
        elif float(v).is_integer() and not float(ticks[-1]).is_integer():
            ticks[-1] = v
    return ticks
