"""The paper's learning-rate schedule (equation 7), as a pure function and an LRScheduler."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler


def hold_decay_factor(epoch: int, total_epochs: int, final_ratio: float = 0.01) -> float:
    """Learning-rate factor of the original SWA code base for a 0-based ``epoch``.

    With ``x = epoch / total_epochs``: 1 for ``x <= 0.5``, then linear down to
    ``final_ratio`` at ``x = 0.9``, then ``final_ratio``.
    """
    x = epoch / total_epochs
    if x <= 0.5:
        return 1.0
    if x <= 0.9:
        return 1.0 - (1.0 - final_ratio) * (x - 0.5) / 0.4
    return final_ratio


class HoldDecayLR(LRScheduler):
    """Equation (7) of the paper as an epoch-interval scheduler: ``lr = α0 · factor(t)``.

    Args:
        optimizer: the wrapped optimizer; α0 is each param group's initial lr.
        total_epochs: T > 0 (300 for runs without SWA; the SWA code base uses the 1-based SWA
            start epoch, 161, so that the rate has reached ``final_ratio · α0`` when averaging
            starts).
        final_ratio: r in (0, 1] (0.01 without SWA; swa_lr / α0 = 0.5 with SWA).
        last_epoch: as in :class:`torch.optim.lr_scheduler.LRScheduler`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_epochs: int, final_ratio: float = 0.01,
                 last_epoch: int = -1) -> None:
        if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(f"total_epochs must be an integer >= 1, got {total_epochs!r}")
        if isinstance(final_ratio, bool) or not isinstance(final_ratio, (int, float)) or not 0 < final_ratio <= 1:
            raise ValueError(f"final_ratio must be in (0, 1], got {final_ratio!r}")
        self.total_epochs = total_epochs
        self.final_ratio = float(final_ratio)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        f = hold_decay_factor(self.last_epoch, self.total_epochs, self.final_ratio)
        return [base * f for base in self.base_lrs]
