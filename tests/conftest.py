"""Shared pytest setup for layerscope's tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = TESTS_DIR.parent / "examples"  # the nanoGPT model and training example are fixtures too
for _dir in (TESTS_DIR, EXAMPLES_DIR):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

# Set at import time too, so that anything imported while collecting tests
# (e.g. transformers / huggingface_hub reading the env at import) is offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import checkpoints  # noqa: E402

REQUIRED = os.environ.get("LAYERSCOPE_REQUIRE_DEPS") == "1"  # set by scripts/test.sh, hence CI


def require(module: str):
    """Import a test dependency. Outside the test command a missing one skips; under
    LAYERSCOPE_REQUIRE_DEPS=1 (scripts/test.sh, CI) it fails, so a claim cannot go untested
    because an install step silently broke."""
    if REQUIRED:
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"required test dependency {module!r} is missing: {exc} (scripts/setup.sh installs it)")
    return pytest.importorskip(module)


@pytest.fixture(autouse=True, scope="session")
def _hf_offline():
    """Never reach the network from the tests."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    """No progress bars / info chatter from transformers' save/load in test logs."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover - transformers is a test dependency
        yield
        return
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(old)
    hf_logging.enable_progress_bar()


@pytest.fixture(autouse=True)
def _layerscope_cache_dir(tmp_path_factory, monkeypatch):
    """Point layerscope's default result store at a fresh per-test folder."""
    cache = tmp_path_factory.mktemp("layerscope-cache")
    monkeypatch.setenv("LAYERSCOPE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def arch_checkpoints(tmp_path_factory) -> dict:
    """{arch: folder} with every arch of checkpoints.ARCHS built once as model.safetensors."""
    root = tmp_path_factory.mktemp("arch-checkpoints")
    return {arch: checkpoints.build_hf(arch, root / arch, fmt="safetensors") for arch in checkpoints.ARCHS}


TRAINED_RUN_SETTINGS = dict(max_iters=200, eval_interval=50, monitor_every=25, n_layer=2, n_head=4, n_embd=64,
                            batch_size=8, block_size=64, corpus_bytes=400_000, eval_iters=5, warmup_iters=20)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """examples/train_gpt.py really trained on CPU (a few seconds): nanoGPT checkpoints every 50
    steps, and the monitor's JSONL and store records every 25 steps."""
    import train_gpt

    out = tmp_path_factory.mktemp("trained-run")
    settings = dict(TRAINED_RUN_SETTINGS, out_dir=str(out), quiet=True, sinks=f"store:{out / 'monitor.sqlite'}",
                    monitor_when_full="block")  # every scheduled step, however busy the test machine is
    saved = {k: getattr(train_gpt, k) for k in settings}
    train_gpt.configure([f"--{k}={v}" for k, v in settings.items()])
    try:
        result = train_gpt.train()
    finally:
        for k, v in saved.items():
            setattr(train_gpt, k, v)
    return {"dir": out, "settings": settings, **result}
