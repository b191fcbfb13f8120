"""Coverage-guided fuzzing of one target with atheris (libFuzzer).

    python tests/fuzz/fuzz.py TARGET [libFuzzer options] [NEW_INPUTS_DIR] tests/fuzz/corpus/TARGET

libFuzzer writes new interesting inputs into the FIRST corpus folder: give it a scratch folder
first and the committed seeds second (tests/test_fuzz.py and scripts/fuzz.sh do), so a run never
edits the committed corpus. A crash (a contract violation or any exception but a one-line
LayerscopeError) is written as ``crash-*`` (``-artifact_prefix``); add it to
tests/fuzz/regressions/TARGET/ once fixed, where tests/test_fuzz.py replays it forever.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

# torch, numpy, safetensors are imported un-instrumented; layerscope's own parsers are instrumented
import torch  # noqa: E402, F401

torch.set_num_threads(1)

with atheris.instrument_imports(include=["layerscope", "json"]):
    import layerscope.anatomy  # noqa: F401
    import layerscope.change.trajectory  # noqa: F401
    import layerscope.sources  # noqa: F401
    import layerscope.probes.data  # noqa: F401

from targets import TARGETS  # noqa: E402


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: fuzz.py TARGET [libFuzzer args]; targets: {', '.join(TARGETS)}")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
