"""Frozen parts wait on the CPU between the stages that use them (Training Run's `offload_frozen`).

Text encoders are needed only to encode prompts not yet in the policy's cache, reward models only to
score, the low-precision explorer only to requantize and explore. With offloading on, each is moved to
its device just before it is used and back to the CPU right after; nothing it computes changes
(moving a tensor copies it exactly). The memory plan counts each part only in its stages.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def device_of(part: Any) -> torch.device:
    """Where a part computes: a module's first parameter, else its `device` attribute (rewards)."""
    if isinstance(part, torch.nn.Module):
        return next((p.device for p in part.parameters()), torch.device("cpu"))
    return torch.device(part.device)


def move_to(part: Any, device: torch.device) -> None:
    part.to(device)


class Offloader:
    """Parks parts on `storage` (the CPU) and brings each back to the device it computed on.

    `move(part, device)` does the moving (tests pass a recorder); parts are tracked by identity.
    """

    def __init__(self, enabled: bool = False, move: Callable[[Any, torch.device], None] = move_to,
                 storage: torch.device | str = "cpu"):
        self.enabled = enabled
        self.move = move
        self.storage = torch.device(storage)
        self._parked: dict[int, tuple[Any, torch.device]] = {}  # id -> (part, its device)

    def park(self, *parts: Any) -> None:
        """Move parts to the CPU (when enabled), remembering their device."""
        if not self.enabled:
            return
        for part in parts:
            if part is None or id(part) in self._parked:
                continue
            home = device_of(part)
            self._parked[id(part)] = (part, home)
            self.move(part, self.storage)

    def fetch(self, *parts: Any) -> None:
        """Bring parked parts back to their device (no-op for parts that are not parked)."""
        for part in parts:
            entry = self._parked.pop(id(part), None) if part is not None else None
            if entry is not None:
                self.move(part, entry[1])

    @contextmanager
    def resident(self, *parts: Any) -> Iterator[None]:
        """The parts on their device inside the block, parked again after it (when enabled)."""
        self.fetch(*parts)
        try:
            yield
        finally:
            self.park(*parts)

    def set_enabled(self, enabled: bool) -> None:
        """Turning offloading off brings every parked part back."""
        if not enabled:
            self.fetch(*[part for part, _ in list(self._parked.values())])
        self.enabled = enabled
