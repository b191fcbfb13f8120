"""Hugging Face hub repo ids, fetched with ``snapshot_download`` (weights, config and tokenizer only)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LayerscopeError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
FALLBACK_PATTERNS = ["*.bin", "*.bin.index.json"]
META_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "*.model"]


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a repo's safetensors (or, if it has none, its .bin files) plus config and tokenizer."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise LayerscopeError(f"{repo_id}: huggingface_hub is required to download from the hub") from None
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS + META_PATTERNS))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=FALLBACK_PATTERNS + META_PATTERNS))
    except RepositoryNotFoundError:
        raise LayerscopeError(f"{repo_id}: no such file, directory or hub repository") from None
    except RevisionNotFoundError:
        raise LayerscopeError(f"{repo_id}: revision {revision!r} not found on the hub") from None
    except LocalEntryNotFoundError:
        raise LayerscopeError(
            f"{repo_id}: not a local path, and not in the Hugging Face cache (offline or the hub is unreachable)"
        ) from None
    except Exception as exc:  # network errors of every flavour
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerscopeError(f"{repo_id}: download failed: {first}") from None
    return path
