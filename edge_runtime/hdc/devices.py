"""Copies of CPU-held HDC state on the device that scores.

The encoder's projection state and the bank's memory stay on the CPU, where checkpoints and the
runtime's budget read them; a batch on another device is scored there against copies made once
per change of that state, not once per frame.
"""

from __future__ import annotations

import torch


class DeviceCopies:
    """Named CPU tensors' copies on other devices, each made once per tensor object.

    Every change of the state this serves replaces its tensors rather than editing them in
    place, so a copy is stale exactly when its source is no longer the tensor it was made from.
    """

    def __init__(self) -> None:
        # (name, device) -> (the CPU tensor copied, its copy on that device)
        self._held: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``t`` on ``device``: ``t`` itself when it is there already, else the copy."""
        if t.device == device:
            return t
        hit = self._held.get((name, device))
        if hit is None or hit[0] is not t:
            hit = (t, t.to(device))
            self._held[(name, device)] = hit
        return hit[1]

    @property
    def devices(self) -> frozenset[torch.device]:
        """The devices that hold a copy."""
        return frozenset(device for _, device in self._held)
