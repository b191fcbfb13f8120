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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import Config
from .report import Report, collect, report

STAGES = ("analyze", "heads", "mlp", "embeddings", "clusters")


def run(path: Any, config: Config | None = None, *, out: str | Path = "layerscope-out", revision: str | None = None,
        skip: set[str] | frozenset[str] = frozenset(), console: Console | None = None, quiet: bool = False) -> Report:
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
    progress = Progress(TextColumn("[bold]{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=quiet)
    with progress:
        overall = progress.add_task("layerscope", total=len(stages))
        current: dict[str, Any] = {}
        began: dict[str, float] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in current:
                began[stage] = time.perf_counter()
                for other, task in current.items():  # a new stage: close the previous ones
                    progress.update(task, completed=progress.tasks[task].total or 1)
                current[stage] = progress.add_task(stage, total=max(total, 1))
                progress.update(overall, completed=min(len(current) - 1, len(stages)))
            progress.update(current[stage], completed=done, total=max(total, 1))

        data = collect(source, config, embeddings=False if "embeddings" in skip else True,
                       clusters=False if "clusters" in skip else True, progress=update)
        update("report", 0, 1)
        out.mkdir(parents=True, exist_ok=True)
        data.analysis.save(out / "analysis.csv")
        if data.heads is not None:
            data.heads.save(out / "heads.csv")
        if data.embeddings is not None:
            data.embeddings.save(out / "embeddings.json")
        if data.clusters is not None:
            data.clusters.save(out / "clusters.json")
        result = report([], config, out=out / "report.html", markdown=out / "report.md", models=[data])
        update("report", 1, 1)
        progress.update(overall, completed=len(stages))
    ended = time.perf_counter()
    result.seconds = ended - started
    names = list(began)
    result.stage_seconds = {n: (began[names[i + 1]] if i + 1 < len(names) else ended) - began[n]
                            for i, n in enumerate(names)}
    return result
