"""Argument checks for the CLI, all done before any work starts.

A typo in ``--out res.xlsx`` or ``--trim 2`` must cost a second, not an analysis: every flag is
checked while the command line is parsed (argparse ``type=`` functions below) or right after it
(:func:`preflight`, plus the subcommand's own ``check`` set with ``parser.set_defaults(check=...)``),
and any failure is one line on stderr with exit status 2. New subcommands get this by using these
helpers; nothing here imports a heavy library, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, NoReturn

from .errors import LayerscopeError

#: Table outputs write_table understands.
TABLE_SUFFIXES = (".csv", ".parquet", ".json")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one ``--help`` away), exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")  # "--out: x.xlsx: must end in ...", as LayerscopeError reads
        self.exit(2, f"layerscope: error: {message} (see {self.prog} --help)\n")


def _fail(message: str) -> NoReturn:
    raise argparse.ArgumentTypeError(message)


def output_file(*suffixes: str) -> Callable[[str], str]:
    """``type=`` for a file written at the end: its suffix is checked now, not after the analysis."""
    allowed = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes)

    def check(text: str) -> str:
        path = Path(text).expanduser()
        if path.suffix.lower() not in suffixes:
            _fail(f"{text}: must end in {allowed}")
        if path.is_dir():
            _fail(f"{text}: is a directory, expected a file ending in {allowed}")
        _creatable(path.parent, text)
        return text

    check.__name__ = "output file"
    return check


def output_folder(text: str) -> str:
    """``type=`` for a folder written into (figures, a run's outputs): it may not be a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        _fail(f"{text}: exists and is not a folder")
    _creatable(path, text)
    return text


def store_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        _fail(f"{text}: is a directory, expected the store's file (e.g. {Path(text) / 'results.sqlite'})")
    _creatable(path.parent, text)
    return text


def existing_file(text: str) -> str:
    if not Path(text).expanduser().is_file():
        _fail(f"{text}: file not found")
    return text


def _creatable(folder: Path, text: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a writable directory."""
    import os

    probe = folder if str(folder) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        _fail(f"{text}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"{text}: cannot write in {probe}")


def int_at_least(low: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _fail(f"expected an integer, got {text!r}")
        if value < low:
            _fail(f"must be >= {low}, got {value}")
        return value

    check.__name__ = f"integer >= {low}"
    return check


def float_between(low: float, high: float) -> Callable[[str], float]:
    """``type=`` for a float in the closed interval [low, high]."""

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _fail(f"expected a number, got {text!r}")
        if not low <= value <= high:  # also rejects nan
            _fail(f"must lie in [{low:g}, {high:g}], got {text}")
        return value

    check.__name__ = f"number in [{low:g}, {high:g}]"
    return check


def device(text: str) -> str:
    if not (text in ("cpu", "cuda", "auto") or (text.startswith("cuda:") and text[5:].isdigit())):
        _fail(f"expected cpu, cuda, cuda:N or auto, got {text!r}")
    return text


def checkpoint(text: str) -> str:
    """``type=`` for a checkpoint argument: an existing local path, or something shaped like a hub id.

    Only the cheap local test happens here; the hub is asked when the source is opened, still
    before any analysis."""
    if Path(text).expanduser().exists():
        return text
    from .sources.hub import looks_like_repo_id  # only now: importing the sources package imports torch

    if looks_like_repo_id(text):
        return text
    _fail(f"{text}: no such file or directory (and not a hub repo id)")


def comma_list(known: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    def check(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if known is not None:
            unknown = [t for t in items if t not in known]
            if unknown:
                _fail(f"unknown {', '.join(unknown)} (known: {', '.join(known)})")
        return items

    check.__name__ = "comma-separated list"
    return check


def preflight(args: argparse.Namespace, build_config: Callable[[argparse.Namespace], Any]) -> None:
    """Checks that need more than one flag, or the config file, or the metric registry: run for
    every subcommand right after parsing, then the subcommand's own ``check`` (if it set one)."""
    if any(getattr(args, flag, None) is not None for flag in ("config", "metrics", "device", "workers", "dtype", "store", "seed")) \
            or getattr(args, "no_cache", False):
        config = build_config(args)  # unknown config keys, bad values
        if getattr(args, "metrics", None):
            from .weights.metrics import select_metrics

            select_metrics(config)  # unknown metric names
    check = getattr(args, "check", None)
    if check is not None:
        check(args)


def die(message: str) -> NoReturn:
    """For checks outside argparse: the CLI prints it as one line, exit status 2."""
    raise LayerscopeError(message)


__all__ = ["Parser", "TABLE_SUFFIXES", "output_file", "output_folder", "store_file", "existing_file", "int_at_least",
           "float_between", "device", "checkpoint", "comma_list", "preflight", "die"]
