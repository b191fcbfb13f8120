"""``layerscope run``: the whole analysis of one model in one command, ending with the report.

Stages: anatomy, per-matrix metrics, heads (and MLP spectra), embedding geometry, token clusters,
report. Every stage reads and writes the same store, so a run stopped anywhere resumes where it
stopped, and a second run only re-renders the report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .config import Config
from .report import Report, collect, report
from .views import ProgressDisplay

STAGES = ("analyze", "heads", "mlp", "embeddings", "clusters", "probe", "activations")

#: The probe stage's budget: a quick look at curvature and Fisher information (``layerscope probe
#: --hessian --fisher`` goes further). The Fisher diagonal costs about one pass of per-example gradients.
RUN_PROBE = dict(batches=2, batch_size=4, hessian=dict(top_k=5, max_iter=60, trace_min=10, trace_max=30,
                                                       density_runs=2, density_steps=30, blocks=("layer",),
                                                       block_max_iter=20),
                 fisher=dict(top_k=5), gradients=True)


def run(path: Any, config: Config | None = None, *, out: str | Path = "layerscope-out", revision: str | None = None,
        skip: set[str] | frozenset[str] = frozenset(), console: Console | None = None, quiet: bool = False,
        exclude_untrained: bool = False) -> Report:
    """Analyse ``path`` completely and write ``out``/report.html, report.md (figures beside them),
    analysis.csv, heads.csv, embeddings.json and clusters.json."""
    from .sources import open_source
    from .views import print_info

    started = time.perf_counter()
    config = config or Config()
    console = console or Console()
    out = Path(out)
    source = open_source(path, revision)
    if not quiet:
        from .anatomy import build_anatomy

        print_info(build_anatomy(source.infos, source.config), source.label, source.format, console)
    stages = [s for s in STAGES if s not in skip] + ["report"]
    began: dict[str, float] = {}
    totals: dict[str, int] = {}
    with ProgressDisplay("run", quiet=quiet) as display:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in began:
                for previous in began:  # a new stage: the previous ones are done
                    display.update(previous, totals[previous], totals[previous])
                began[stage] = time.perf_counter()
                display.update("all stages", len(began) - 1, len(stages))
            totals[stage] = max(total, 1)
            display.update(stage, done, totals[stage])

        data = collect(source, config, embeddings=False if "embeddings" in skip else True,
                       clusters=False if "clusters" in skip else True, progress=update,
                       exclude_untrained=exclude_untrained)
        if "probe" not in skip:
            data.probe = run_probe(path, source, config, revision, data.notes,
                                   lambda name, done, total: update("probe", done, total))
        if "activations" not in skip:
            update("activations", 0, 1)
            data.activations = run_activations(path, config, revision, data.notes,
                                               lambda name, done, total: update("activations", done, total))
        update("report", 0, 1)
        out.mkdir(parents=True, exist_ok=True)
        data.analysis.save(out / "analysis.csv")
        if data.heads is not None:
            data.heads.save(out / "heads.csv")
        if data.embeddings is not None:
            data.embeddings.save(out / "embeddings.json")
        if data.clusters is not None:
            data.clusters.save(out / "clusters.json")
        if data.probe is not None:
            data.probe.save(out / "probe.json")
        if data.activations is not None:
            data.activations.save(out / "activations.json")
        result = report([], config, out=out / "report.html", markdown=out / "report.md", models=[data])
        update("report", 1, 1)
        display.update("all stages", len(stages), len(stages))
    ended = time.perf_counter()
    result.seconds = ended - started
    names = list(began)
    result.stage_seconds = {n: (began[names[i + 1]] if i + 1 < len(names) else ended) - began[n]
                            for i, n in enumerate(names)}
    return result


def run_probe(path: Any, source: Any, config: Config, revision: str | None, notes: list[str], progress) -> Any:
    """The probe stage: the loss and a quick Hessian when the model can run; otherwise the reason, as a note."""
    from .errors import LayerscopeError
    from .probes.probe import probe

    try:
        return probe(path, None, config=config, revision=revision, progress=progress, **RUN_PROBE)
    except LayerscopeError as exc:
        notes.append(f"probe: skipped: {exc}")
        return None


def run_activations(path: Any, config: Config, revision: str | None, notes: list[str], progress) -> Any:
    """The activations stage (head behaviour, lens, CKA, neurons on 2 × 4 windows), or the reason it was skipped."""
    from .errors import LayerscopeError
    from .probes.activations import activations

    try:
        return activations(path, None, config=config, revision=revision, batches=2, batch_size=4, progress=progress)
    except LayerscopeError as exc:
        notes.append(f"activations: skipped: {exc}")
        return None
