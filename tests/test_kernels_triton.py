"""The Triton kernels, interpreted on CPU (TRITON_INTERPRET=1), against the exact reference.

Triton reads TRITON_INTERPRET when it is first imported (its own library functions are
decorated then), so the cases in kernels_triton_cases.py run in a fresh interpreter process
with the flag set, leaving this process (and any GPU tests in it) compiled normally.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

CASES = Path(__file__).with_name("kernels_triton_cases.py")


def test_triton_kernels_interpreted_on_cpu() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_triton_hamming_grid_stays_within_cuda_limits() -> None:
    """Rows used to sit on grid axis 1, capped at 65,535 programs (~2.1M rows at 32 a block);
    now row blocks are on axis 0 (2**31-1) and queries on axis 1 are capped."""
    from edge_runtime.kernels import triton_backend as T

    for batch, rows in [(1, 1), (3, 65_535 * 32 + 1), (70_000, 3_000_000), (2, 10**9)]:
        gx, gy = T.hamming_grid(batch, rows, 32)
        assert gx * 32 >= rows and gx <= T.MAX_GRID_X
        assert 1 <= gy <= T.MAX_GRID_YZ and gy <= batch
    assert T.hamming_grid(3, 65_535 * 32 + 1, 32)[0] == 65_536
