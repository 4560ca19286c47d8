"""One small helper per supported module type (Linear, Conv2d), all with the same interface.

A helper knows how to turn its module's input / output-gradient into factor sums and how
to read and write the module's gradient as the ``(d_out, d_in)`` matrix ``[dW | db]``
(see :mod:`lightning_kfac_swa.kfac_math` for the layout). No Lightning in here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_kfac_swa import kfac_math as km


class LinearHelper:
    """K-FAC view of an :class:`~torch.nn.Linear`."""

    def __init__(self, name: str, module: nn.Linear) -> None:
        self.name = name
        self.module = module
        self.has_bias = module.bias is not None
        self.d_in = module.in_features + int(self.has_bias)
        self.d_out = module.out_features

    def input_sum(self, x: Tensor, dtype: torch.dtype, locations: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> tuple[Tensor, float]:
        """``(Σ ā āᵀ (d_in, d_in), count)`` for an input ``(..., in_features)``."""
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        return km.second_moment_sum(rows, self.has_bias), float(rows.shape[0])

    def grad_sum(self, g: Tensor, dtype: torch.dtype, locations: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, float]:
        """``(Σ ĝ ĝᵀ (d_out, d_out), count)`` for per-example output gradients ``(..., out)``."""
        rows = g.reshape(-1, g.shape[-1]).to(dtype)
        return km.output_grad_sum(rows)

    def grad_matrix(self, dtype: torch.dtype) -> Optional[Tensor]:
        """``[dW | db]`` as ``(d_out, d_in)`` in ``dtype``, or None when there is no gradient."""
        w = self.module.weight.grad
        if w is None:
            return None
        if not self.has_bias:
            return w.reshape(self.d_out, -1).to(dtype)
        b = self.module.bias.grad
        b = torch.zeros_like(w[:, 0]) if b is None else b
        return torch.cat([w.reshape(self.d_out, -1), b.unsqueeze(1)], 1).to(dtype)

    def set_grad(self, mat: Tensor) -> None:
        """Write ``mat (d_out, d_in)`` back into ``weight.grad`` (and ``bias.grad``)."""
        w = self.module.weight
        w.grad.copy_(mat[:, : w[0].numel()].reshape(w.shape))
        if self.has_bias and self.module.bias.grad is not None:
            self.module.bias.grad.copy_(mat[:, -1])


class Conv2dHelper(LinearHelper):
    """K-FAC view of an :class:`~torch.nn.Conv2d` ('expand' approximation, Grosse & Martens 2016)."""

    def __init__(self, name: str, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ValueError(
                f"K-FAC layer {name!r}: Conv2d with groups={module.groups} is not supported "
                "(only groups=1); add its name to `skip` to leave it to the plain optimizer"
            )
        self.name = name
        self.module = module
        self.has_bias = module.bias is not None
        self.geometry = km.conv_geometry(module)
        kh, kw = module.kernel_size
        self.d_in = module.in_channels * kh * kw + int(self.has_bias)
        self.d_out = module.out_channels

    def input_sum(self, x, dtype, locations=None, generator=None):
        """``(Σ_{n,t} ā āᵀ (d_in, d_in), count = example-locations)`` for ``x (B, C, H, W)``."""
        return km.conv_input_sum(x.to(dtype), self.geometry, self.has_bias, locations, generator)

    def grad_sum(self, g, dtype, locations=None, generator=None):
        """``(Σ_{n,t} ĝ ĝᵀ (d_out, d_out), count = examples)`` for ``g (B, out, H, W)``."""
        return km.output_grad_sum(g.to(dtype), locations, generator)


SUPPORTED = (nn.Conv2d, nn.Linear)


def make_helper(name: str, module: nn.Module) -> LinearHelper:
    """The helper for a module of a :data:`SUPPORTED` type (or a subclass of one)."""
    if isinstance(module, nn.Conv2d):
        return Conv2dHelper(name, module)
    if isinstance(module, nn.Linear):
        return LinearHelper(name, module)
    raise TypeError(f"K-FAC layer {name!r}: unsupported module type {type(module).__name__}")
