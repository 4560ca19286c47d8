"""The MC Fisher's sampled-label backward, carried inside the real backward.

``fisher="mc"`` needs, on a factor-update step, the gradient of a loss on *sampled* labels
w.r.t. every layer output, in addition to the real gradients. The obvious way is a second
``torch.autograd.grad(..., retain_graph=True)`` before the real backward. On CPU that pass
costs far more than its arithmetic: with the graph retained, none of the forward's memory is
free yet, so every buffer of the pass lands on fresh pages (PreResNet110 at batch 128: 600 k+
minor page faults under glibc's allocator, ~2 s for 0.8 s of arithmetic).

:class:`SampledBackward` does the same propagation *during* the real backward instead. It puts
a hook on every autograd node between the logits and the leaves. Right after the real backward
has run a node (its saved tensors are released only after the hooks), the hook applies the same
node to the sampled cotangent and passes the results along the node's edges the way the engine
does: summed where edges meet, reduced to the input's shape where it was broadcast, cast to
its dtype. Each buffer of the sampled pass is then allocated while the real backward is
freeing the forward's, and is reused like theirs.

Why a hook sees a complete cotangent: the engine runs a node only after every node that feeds
it has run (and their hooks have returned), and the sampled cotangent flows along a subset of
the same edges, so every contribution has arrived when the node's hook fires.

Why after, not before, the real node: a saved tensor may be unpackable only once per backward
(``torch.utils.checkpoint`` without reentrancy). Unpacked by the real node first, a second
unpack fails inside the hook, where the failure is caught and reported (:attr:`error`), and the
real backward goes on; the other order would break the real backward.

What it never does: call an ``AccumulateGrad`` node (no parameter's ``.grad`` is touched and
DDP's gradient hooks do not see the sampled pass), or compute a convolution's weight gradient
(only the input gradient is propagated; every other node is applied as the engine would).
Graphs holding a node it cannot apply (a Python ``autograd.Function``, nested tensors) are
reported by :func:`plan` so the caller can use a separate ``autograd.grad`` pass instead.

No Lightning in here.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.profiler import record_function

Tap = Callable[[Tensor], None]


def _is_leaf_sink(node) -> bool:
    """True for the node that accumulates a leaf's ``.grad`` (never called by the sampled pass)."""
    return type(node).__name__ == "AccumulateGrad"


def _callable(node) -> bool:
    """True for C++ autograd nodes (callable on gradients); False for Python Function nodes."""
    return callable(node) and hasattr(node, "_input_metadata") and not any(
        m.is_nested_tensor or m.is_cpp_nested_tensor for m in node._input_metadata)


def plan(root: Tensor) -> Optional[list]:
    """Every autograd node reachable from ``root.grad_fn`` (leaf sinks excluded), or None
    when one of them cannot be applied directly (then use a separate ``autograd.grad`` pass)."""
    if root.grad_fn is None:
        return None
    seen, order, stack = set(), [], [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or _is_leaf_sink(node):
            continue
        if not _callable(node):
            return None
        seen.add(node)
        order.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return order


def _conv_input_grad(node, grad: Tensor) -> Optional[tuple]:
    """Input gradient only of a ``ConvolutionBackward0`` node, or None to apply the node as is."""
    if type(node).__name__ != "ConvolutionBackward0" or len(node.next_functions) != 3:
        return None
    if node.next_functions[0][0] is None:  # the input needs no gradient: nothing to pass on
        return (None, None, None)
    inp, weight = getattr(node, "_saved_input", None), getattr(node, "_saved_weight", None)
    if inp is None or weight is None:
        return None
    gi, _, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, node._saved_stride, node._saved_padding, node._saved_dilation,
        node._saved_transposed, node._saved_output_padding, node._saved_groups, [True, False, False])
    return (gi, None, None)


class SampledBackward:
    """Propagate ``cotangent`` (the gradient at ``root``) through ``root``'s graph during the
    next real backward that passes through it, calling ``taps`` on the way.

    Args:
        root: a non-leaf tensor (the logits), ``(B, K)``.
        cotangent: the gradient of the sampled loss w.r.t. ``root``, same shape and dtype.
        nodes: :func:`plan` ``(root)``.
        taps: ``{node: [(slot, fn), ...]}``: ``fn(grad)`` is called with the sampled gradient
            arriving at input ``slot`` of ``node`` (the gradient w.r.t. the tensor whose
            ``grad_fn`` is ``node`` and ``output_nr`` is ``slot``), when one arrives.

    Use :meth:`detach` after the real backward; :attr:`reached` says whether it passed the
    root, :attr:`seconds` how long the hooks took, :attr:`error` holds an exception raised
    while propagating (propagation then stops; the real backward is never disturbed).
    """

    def __init__(self, root: Tensor, cotangent: Tensor, nodes: list, taps: dict[Any, list[tuple[int, Tap]]]) -> None:
        start = [None] * len(root.grad_fn._input_metadata)
        start[root.output_nr] = cotangent.detach()
        self._pending: dict = {root.grad_fn: start}
        self._root = root.grad_fn
        self._taps = taps
        self._lock = threading.Lock()
        self.reached = False
        self.seconds = 0.0  # time spent in the hooks (propagation and taps)
        self.error: Optional[BaseException] = None
        self._handles = [node.register_hook(self._make_hook(node)) for node in nodes]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._pending, self._taps = [], {}, {}

    def _make_hook(self, node):
        def hook(grad_inputs, grad_outputs):
            with self._lock:
                grads = self._pending.pop(node, None)
            if node is self._root:
                self.reached = True
            if grads is None or self.error is not None:
                return None
            t0 = time.perf_counter()
            try:
                for slot, fn in self._taps.get(node, ()):
                    if grads[slot] is not None:
                        fn(grads[slot])
                with record_function("kfac::sampled_backward"):
                    self._step(node, grads)
            except Exception as err:  # noqa: BLE001 - reported through .error, never raised into the engine
                self.error = err
                with self._lock:
                    self._pending.clear()
            self.seconds += time.perf_counter() - t0
            return None
        return hook

    def _step(self, node, grads: list) -> None:
        """Apply ``node`` to the sampled gradients ``grads`` and pass the results on."""
        edges = node.next_functions
        if all(n is None or _is_leaf_sink(n) for n, _ in edges):
            return
        device = next(g.device for g in grads if g is not None)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            outs = _conv_input_grad(node, grads[0]) if grads[0] is not None else None
            if outs is None:
                outs = node(*grads)
        if isinstance(outs, Tensor):
            outs = (outs,)
        for (nxt, nr), g in zip(edges, outs):
            if nxt is None or g is None or _is_leaf_sink(nxt):
                continue
            meta = nxt._input_metadata[nr]
            # what the engine's validate_outputs does between two nodes
            if tuple(g.shape) != tuple(meta.shape):
                g = g.sum_to_size(meta.shape)
            if g.dtype != meta.dtype or g.device != meta.device:
                g = g.to(device=meta.device, dtype=meta.dtype)
            with self._lock:
                slot = self._pending.setdefault(nxt, [None] * len(nxt._input_metadata))
                slot[nr] = g if slot[nr] is None else slot[nr] + g
