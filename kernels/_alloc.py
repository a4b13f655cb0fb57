"""Output allocation for the fast kernels, with a poison mode for tests.

Kernels write into buffers made here. Under ``poisoned_outputs()`` the buffers start filled
with a sentinel instead of whatever ``torch.empty`` returns, so an element a kernel forgot
to write shows up as a wrong value in a test rather than passing by luck.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch


class _State(threading.local):
    # a class-level default: reading it costs a plain attribute lookup, where getattr with a
    # default on a bare threading.local costs a third of a microsecond (checked per call)
    poison = False


_state = _State()

# fits int32 and int64, and is never a valid distance or row index
POISON_INT = -0x5A5A5A5A
POISON_FLOAT = float("nan")


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _state.poison:
        value = POISON_FLOAT if dtype.is_floating_point else POISON_INT
        return torch.full(shape, value, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def poisoning() -> bool:
    """Whether outputs must start poisoned here (then kernels may not allocate their own)."""
    return _state.poison


def empty_numpy(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 numpy output buffer (poisoned with NaN under :func:`poisoned_outputs`)."""
    if _state.poison:
        return np.full(shape, np.nan, dtype=np.float32)
    return np.empty(shape, dtype=np.float32)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within this block every kernel output starts filled with a sentinel."""
    old = _state.poison
    _state.poison = True
    try:
        yield
    finally:
        _state.poison = old
