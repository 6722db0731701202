#!/usr/bin/env bash
# Run the default-config benchmark on the selected backend and keep the results under
# benchmarks/results/<name>/ (bench.json with raw samples and environment, bench.md, bench.png).
#
#   benchmarks/run.sh                       # default config, auto-selected backend
#   benchmarks/run.sh cuda --dtype bfloat16  # any further `paca bench` options
#   NAME=h100-bf16 benchmarks/run.sh cuda    # choose the results folder name
#
# The default config takes about 4 minutes on 2 idle CPU cores (10-40 when shared); `paca bench --quick`
# is the one-minute smoke version. Run nothing else heavy meanwhile: steps are timed.
set -euo pipefail
backend="${1:-auto}"
shift || true
here="$(cd "$(dirname "$0")" && pwd)"
name="${NAME:-${backend}-default}"
out="$here/results/$name"
mkdir -p "$out"
python -m paca bench --backend "$backend" --out "$out" "$@" 2> >(tee "$out/progress.log" >&2)
