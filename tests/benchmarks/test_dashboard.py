"""The dashboard builds from synthetic results, and renders in headless Chromium.

The Chromium test is skipped only where no Chromium binary is installed (CI installs Debian's
``chromium`` package)."""

from __future__ import annotations

import re
import subprocess

import pytest

from benchmarks import dashboard
from tests.benchmarks.rows import run
from tests.chromium import require_chromium


def _results():
    medians = [
        {"fastsae-torch": 1.0, "sae_lens": 6.5, "sparsify": 1.6, "floor": 0.9},
        {"fastsae-torch": 0.95, "sae_lens": 6.4, "sparsify": 1.5, "floor": 0.9},
    ]
    rows = []
    for i, m in enumerate(medians, 1):
        rows += run(
            m,
            f"2026010{i}T000000Z-r{i}",
            f"2026-01-0{i}T00:00:00Z",
            commit=f"{i:07d}" + "0" * 33,
            dirty=i == 2,
            skipped={"fastsae-triton": "no CUDA device <script>"},
        )
    rows += run(
        {"fastsae-torch": 0.01, "floor": 0.005},
        "20260102T000000Z-r2",
        "2026-01-02T00:00:00Z",
        commit="0000002" + "0" * 33,
        dirty=True,
        case="encode_topk_fwd",
        mode="fwd",
    )
    return rows


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return dashboard.build(_results(), out)


def test_page_has_plots_tables_and_escapes_text(page):
    html = page.read_text()
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    # two cases in the newest run, a newest-run and a history plot each
    assert len(pngs) == 4
    for name in pngs:
        assert f"src='{name}'" in html
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("<table") == 4  # summary, runs, one per case
    assert "sae_lens 6.74x" in html  # 6.4 / 0.95 in the summary of the newest run
    assert "no CUDA device &lt;script&gt;" in html  # reasons are escaped
    assert "http://" not in html and "https://" not in html  # nothing to fetch: works offline


def test_empty_results_and_stale_plots(tmp_path):
    (tmp_path / "old.png").write_bytes(b"x")
    page = dashboard.build([], tmp_path)
    assert "No results yet" in page.read_text()
    assert not list(tmp_path.glob("*.png"))


def test_every_case_keeps_its_newest_result_when_a_later_run_measured_others(tmp_path):
    """A run that measured only some cases (``--cases``) must not hide the others: each case is
    drawn from the newest run that measured it, and its PNGs survive the rebuild."""
    rows = run({"fastsae-torch": 1.0, "floor": 0.5}, "r1", "2026-01-01T00:00:00Z", case="old_case")
    rows += run({"fastsae-torch": 2.0, "floor": 0.5}, "r1", "2026-01-01T00:00:00Z", case="both")
    rows += run({"fastsae-torch": 3.0, "floor": 0.5}, "r2", "2026-01-02T00:00:00Z", case="both")
    rows += run({"fastsae-torch": 4.0, "floor": 0.5}, "r2", "2026-01-02T00:00:00Z", case="new")
    page = dashboard.build(rows, tmp_path)
    html = page.read_text()
    for case in ("old_case", "both", "new"):
        drawn = sorted(p.name for p in tmp_path.glob(f"*-{case.replace('_', '-')}-*.png"))
        assert len(drawn) == 2, (case, drawn)  # newest result and history
        assert all(f"src='{name}'" in html for name in drawn)
    assert html.count("<table") == 2 + 3  # summary, runs, one per case
    latest = dashboard.latest_rows(next(iter(dashboard.runs_by_device(rows).values())))
    assert {(r["case"], r["run_id"], r["median_s"]) for r in latest} == {
        ("old_case", "r1", 1.0),
        ("old_case", "r1", 0.5),
        ("both", "r2", 3.0),
        ("both", "r2", 0.5),
        ("new", "r2", 4.0),
        ("new", "r2", 0.5),
    }


def test_summary_rows_pick_the_fastest_fastsae_provider():
    rows = run({"fastsae-torch": 2.0, "fastsae-triton": 1.0, "sparsify": 3.0}, "r", "t")
    (summary,) = dashboard.summary_rows(rows)
    assert summary["fastsae"]["provider"] == "fastsae-triton"
    assert [(n, t) for n, t, _ in summary["others"]] == [("sparsify", 3.0)]


def test_page_renders_in_headless_chromium(page, tmp_path):
    flags = [*require_chromium(), f"--user-data-dir={tmp_path / 'profile'}"]
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    n_png = len(list(page.parent.glob("*.png")))
    # set by the page's own script once every image has decoded
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    assert loaded.groups() == (str(n_png), str(n_png))
    assert dom.count("<table") == 4 and "trainer_step" in dom
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a blank page is a few kB
    print(f"screenshot: {shot}")
