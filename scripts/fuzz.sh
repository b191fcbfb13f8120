#!/usr/bin/env bash
# Long coverage-guided fuzzing of every parser that reads untrusted bytes (tests/fuzz/targets.py).
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default 600 s, every target)
# New interesting inputs go to .fuzz/<target>/ (not the committed corpus); crashes to .fuzz/crashes/.
# A crash: fix it, then copy the input to tests/fuzz/regressions/<target>/ (tests/test_fuzz.py replays it).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-600}"; shift || true
PY="${PYTHON:-python}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(PYTHONPATH=src:tests/fuzz "$PY" -c 'from targets import TARGETS; print("\n".join(TARGETS))')
fi
mkdir -p .fuzz/crashes
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p ".fuzz/$t"
  echo "== $t (${SECONDS_PER_TARGET}s)"
  PYTHONPATH=src HF_HUB_OFFLINE=1 "$PY" tests/fuzz/fuzz.py "$t" -max_total_time="$SECONDS_PER_TARGET" -timeout=20 \
    -rss_limit_mb=3072 -artifact_prefix=".fuzz/crashes/$t-" ".fuzz/$t" "tests/fuzz/corpus/$t" || status=1
done
exit $status
