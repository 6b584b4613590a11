#!/usr/bin/env bash
# Every benchmark in bench/, one after another (each writes bench/results/<name>.json and prints a table).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for b in eval_speed pld_vs_dspy compression kd_speed kd_quality selfdata_acceptance compare_study; do
  if [ -f "bench/$b.py" ]; then
    echo "== bench/$b.py"
    "$PY" "bench/$b.py"
  fi
done
