"""K-FAC mathematics as pure, Lightning-free functions.

Follows Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored
Approximate Curvature", and Grosse & Martens (2016), "A Kronecker-factored approximate
Fisher matrix for convolution layers" (the 'expand' reading for convolutions).

Tensor layout used throughout
-----------------------------
* A layer's gradient is handled as a matrix ``M = [dW | db]`` of shape ``(d_out, d_in)``,
  where ``d_in = fan_in (+1 when the layer has a bias)``; a Conv2d weight
  ``(out, C, kh, kw)`` is flattened to ``(out, C*kh*kw)`` in the same ``(C, kh, kw)``
  order that :func:`torch.nn.functional.unfold` produces.
* ``A`` is ``(d_in, d_in)``: the second moment of the layer input ``ā`` (input with a 1
  appended when the layer has a bias). ``G`` is ``(d_out, d_out)``: the second moment of
  ``ĝ``, the per-example gradient of the loss with respect to the layer output.
* The Fisher block acts on ``M`` as ``X -> G X A``, i.e. it is ``A ⊗ G`` on ``vec(M)``
  with column-stacking ``vec``.
* Factor statistics are kept as *sums* with a *count* so that micro-batches and ranks
  can be combined exactly: ``A = A_sum / A_count``, ``G = G_sum / G_count``.
  Linear: ``A_count = B`` (examples), ``G_count = B``.
  Conv2d: ``A_count = B*S`` (example-locations), ``G_count = B``; hence
  ``A ⊗ G = S * [1/(BS) Σ ā āᵀ] ⊗ [1/(BS) Σ ĝ ĝᵀ]`` with the factor ``S`` put in ``G``.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: Largest number of elements of one per-chunk temporary (16 MB in float32). Bigger feature
#: maps are processed in chunks of examples: glibc serves blocks above its mmap threshold
#: (at most 32 MB) with fresh pages, so multi-GB temporaries on every factor-update step
#: cost more in page faults than the matrix products themselves.
CHUNK_ELEMENTS = 4 * 1024 * 1024


def second_moment_sum(rows: Tensor, append_one: bool) -> Tensor:
    """Return ``Σ_r ā_r ā_rᵀ`` for the rows of ``rows``.

    Args:
        rows: ``(N, d)``.
        append_one: treat every row as ``[row, 1]`` (bias column), without building the
            ``(N, d+1)`` copy.

    Returns:
        ``(d, d)`` or ``(d+1, d+1)`` when ``append_one``.
    """
    n, d = rows.shape
    if not append_one:
        return rows.T @ rows
    return _with_bias_column(rows.T @ rows, rows.sum(0), n)


def _with_bias_column(moment: Tensor, col_sum: Tensor, n: float) -> Tensor:
    """``[[M, s], [sᵀ, n]]``: the second moment of ``[v, 1]`` from that of ``v``."""
    d = moment.shape[0]
    out = moment.new_empty(d + 1, d + 1)
    out[:d, :d] = moment
    out[:d, d] = col_sum
    out[d, :d] = col_sum
    out[d, d] = n
    return out


def channel_moment_sum(t: Tensor) -> Tensor:
    """``Σ_{n,t} v_{n,t} v_{n,t}ᵀ`` for ``t (B, K, S)`` holding vectors ``v (K,)`` at S positions.

    Picks the cheaper of two exact layouts: a batched ``(K, S) @ (S, K)`` product when each
    example has at least K positions (no transpose copy), else one ``(K, B·S) @ (B·S, K)``.

    Returns:
        ``(K, K)``.
    """
    b, k, s = t.shape
    if s >= k:
        return torch.bmm(t, t.transpose(1, 2)).sum(0)
    rows = t.transpose(1, 2).reshape(-1, k)
    return rows.T @ rows


class ConvGeometry(NamedTuple):
    """What patch extraction needs to know about a Conv2d (all pairs are (h, w))."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # F.pad order: (left, right, top, bottom)
    padding_mode: str  # 'zeros', 'reflect', 'replicate' or 'circular'


def conv_geometry(conv: torch.nn.Conv2d) -> ConvGeometry:
    """Read a :class:`~torch.nn.Conv2d`'s geometry, resolving ``padding='same'|'valid'``."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "valid":
        pad = (0, 0, 0, 0)
    elif conv.padding == "same":
        # total padding dilation*(k-1), the extra one on the right/bottom, as torch does
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pad = (pw, pw, ph, ph)
    return ConvGeometry((kh, kw), tuple(conv.stride), (dh, dw), pad, conv.padding_mode)


def conv_output_hw(geo: ConvGeometry, h: int, w: int) -> tuple[int, int]:
    """Output size ``(H_out, W_out)`` of a convolution with geometry ``geo`` on an ``h × w`` input."""
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    left, right, top, bottom = geo.padding
    return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (w + left + right - dw * (kw - 1) - 1) // sw + 1)


def unfold_patches(x: Tensor, geo: ConvGeometry) -> Tensor:
    """Extract the convolution patches of ``x``.

    Args:
        x: input ``(B, C, H, W)``.
        geo: the layer's :class:`ConvGeometry`.

    Returns:
        ``(B, C*kh*kw, S)`` with ``S = H_out * W_out``; rows in ``(C, kh, kw)`` order. A 1×1,
        stride-1, unpadded convolution returns a view of ``x`` (no copy).
    """
    left, right, top, bottom = geo.padding
    if geo.kernel_size == (1, 1) and geo.stride == (1, 1) and not any(geo.padding):
        return x.reshape(x.shape[0], x.shape[1], -1)
    if geo.padding_mode == "zeros" and left == right and top == bottom:
        return F.unfold(x, geo.kernel_size, dilation=geo.dilation, padding=(top, left), stride=geo.stride)
    if any(geo.padding):
        mode = "constant" if geo.padding_mode == "zeros" else geo.padding_mode
        x = F.pad(x, geo.padding, mode=mode)
    return F.unfold(x, geo.kernel_size, dilation=geo.dilation, stride=geo.stride)


def _chunk(b: int, per_example: int) -> int:
    return max(1, min(b, CHUNK_ELEMENTS // max(per_example, 1)))


def location_subset(batch: int, locations: int, keep: Optional[int],
                    generator: Optional[torch.Generator]) -> Optional[Tensor]:
    """Per-example random subsets of output locations for estimated conv statistics.

    Returns:
        ``(batch, keep)`` indices into ``[0, locations)``, each row ``keep`` distinct locations
        drawn uniformly for that example; None when ``keep`` is None or ``>= locations``
        (use them all).
    """
    if keep is None or keep >= locations:
        return None
    return torch.rand(batch, locations, generator=generator).argsort(dim=1)[:, :keep]


def _take(t: Tensor, idx: Optional[Tensor]) -> Tensor:
    """``t (b, K, S)`` restricted to the locations ``idx (b, m)`` of each example: ``(b, K, m)``."""
    if idx is None:
        return t
    idx = idx.to(t.device)
    return t.gather(2, idx[:, None, :].expand(-1, t.shape[1], -1))


class _ShiftPlan(NamedTuple):
    """How :func:`shifted_input_sum` assembles A for one geometry and input size (cached)."""

    taps: int  # kh * kw
    # one entry per input shift d = κ_j - κ_i between kernel taps i <= j:
    # (dy, dx, first row, last row + 1, column bands [(c0, c1)], tap pairs [(i, j)], selector)
    shifts: tuple
    tap_rects: tuple  # per tap: rows (r0, r1) and columns (c0, c1) of the input it reads


@functools.lru_cache(maxsize=256)
def _shift_plan(kernel: tuple[int, int], dilation: tuple[int, int], pad_top_left: tuple[int, int],
                in_hw: tuple[int, int], out_hw: tuple[int, int]) -> _ShiftPlan:
    (kh, kw), (dh, dw), (pt, pl), (h, w), (ho, wo) = kernel, dilation, pad_top_left, in_hw, out_hw
    # tap (a, b) of output location t reads input u = t + κ, κ = (a·dh - pt, b·dw - pl)
    kappa = [(a * dh - pt, b * dw - pl) for a in range(kh) for b in range(kw)]

    def span(lo: int, n: int, size: int, shift: int) -> tuple[int, int]:
        # input coordinates u in [lo, lo + n) with 0 <= u < size and 0 <= u + shift < size
        return max(lo, 0, -shift), min(lo + n, size, size - shift)

    by_shift: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in itertools.combinations_with_replacement(range(len(kappa)), 2):
        d = (kappa[j][0] - kappa[i][0], kappa[j][1] - kappa[i][1])
        by_shift.setdefault(d, []).append((i, j))
    shifts = []
    for (dy, dx), pairs in by_shift.items():
        rows = [span(kappa[i][0], ho, h, dy) for i, _ in pairs]
        cols = [span(kappa[i][1], wo, w, dx) for i, _ in pairs]
        live = [k for k in range(len(pairs)) if rows[k][0] < rows[k][1] and cols[k][0] < cols[k][1]]
        if not live:
            continue  # every product of this shift falls outside the input: zero blocks
        r0, r1 = min(rows[k][0] for k in live), max(rows[k][1] for k in live)
        edges = sorted({e for k in live for e in cols[k]})
        bands = [(c0, c1) for c0, c1 in zip(edges[:-1], edges[1:])]
        # selector[p, band, row] = 1 where pair p's rectangle holds that band and row
        sel = torch.zeros(len(live), len(bands), r1 - r0)
        for p, k in enumerate(live):
            for q, (c0, c1) in enumerate(bands):
                if cols[k][0] <= c0 and c1 <= cols[k][1]:
                    sel[p, q, rows[k][0] - r0:rows[k][1] - r0] = 1.0
        shifts.append((dy, dx, r0, r1, tuple(bands), tuple(pairs[k] for k in live), sel.reshape(len(live), -1)))
    rects = tuple((span(ky, ho, h, 0), span(kx, wo, w, 0)) for ky, kx in kappa)
    return _ShiftPlan(len(kappa), tuple(shifts), rects)


def shifted_input_sum(x: Tensor, geo: ConvGeometry, bias: bool) -> tuple[Tensor, int]:
    """``Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ`` of a stride-1 convolution without extracting patches.

    The block of A for kernel taps i, j (input offsets κ_i, κ_j) is
    ``Σ_n Σ_{u ∈ R_i} x_{n,u} x_{n,u+d}ᵀ`` with ``d = κ_j - κ_i`` and ``R_i`` the input
    rectangle tap i reads (zero padding contributes nothing). Taps with the same shift d
    share their products: each shift costs one batch of ``(C, B·w) @ (B·w, C)`` products,
    one per input row and column band, instead of one ``(C·kh·kw)²`` product over all
    patches. A 3×3 kernel has 13 distinct shifts for the 45 blocks of the upper triangle,
    about 1/6 of the multiply-adds of the unfolded product. Exact up to float rounding.

    Args:
        x: layer input ``(B, C, H, W)``.
        geo: a :class:`ConvGeometry` with stride (1, 1).

    Returns:
        ``(sum (d, d), count)`` as :func:`conv_input_sum` (rows in ``(C, kh, kw)`` order).
    """
    if geo.stride != (1, 1):
        raise ValueError(f"shifted_input_sum needs stride (1, 1), got {geo.stride}")
    ho, wo = conv_output_hw(geo, x.shape[2], x.shape[3])
    left, _, top, _ = geo.padding
    if geo.padding_mode != "zeros" and any(geo.padding):
        x = F.pad(x, geo.padding, mode=geo.padding_mode)
        left = top = 0
    b, c, h, w = x.shape
    plan = _shift_plan(geo.kernel_size, geo.dilation, (top, left), (h, w), (ho, wo))
    taps, k = plan.taps, c * plan.taps
    per_shift: list[Optional[Tensor]] = [None] * len(plan.shifts)  # (pairs, C, C) block sums
    col_sums = x.new_zeros(h, w, c) if bias else None
    chunk = _chunk(b, c * h * w)
    for start in range(0, b, chunk):
        # (H, W, n, C) in two copies: a direct permute gathers single floats C·H·W apart and
        # is ~3.5x slower on CPU (7.4 vs 2.1 ms at (128, 16, 32, 32)) than moving whole C-vectors
        xt = x[start:start + chunk].permute(0, 2, 3, 1).contiguous().permute(1, 2, 0, 3).contiguous()
        n = xt.shape[2]
        for s, (dy, dx, r0, r1, bands, pairs, sel) in enumerate(plan.shifts):
            prods = []
            for c0, c1 in bands:  # per input row: (C, n·w) @ (n·w, C) over the band's columns
                lhs = xt[r0:r1, c0:c1].reshape(r1 - r0, (c1 - c0) * n, c)
                rhs = xt[r0 + dy:r1 + dy, c0 + dx:c1 + dx].reshape(r1 - r0, (c1 - c0) * n, c)
                prods.append(torch.bmm(lhs.transpose(1, 2), rhs))
            part = (sel.to(device=x.device, dtype=x.dtype) @ torch.stack(prods).reshape(-1, c * c)).reshape(-1, c, c)
            per_shift[s] = part if per_shift[s] is None else per_shift[s].add_(part)
        if col_sums is not None:
            col_sums += xt.sum(2)
    count = b * ho * wo
    block: dict[tuple[int, int], Tensor] = {}
    for (*_, pairs, _), sums in zip(plan.shifts, per_shift):
        for (i, j), b_ij in zip(pairs, sums):
            block[i, j] = b_ij
            block[j, i] = b_ij.T  # A is symmetric
    zero = x.new_zeros(c, c)  # shifts that fall entirely outside the input
    out = x.new_empty(k + int(bias), k + int(bias))
    rows = out[:k, :k].view(c, taps, k)  # row (c, i) of A, columns in (C, kh, kw) order
    for i in range(taps):  # one strip of rows per tap, written contiguously
        strip = torch.stack([block.get((i, j), zero) for j in range(taps)], dim=2)  # (C, C, taps)
        rows[:, i].copy_(strip.view(c, k))
    if col_sums is not None:
        sums = torch.stack([col_sums[r0:r1, c0:c1].sum((0, 1)) for (r0, r1), (c0, c1) in plan.tap_rects], 1)
        out[:k, k] = sums.reshape(k)
        out[k, :k] = sums.reshape(k)
        out[k, k] = count
    return out, count


def conv_input_sum(x: Tensor, geo: ConvGeometry, bias: bool, locations: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, int]:
    """``Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ`` over examples n and output locations t, and the count.

    With ``locations`` = m, each example contributes only m of its S output locations,
    drawn at random (:func:`location_subset`): an unbiased estimate of the mean at about
    m/S of the cost of the products. With every location and stride 1 (and a kernel larger
    than 1×1) the exact sum comes from :func:`shifted_input_sum`, without unfolding.

    Args:
        x: layer input ``(B, C, H, W)``.
        geo: the layer's :class:`ConvGeometry`.
        bias: append the constant 1 of the bias.
        locations: output locations used per example (None: all).
        generator: random source of the location subsets.

    Returns:
        ``(sum (d, d), count)`` with ``d = C*kh*kw (+1)`` and count = rows summed.
    """
    b, c = x.shape[:2]
    k = c * geo.kernel_size[0] * geo.kernel_size[1]
    s = math.prod(conv_output_hw(geo, x.shape[2], x.shape[3]))
    idx = location_subset(b, s, locations, generator)
    if idx is None and geo.stride == (1, 1) and geo.kernel_size != (1, 1):
        return shifted_input_sum(x, geo, bias)
    m = s if idx is None else idx.shape[1]
    chunk = _chunk(b, k * s + (k * k if m >= k else 0))
    if m < k:  # the (K, N) @ (N, K) product is efficient only with N = chunk·m >= K
        chunk = min(b, max(chunk, -(-k // m)))
    total: Optional[Tensor] = None
    col_sum: Optional[Tensor] = None
    for start in range(0, b, chunk):
        cols = _take(unfold_patches(x[start:start + chunk], geo), None if idx is None else idx[start:start + chunk])
        part = channel_moment_sum(cols)
        total = part if total is None else total.add_(part)
        if bias:
            cs = cols.sum((0, 2))
            col_sum = cs if col_sum is None else col_sum.add_(cs)
    assert total is not None
    count = b * m
    if bias:
        total = _with_bias_column(total, col_sum, count)
    return total, count


def output_grad_sum(g: Tensor, locations: Optional[int] = None,
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, float]:
    """``Σ_n Σ_t ĝ_{n,t} ĝ_{n,t}ᵀ`` and the count of examples it stands for.

    Args:
        g: per-example output gradients ĝ, ``(B, d_out)`` for Linear or
            ``(B, d_out, H, W)`` for Conv2d.
        locations, generator: as in :func:`conv_input_sum`; the sum over the m used
            locations stands for all S (``count`` = B·m/S instead of B).

    Returns:
        ``(sum (d_out, d_out), count)``.
    """
    b = g.shape[0]
    if g.dim() == 2:
        return g.T @ g, float(b)
    c, s = g.shape[1], g.shape[2] * g.shape[3]
    g = g.reshape(b, c, s)
    idx = location_subset(b, s, locations, generator)
    m = s if idx is None else idx.shape[1]
    chunk = _chunk(b, c * s + (c * c if m >= c else 0))
    total: Optional[Tensor] = None
    for start in range(0, b, chunk):
        part = channel_moment_sum(_take(g[start:start + chunk], None if idx is None else idx[start:start + chunk]))
        total = part if total is None else total.add_(part)
    assert total is not None
    return total, b * m / s


class Eigen(NamedTuple):
    """Eigendecomposition ``F = Q diag(d) Qᵀ`` of a factor: ``Q (d, d)``, ``d (d,)``."""

    Q: Tensor
    d: Tensor


def symmetric_eigen(factor: Tensor) -> Eigen:
    """Eigendecomposition of a symmetric PSD factor, eigenvalues clamped at 0.

    Raises :class:`torch.linalg.LinAlgError` when ``eigh`` does not converge.
    """
    d, q = torch.linalg.eigh(factor)
    return Eigen(q, d.clamp_(min=0.0))


def pi_damping(A: Tensor, G: Tensor) -> Tensor:
    """Tikhonov factor split π = sqrt((tr A / dim A) / (tr G / dim G)) (Martens & Grosse §6.3)."""
    ta = torch.diagonal(A).mean()
    tg = torch.diagonal(G).mean()
    eps = torch.finfo(A.dtype).tiny
    return torch.sqrt(ta.clamp(min=eps) / tg.clamp(min=eps))


def damped_inverse(factor: Tensor, shift: Tensor | float) -> Tensor:
    """``(F + shift I)⁻¹`` for a symmetric PSD ``F (d, d)`` via Cholesky.

    Raises :class:`torch.linalg.LinAlgError` when the shifted matrix is not positive definite.
    """
    m = factor.clone()
    m.diagonal().add_(shift)
    chol, info = torch.linalg.cholesky_ex(m)
    if bool(info.ne(0).any()):
        raise torch.linalg.LinAlgError("Cholesky factorisation failed")
    return torch.cholesky_inverse(chol)


def inverse_pair(A: Tensor, G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping: ``((A + π√λ I)⁻¹, (G + √λ/π I)⁻¹)``."""
    pi = pi_damping(A, G)
    root = math.sqrt(damping)
    return damped_inverse(A, pi * root), damped_inverse(G, root / pi)


def precondition_eigen(grad: Tensor, a: Eigen, g: Eigen, damping: float) -> Tensor:
    """``(A ⊗ G + λ I)⁻¹ vec(grad)``, exactly, from the factors' eigendecompositions.

    ``ΔW = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ``.

    Args:
        grad: ``(d_out, d_in)``.
        a: eigendecomposition of A ``(d_in, d_in)``; g: of G ``(d_out, d_out)``.

    Returns:
        ``(d_out, d_in)``.
    """
    v = g.Q.T @ grad @ a.Q
    v.div_(torch.outer(g.d, a.d).add_(damping))
    return g.Q @ v @ a.Q.T


def precondition_inverse(grad: Tensor, a_inv: Tensor, g_inv: Tensor) -> Tensor:
    """``G⁻¹ grad A⁻¹`` with already damped inverses: ``(d_out, d_out) @ (d_out, d_in) @ (d_in, d_in)``."""
    return g_inv @ grad @ a_inv


def kl_clip_scale(vg_sum: Tensor, kl_clip: float) -> Tensor:
    """ν = min(1, sqrt(κ / Σ_layers lr² ⟨ΔW, ∇W⟩)), a 0-dim tensor (no host sync).

    Ba, Grosse & Martens (2017), "Distributed second-order optimization using
    Kronecker-factored approximations", §5.
    """
    tiny = torch.finfo(vg_sum.dtype).tiny
    return torch.sqrt(kl_clip / vg_sum.clamp(min=tiny)).clamp(max=1.0)


def running_average(running: Optional[Tensor], new: Tensor, decay: float) -> Tensor:
    """Running average ``decay * running + (1 - decay) * new``; the first call returns ``new``.

    Computed in place in ``new`` (a fresh statistic the caller owns), so that a factor update
    allocates no new ``(d, d)`` matrix; ``running`` itself is left untouched because it may
    still be referenced as the source of the current decomposition (needed for an exact resume).
    """
    if running is None:
        return new
    return new.lerp_(running, decay)


def all_finite(tensors: list[Tensor]) -> bool:
    """True when every element of every tensor is finite, with one host sync.

    Tests the sum of each tensor: NaN and ±inf propagate through a sum, so this misses no
    non-finite element and allocates nothing of the tensors' size. (A sum of finite values
    that overflows also reads as non-finite; statistics that large are unusable anyway.)
    """
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack([t.sum() for t in tensors])).all())
