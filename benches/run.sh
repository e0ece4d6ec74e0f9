#!/usr/bin/env bash
# Reproduces every number in BENCHMARKS.md: sets up the dlt peer in a virtualenv under
# target/bench-venv (PyPI: dlt with DuckDB), then runs the benchmark scenarios RUNS times.
#   benches/run.sh            # all scenarios, 5 runs
#   RUNS=1 benches/run.sh dlt # one scenario, once
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/bench-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "dlt[duckdb]"
fi
export CHARTHERO_BENCH_PYTHON="$PWD/$venv/bin/python"
cargo bench --bench envelope --no-run
for run in $(seq "${RUNS:-5}"); do
    echo "## run $run"
    cargo bench --bench envelope -- "$@" 2>/dev/null | grep -E '^(list|bound|transcripts|backends|latency|idle|churn|audit|plan|fairness|queries|dlt):'
done
