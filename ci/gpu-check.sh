#!/usr/bin/env bash
# GPU check for the CUDA backend (paca_cuda): install, run the cuda-marked tests and the
# compiled Triton kernel tests, run a short benchmark, print a summary. Under 5 minutes on
# one GPU (each stage has its own time limit). Needs an NVIDIA GPU and a CUDA build of torch.
#
#   ci/gpu-check.sh                  # results also land in $OUT (default /tmp/paca-gpu-check)
#
# Exit status: 0 when every stage passed, 1 when a stage failed, 2 when there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/paca-gpu-check}"
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET PACA_CUDA_KERNELS
t0=$(date +%s)
declare -A STATUS

stage() {  # stage NAME SECONDS CMD...: run with a time limit, keep its log, record pass/fail
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout --signal=INT "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then STATUS[$name]=passed; else STATUS[$name]="FAILED (exit $rc)"; fi
}

# 1. install: the package with the cuda+test extras; offline machines keep their packages.
echo "=== install"
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi not found)"
if ! timeout 120 python -m pip install -q -e ".[cuda,test]" >"$OUT/install.log" 2>&1; then
  echo "full install failed (offline?); installing paca alone, without dependencies"
  python -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 ||
    { echo "install failed; see $OUT/install.log"; exit 1; }
fi
python - <<'PY' || exit 2
import sys, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})", end=": ")
if not torch.cuda.is_available():
    from paca_cuda import CUDABackend
    print("no usable GPU -", CUDABackend.unavailable_reason())
    sys.exit(2)
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed: Triton paths are skipped")
PY

# 2. tests that need the GPU (cuda-marked), then the Triton kernels compiled on CUDA tensors
stage cuda-tests 200 python -m pytest -q -rfEs -m cuda -p no:cacheprovider \
  tests/test_cuda_backend.py tests/test_compile.py --junitxml="$OUT/cuda-tests.xml"
stage triton-kernels 60 python -m pytest -q -rfEs -p no:cacheprovider \
  tests/test_triton_kernels.py --junitxml="$OUT/triton-kernels.xml"

# 3. a short benchmark (bf16, 4 layers of 4096x4096, 4096 tokens, r=8): step time, peak,
#    saved activations and bytes written per method; the fused op's pieces per kernel mode
stage bench 60 python -m paca_cuda.bench --json "$OUT/bench.json"

# 4. summary
echo
echo "=== summary ($(($(date +%s) - t0)) s)"
for name in cuda-tests triton-kernels bench; do printf '  %-15s %s\n' "$name" "${STATUS[$name]:-not run}"; done
python - "$OUT" <<'PY'
import json, sys, pathlib, xml.etree.ElementTree as ET
out = pathlib.Path(sys.argv[1])
for name in ("cuda-tests", "triton-kernels"):
    f = out / f"{name}.xml"
    if f.exists():
        s = ET.parse(f).getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        print(f"  {name}: {s.get('tests')} tests, {s.get('failures')} failed, "
              f"{s.get('errors')} errors, {s.get('skipped')} skipped")
b = out / "bench.json"
if b.exists():
    r = json.loads(b.read_text())
    for row in r["steps"]:
        peak = f"{row['peak_bytes'] / 2**20:.0f} MiB" if row.get("peak_bytes") else "-"
        lora = f"x{row['vs_lora']:.2f} of LoRA" if row.get("vs_lora") else "(no LoRA row)"
        seen = "" if row.get("traffic_complete", True) else " (Triton writes not seen)"
        print(f"  {row['method']:<24} {row['ms']:8.3f} ms  x{row['vs_frozen']:.3f} of frozen  "
              f"{lora}  peak {peak}  saved {row['saved_bytes'] / 2**20:.1f} MiB  "
              f"writes +{row['extra_vs_weights']:.3f} x weights{seen}")
    for row in r["primitives"]:
        cols = "  ".join(f"{k[:-3]} {v:.3f} ms" for k, v in row.items() if k.endswith("_ms"))
        print(f"  {row['piece']:<30} {cols}")
PY
for name in cuda-tests triton-kernels bench; do [ "${STATUS[$name]:-}" = passed ] || exit 1; done
exit 0
