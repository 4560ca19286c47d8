"""Small collective helpers for K-FAC and SWA under torch.distributed (no Lightning here).

Everything degrades to a no-op in a single process, so callers need no special case.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(flat: Tensor) -> Tensor:
    """In-place SUM all-reduce of one flat tensor over the default group (no-op alone)."""
    if world()[1] > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat


def pack_symmetric(mats: Sequence[Tensor]) -> Tensor:
    """Concatenate the upper triangles (diagonal included) of square symmetric matrices.

    Args:
        mats: matrices ``(d_i, d_i)`` of one dtype and device.

    Returns:
        ``(Σ_i d_i (d_i + 1) / 2,)``: about half of the full matrices' size.
    """
    parts = []
    for m in mats:
        r, c = torch.triu_indices(m.shape[0], m.shape[0], device=m.device)
        parts.append(m[r, c])
    return torch.cat(parts)


def unpack_symmetric(flat: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Inverse of :func:`pack_symmetric`: rebuild the ``(d_i, d_i)`` symmetric matrices."""
    out, pos = [], 0
    for d in sizes:
        n = d * (d + 1) // 2
        r, c = torch.triu_indices(d, d, device=flat.device)
        m = flat.new_empty(d, d)
        m[r, c] = flat[pos:pos + n]
        m[c, r] = flat[pos:pos + n]
        out.append(m)
        pos += n
    return out


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time placement of tasks onto ranks (KAISA-style).

    Tasks are taken from the most to the least expensive and each goes to the rank with
    the smallest load so far; ties go to the lowest rank, so every rank computes the same
    placement without talking.

    Returns:
        the owning rank of every task, in the order of ``costs``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    owner = [0] * len(costs)
    loads = [(0.0, r) for r in range(world_size)]
    heapq.heapify(loads)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner
