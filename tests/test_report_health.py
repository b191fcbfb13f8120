"""The report shows the landscapes stored for a checkpoint and the probe's gradient health."""

from __future__ import annotations

from layerscope.config import Config
from layerscope.probes.landscape import landscape
from layerscope.probes.probe import probe
from layerscope.report import collect, report


def test_report_has_landscape_plots_barrier_and_gradient_tables(trained_run, tmp_path):
    first, last = trained_run["checkpoints"][-2], trained_run["checkpoints"][-1]
    config = Config(store=str(tmp_path / "store.sqlite"))
    small = dict(seq_len=32, batches=2, batch_size=4)
    landscape([last, first], points=5, store=config.resolved_store(), **small)
    landscape([last], grid=3, span=0.5, store=config.resolved_store(), **small)
    data = collect(last, config, embeddings=False, clusters=False)
    assert [r.kind for r in data.landscapes] and {r.kind for r in data.landscapes} == {"interpolation", "random"}
    data.probe = probe(last, None, gradients=True, config=config, **small)
    result = report([], config, out=tmp_path / "r" / "report.html", markdown=tmp_path / "r" / "report.md", models=[data])
    md = result.markdown.read_text()
    assert "## Loss landscapes" in md and "barrier" in md
    assert "linearly connected" in md or "a barrier" in md
    assert "## Gradient health on data" in md and "B_simple" in md and "MLP neurons on the probe data" in md
    figures = list(result.figures.rglob("landscape_*.png"))
    assert {p.name for p in figures} >= {"landscape_1d.png", "landscape_random_contour.png", "landscape_random_surface.png"}
    assert "data:image/png;base64" in result.html.read_text()
