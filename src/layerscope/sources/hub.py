"""Hugging Face hub repo ids, fetched with ``snapshot_download`` (weights, config and tokenizer only).

A bare name (``gpt2``) is a repo id too, as on the hub itself; it is only tried when no local path
of that name exists. Names that look like a file (``model.safetensors``, ``ckpt.pt``) never go to
the hub: a missing local file must say "no such file", not "not on the hub".
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LayerscopeError

#: ``name`` or ``org/name``; the hub's own rules: letters, digits, ``-_.``, no ``--`` or ``..``,
#: not starting or ending with ``-`` or ``.``, at most 96 characters per part.
_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".index", ".gguf", ".onnx", ".h5", ".msgpack",
                 ".npz", ".npy", ".pkl", ".pickle", ".sqlite", ".csv", ".txt", ".yaml", ".yml", ".toml")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
FALLBACK_PATTERNS = ["*.bin", "*.bin.index.json"]
META_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "*.model"]


def looks_like_repo_id(spec: str) -> bool:
    """``gpt2`` or ``org/name``, and not something that reads as a file name."""
    return bool(REPO_ID.match(spec)) and not spec.lower().endswith(FILE_SUFFIXES)


def offline() -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE (it reads the environment when imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a repo's safetensors (or, if it has none, its .bin files) plus config and tokenizer.

    Every failure is one line that says which case it is: offline and not cached, unreachable hub
    and not cached, no such repo (or private), gated, unknown revision."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise LayerscopeError(f"{repo_id}: huggingface_hub is required to download from the hub") from None
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS + META_PATTERNS))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=FALLBACK_PATTERNS + META_PATTERNS))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: catch it first
        raise LayerscopeError(f"{where}: the hub repo is gated; accept its terms on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise LayerscopeError(f"{where}: not a local path, and no such repo on the hub (or it is private: log in with "
                              "hf auth login)") from None
    except RevisionNotFoundError:
        raise LayerscopeError(f"{repo_id}: revision {revision!r} not found on the hub") from None
    except HFValidationError:
        raise LayerscopeError(f"{repo_id}: not a local path, and not a valid hub repo id") from None
    except LocalEntryNotFoundError:
        if offline():
            raise LayerscopeError(f"{where}: not a local path, and not in the local cache (HF_HUB_OFFLINE=1)") from None
        raise LayerscopeError(f"{where}: not a local path, not in the local cache, and the hub is unreachable") from None
    except Exception as exc:  # network errors of every other flavour
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerscopeError(f"{where}: download failed: {first}") from None
    return path
