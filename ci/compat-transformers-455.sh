#!/usr/bin/env bash
# Compatibility stage: the core test subset under transformers 4.55.x, the version
# optimum-habana's last release pins (the main environment runs transformers 5.x).
#
#   ci/compat-transformers-455.sh          # PYTHON=... to use another interpreter
#
# A throwaway venv in a temp dir sees every package of the invoking environment (paca's
# editable install, torch, pytest, peft, ...) and adds only the 4.55 pins on top of it.
# Exit status: 0 when the subset passed; non-zero (with a FAILED line) otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

fail() {
  echo "FAILED: transformers 4.55 compatibility stage: $*" >&2
  exit 1
}

VENV="$(mktemp -d "${TMPDIR:-/tmp}/paca-tf455.XXXXXX")"
trap 'rm -rf "$VENV"' EXIT
t0=$(date +%s)

echo "=== venv (transformers 4.55) in $VENV"
"$PY" -m venv --system-site-packages "$VENV" || fail "could not create a venv with $PY"
VPY="$VENV/bin/python"
# --system-site-packages reaches the base interpreter only; when $PY is itself a venv
# (where CI installed paca and the test extras), add its site dirs too, .pth files included.
"$PY" - "$VPY" <<'PY' || fail "could not link the invoking environment's packages"
import subprocess, sys, sysconfig
from pathlib import Path

if sys.prefix != sys.base_prefix:
    dirs = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    cmd = [sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    site = Path(subprocess.check_output(cmd, text=True).strip())
    lines = [f"import site; site.addsitedir({d!r})\n" for d in dirs]
    (site / "_paca_invoking_env.pth").write_text("".join(lines))
PY
"$VPY" -m pip install -q "transformers==4.55.*" "tokenizers<0.22" "huggingface-hub<1.0" \
  "datasets<4" || fail "pip could not install the transformers 4.55 pins"

# The venv must import the pinned transformers and this checkout's paca, nothing else.
"$VPY" - "$PWD" <<'PY' || fail "the venv does not see transformers 4.55 and this checkout's paca"
import sys
from pathlib import Path

import huggingface_hub
import paca
import paca_cpu
import pytest  # noqa: F401
import tokenizers
import torch
import transformers

root = Path(sys.argv[1]).resolve()
assert transformers.__version__.startswith("4.55."), transformers.__version__
assert Path(paca.__file__).resolve().is_relative_to(root), paca.__file__
assert Path(paca_cpu.__file__).resolve().is_relative_to(root), paca_cpu.__file__
print(
    f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
    f"huggingface-hub {huggingface_hub.__version__}, torch {torch.__version__}, "
    f"paca from {Path(paca.__file__).parent}"
)
PY
t1=$(date +%s)

echo "=== core tests under transformers 4.55 (setup took $((t1 - t0))s)"
"$VPY" -m pytest -q -p no:cacheprovider \
  tests/test_linear_op.py tests/test_model.py tests/test_io.py tests/test_export_peft.py \
  tests/test_trainer.py tests/test_adapters.py tests/test_modules_to_save.py \
  tests/test_strategies.py tests/test_conv.py tests/test_tiny.py tests/test_compile.py \
  tests/test_quickstart.py ||
  fail "core tests failed under transformers 4.55 (see above)"
echo "=== transformers 4.55 compatibility: passed (tests $(($(date +%s) - t1))s, total $(($(date +%s) - t0))s)"
