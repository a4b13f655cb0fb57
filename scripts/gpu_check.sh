#!/usr/bin/env bash
# The prepared GPU check (issue 15, item 13): on a CUDA machine, in under 5 minutes,
#   1. builds the CUDA C++ kernels (torch's extension loader, cached after the first build),
#   2. runs the CUDA and compiled-Triton kernel tests against the exact reference,
#   3. runs the torch-CUDA encoder and the GPU memory bank against the CPU path, and the encoder
#      taps and a conv adaptor on a tap on torch CUDA and ONNX Runtime CUDA against CPU,
#   4. runs benchmarks/bench_encoder.py --quick and benchmarks/bench_hdc.py --quick --device cuda
#      (ours on the GPU vs torch's GPU matmul, and vs FAISS on CPU where faiss imports),
# and writes OUT/gpu_check.json: the card, torch/triton versions, each step's exit code and
# seconds, and the paths of the benchmark JSONs. Every step runs under its own time limit
# (T_<STEP> seconds, overridable) and a failing step does not stop the later ones; the script
# exits 1 if any step failed, 2 (before running anything) where there is no CUDA.
#   bash scripts/gpu_check.sh [OUT]        # OUT defaults to benchmarks/out/gpu_check
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/gpu_check}
PY=${PY:-python3}

if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_check: no CUDA: torch.cuda.is_available() is False here (no GPU, or a CPU-only" \
        "torch build); run this on a CUDA machine" >&2
    exit 2
fi

mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: >"$STEPS"
unset TRITON_INTERPRET # compiled Triton on the GPU, not the interpreter
export PYTHONUNBUFFERED=1
failed=0

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, logs to OUT/NAME.log, records rc and s.
step() {
    local name=$1 limit=$2 rc t0 t1
    shift 2
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s.%N)
    set +e
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    t1=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN {print $t1 - $t0}")" "$limit" >>"$STEPS"
    if [ "$rc" -ne 0 ]; then
        echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"
        failed=1
    fi
}

step build_cuda_kernels "${T_BUILD:-90}" "$PY" -c "
from edge_runtime.kernels import cuda_backend, resolve_backend
import torch
why = cuda_backend.unavailable_reason()
print('cuda kernels:', why or 'built and loaded')
print('auto backend on cuda:', resolve_backend('auto', torch.device('cuda')))
raise SystemExit(1 if why else 0)"
step kernel_tests "${T_KERNELS:-80}" "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_kernels_cuda.py tests/test_kernels_triton.py
step encoder_parity "${T_PARITY:-40}" "$PY" -m pytest -q -rs -p no:cacheprovider \
    "tests/test_backends.py::test_torch_cuda_parity" "tests/test_backends.py::test_ort_cuda_parity" \
    tests/test_hdc_fastpath.py -k "cuda"
step tap_parity "${T_TAPS:-60}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_encoder_taps.py \
    -k "cuda"
step bench_encoder "${T_BENCH_ENCODER:-40}" "$PY" benchmarks/bench_encoder.py --quick --out "$OUT"
step bench_hdc "${T_BENCH_HDC:-40}" "$PY" benchmarks/bench_hdc.py --quick --device cuda --out "$OUT"

"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
props = torch.cuda.get_device_properties(0)
try:
    import triton

    triton_version = triton.__version__
except Exception:
    triton_version = None
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    steps.append({"name": name, "exit_code": int(rc), "seconds": round(float(seconds), 2),
                  "limit_s": int(limit), "log": str(out / f"{name}.log")})
benchmarks = {n: str(out / n) for n in ("bench_encoder.json", "bench_hdc_cuda.json")
              if (out / n).exists()}
report = {
    "card": {
        "name": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
    },
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "triton": triton_version,
    "steps": steps,
    "benchmarks": benchmarks,
    "passed": all(s["exit_code"] == 0 for s in steps),
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
EOF

exit "$failed"
