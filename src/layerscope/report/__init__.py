"""Reports a person reads: one self-contained HTML file and the same content as Markdown."""

from .build import ModelData, Report, collect, report

__all__ = ["ModelData", "Report", "collect", "report"]
