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
