"""scripts/gpu_check.sh and ``bench_hdc.py --device cuda`` where there is no CUDA: both refuse
with exit 2 and say why, before running anything. On a CUDA machine these are skipped (the
script itself is the check there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PY": sys.executable}
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_gpu_check_script_parses() -> None:
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


@no_cuda
def test_gpu_check_refuses_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    run = _run(["bash", str(SCRIPT), str(out)])
    assert run.returncode == 2, run.stdout + run.stderr
    assert "gpu_check: no CUDA" in run.stderr
    assert not out.exists()  # refused before running (or writing) anything


@no_cuda
def test_bench_hdc_on_cuda_refuses_without_cuda(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/bench_hdc.py", "--device", "cuda", "--quick"]
    run = _run([*cmd, "--out", str(tmp_path)])
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--device cuda needs a CUDA GPU" in run.stderr
    assert not list(tmp_path.iterdir())
