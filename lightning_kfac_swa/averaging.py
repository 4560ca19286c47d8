"""Weight averaging and BatchNorm recalibration as plain functions (no Lightning here).

Izmailov et al. (2018), "Averaging Weights Leads to Wider Optima and Better Generalization":
the SWA model is the equal-weight mean of the weights taken at the end of each averaged
epoch, and its BatchNorm statistics are recomputed with one pass over the training data.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def update_average_(average: dict[str, Tensor], current: dict[str, Tensor], n_averaged: int) -> None:
    """Equal-weight running mean, in place: ``avg <- avg + (w - avg) / (n + 1)``.

    Args:
        average: the mean of ``n_averaged`` earlier weight sets, keyed by name; ignored
            (overwritten) when ``n_averaged == 0``.
        current: the new weights, same keys and shapes.
        n_averaged: how many weight sets ``average`` already holds.
    """
    for name, w in current.items():
        if n_averaged == 0:
            average[name].copy_(w)
        elif average[name].is_floating_point():
            average[name].add_(w.to(average[name].dtype) - average[name], alpha=1.0 / (n_averaged + 1))
        else:
            average[name].copy_(w)


def weight_norm(tensors: Iterable[Tensor]) -> Tensor:
    """L2 norm of all given tensors together, ``sqrt(Σ ||w||²)``, as a 0-dim tensor."""
    norms = [torch.linalg.vector_norm(t.detach().float()) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, keyed by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def bn_population_stats(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[object], object],
    all_reduce_sum: Optional[Callable[[Tensor], Tensor]] = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and unbiased variance of every BatchNorm layer's input over all of ``batches``.

    One forward-only, no-grad pass in which the BatchNorm layers normalise with batch
    statistics (train mode), as in :func:`torch.optim.swa_utils.update_bn`, while every
    other module (dropout...) is in eval mode. The statistics are accumulated per example
    and location (sums and counts), so they are the exact statistics of the whole data set,
    independent of how it is split into batches or ranks. Training flags, momenta and
    running buffers of the model are left as they were.

    Args:
        model: the network whose BatchNorm layers are observed.
        batches: iterable of whatever ``forward`` takes.
        forward: runs the model on one batch (e.g. through ``torch.func.functional_call``).
        all_reduce_sum: sums a flat float64 tensor over processes (DDP), or None.

    Returns:
        ``{name: (mean (C,), var (C,))}`` for :func:`batchnorm_layers`; empty without BN.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return {}
    sums = {n: [0.0, None, None] for n in layers}  # count, Σx (C,), Σx² (C,)

    def make_hook(name):
        def hook(module, inputs):
            x = inputs[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1]
            s = sums[name]
            s[0] += x.numel() / x.shape[1]
            s1, s2 = x.sum(dims), (x * x).sum(dims)
            s[1] = s1 if s[1] is None else s[1] + s1
            s[2] = s2 if s[2] is None else s[2] + s2
        return hook

    flags = {m: m.training for m in model.modules()}
    saved = {n: (m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        for m in layers.values():
            m.train()
            m.momentum = 0.0  # keeps running stats as they are while normalising by the batch
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
        for n, m in layers.items():
            m.momentum = saved[n][0]
            for k, b in m.named_buffers(recurse=False):
                b.copy_(saved[n][1][k])
    out = {}
    names = list(layers)
    for n in names:
        if sums[n][1] is None:  # layer never ran: zero contribution, still takes part in the reduce
            c = layers[n].num_features
            dev = layers[n].running_mean.device
            sums[n][1] = torch.zeros(c, dtype=torch.float64, device=dev)
            sums[n][2] = torch.zeros(c, dtype=torch.float64, device=dev)
    flat = torch.cat([torch.cat([sums[n][0] * torch.ones(1, dtype=torch.float64, device=sums[n][1].device),
                                 sums[n][1], sums[n][2]]) for n in names])
    if all_reduce_sum is not None:
        flat = all_reduce_sum(flat)
    pos = 0
    for n in names:
        c = layers[n].num_features
        count, s1, s2 = flat[pos], flat[pos + 1:pos + 1 + c], flat[pos + 1 + c:pos + 1 + 2 * c]
        pos += 1 + 2 * c
        if count <= 1:
            continue
        mean = s1 / count
        var = (s2 - count * mean * mean).clamp(min=0) / (count - 1)
        out[n] = (mean, var)
    return out
