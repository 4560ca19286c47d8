"""The :class:`KFAC` Lightning callback: K-FAC preconditioning for any optimizer.

Thin glue over public Lightning hooks; the mathematics is in
:mod:`lightning_kfac_swa.kfac_math` and :mod:`lightning_kfac_swa.kfac_layers`.

When things happen (k = optimizer steps taken so far, counted by this callback):

* ``on_train_batch_start``: if ``k % factor_update_interval == 0`` the micro-batch is
  recorded (every micro-batch of an accumulation window). Otherwise the module hooks only
  check a flag.
* forward hooks on each Linear/Conv2d add the input statistics ``Σ ā āᵀ`` at once.
* ``fisher="empirical"``: the forward hooks also put a tensor hook on each layer output,
  which reads ĝ in the real backward. ``fisher="mc"``: in ``on_before_backward`` labels are
  sampled from the softmax of the logits and the gradient of the sampled loss is propagated
  back from the logits; taps on each layer output's autograd node read ĝ. On CPU this rides along the real
  backward (:mod:`lightning_kfac_swa.sampled_backward`: a second pass over the retained graph
  costs mostly page faults there); on other devices, or for graphs with Python
  ``autograd.Function`` nodes, it is a separate ``torch.autograd.grad`` pass w.r.t. the first
  layer's weight only, run before the real backward. Either way no parameter's ``.grad`` is
  touched, no extra forward is run and DDP's gradient hooks do not fire.
* ``on_before_optimizer_step`` (after accumulation and AMP unscaling, before clipping):
  factors are finalised (all-reduced across ranks), decomposed every
  ``inverse_update_interval`` steps, and every layer's gradient is replaced by its
  preconditioned, KL-clipped version.
"""
from __future__ import annotations

import math
import re
import time
import zlib
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.profiler import record_function

from lightning_kfac_swa import distributed as kdist
from lightning_kfac_swa import kfac_math as km
from lightning_kfac_swa import sampled_backward as sb
from lightning_kfac_swa.kfac_layers import SUPPORTED, LinearHelper, make_helper

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


@dataclass
class _Layer:
    """Per-layer state: running factors, pending sums of the current step, decomposition."""

    helper: LinearHelper
    dtype: torch.dtype
    A: Optional[Tensor] = None  # running factors (d_in, d_in), (d_out, d_out)
    G: Optional[Tensor] = None
    A_dec: Optional[Tensor] = None  # the factors the current decomposition was made from
    G_dec: Optional[Tensor] = None
    decomposition: Optional[tuple] = None  # (Eigen, Eigen) or (A_inv, G_inv)
    a_sum: Optional[Tensor] = None
    a_count: float = 0.0
    g_sum: Optional[Tensor] = None
    g_count: float = 0.0

    def add_a(self, s: Tensor, c: float) -> None:
        self.a_sum = s if self.a_sum is None else self.a_sum.add_(s)
        self.a_count += c

    def add_g(self, s: Tensor, c: float) -> None:
        self.g_sum = s if self.g_sum is None else self.g_sum.add_(s)
        self.g_count += c

    def clear_pending(self) -> None:
        self.a_sum, self.g_sum, self.a_count, self.g_count = None, None, 0.0, 0.0


class KFAC(Callback):
    r"""Kronecker-factored approximate curvature preconditioning as a Lightning callback.

    Every ``nn.Linear`` and ``nn.Conv2d`` (groups=1; any stride, padding incl. ``"same"``,
    dilation, padding mode) gets a Fisher block ``A ⊗ G`` (see
    :mod:`lightning_kfac_swa.kfac_math` for the exact definitions). Right before the
    optimizer step its gradient ``[∇W | ∇b]`` is replaced by the preconditioned one, so
    any torch optimizer (SGD with momentum and weight decay in the paper) then applies it.

    Args:
        damping: λ > 0. ``method="eigen"`` applies ``(A ⊗ G + λ I)⁻¹`` exactly;
            ``method="inverse"`` applies ``(G + √λ/π I)⁻¹ ∇ (A + π√λ I)⁻¹`` with
            π = sqrt((tr A / dim A) / (tr G / dim G)).
        factor_decay: running average weight in [0, 1): ``F <- decay F + (1 - decay) F_new``;
            the first update stores ``F_new`` itself.
        factor_update_interval: optimizer steps between factor updates (>= 1).
        inverse_update_interval: optimizer steps between decompositions (>= 1); the paper
            recomputes the inverses once per 100 iterations. Step 0 always does both.
        kl_clip: κ > 0, or None to disable. All preconditioned gradients are scaled by
            ν = min(1, sqrt(κ / Σ_layers lr² ⟨ΔW, ∇W⟩)) with each layer's param-group lr.
        fisher: ``"mc"`` samples labels from the model's predictive distribution (softmax of
            the logits); ``"empirical"`` uses the true labels (the real loss's gradient).
        method: ``"eigen"`` or ``"inverse"`` (half the matrix products per step).
        skip: regular expressions (``re.search``) on qualified module names; matching
            layers are left to the plain optimizer.
        logits_module: qualified name of the module whose output are the logits
            (``fisher="mc"``). None: the output of the last ``nn.Linear``/``nn.Conv2d``
            (skipped or not) that ran in the forward pass, i.e. the classifier of a usual
            network; an error says so when that output is not ``(batch, classes)``.
        conv_locations: m >= 1, or None. Factor statistics of a Conv2d use only m of each
            example's output locations, drawn at random per example and step: an unbiased
            estimate at about m/S of the cost of the statistics on maps of S > m locations.
            None (default) uses every location.
        distribute_decompositions: under DDP, spread the decompositions across ranks by
            cost and share the results (each of N ranks does about 1/N of the work; one
            extra all-reduce per decomposition step). False: every rank computes all of them.

    The loss is assumed to be the mean over the batch of per-example losses (as
    ``F.cross_entropy`` is), so that ``ĝ = B × ∂loss/∂output``.
    """

    def __init__(
        self,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_interval: int = 10,
        inverse_update_interval: int = 100,
        kl_clip: Optional[float] = 1e-3,
        fisher: Literal["mc", "empirical"] = "mc",
        method: Literal["eigen", "inverse"] = "eigen",
        skip: Sequence[str] = (),
        logits_module: Optional[str] = None,
        conv_locations: Optional[int] = None,
        distribute_decompositions: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping!r}")
        if isinstance(factor_decay, bool) or not isinstance(factor_decay, (int, float)) \
                or not 0 <= factor_decay < 1:
            raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay!r}")
        for arg, val in (("factor_update_interval", factor_update_interval),
                         ("inverse_update_interval", inverse_update_interval)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {val!r}")
        if conv_locations is not None and (isinstance(conv_locations, bool) or not isinstance(conv_locations, int)
                                           or conv_locations < 1):
            raise ValueError(f"conv_locations must be an integer >= 1 or None, got {conv_locations!r}")
        if kl_clip is not None and (isinstance(kl_clip, bool) or not isinstance(kl_clip, (int, float))
                                    or not kl_clip > 0):
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip!r}")
        if fisher not in ("mc", "empirical"):
            raise ValueError(f"fisher must be one of 'mc', 'empirical', got {fisher!r}")
        if method not in ("eigen", "inverse"):
            raise ValueError(f"method must be one of 'eigen', 'inverse', got {method!r}")
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip must be a sequence of regular expressions, got {skip!r}")
        for pattern in skip:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"skip must hold valid regular expressions, got {pattern!r}: {err}") from None
        if logits_module is not None and not isinstance(logits_module, str):
            raise ValueError(f"logits_module must be a module name or None, got {logits_module!r}")
        if not isinstance(distribute_decompositions, bool):
            raise ValueError(f"distribute_decompositions must be a bool, got {distribute_decompositions!r}")
        self.damping = float(damping)
        self.factor_decay = float(factor_decay)
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.fisher = fisher
        self.method = method
        self.skip = tuple(skip)
        self.logits_module = logits_module
        self.conv_locations = conv_locations
        self.distribute_decompositions = distribute_decompositions

        self.steps = 0  # optimizer steps taken with this callback
        self.seed: Optional[int] = None  # base seed of the MC label sampler
        self._layers: dict[str, _Layer] = {}
        self._handles: list = []
        self._recording = False
        self._micro = 0  # micro-batch index inside the current accumulation window
        self._logits: Optional[Tensor] = None
        # (layer, fired flag, output's autograd node, its slot) of the outputs of this micro-batch
        self._pending: list = []
        self._sampled: Optional[sb.SampledBackward] = None
        self._ride_along = True  # False once the ride-along sampled backward failed in this fit
        self._pending_state: Optional[dict] = None
        self._needs_decomposition = False
        self._warned: set[str] = set()
        self._factor_seconds = 0.0

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(cls.__name__ in _UNSUPPORTED_STRATEGIES for cls in type(trainer.strategy).__mro__):
            raise ValueError(
                f"KFAC does not support the {strategy} strategy (its parameters are sharded); "
                "use a single device or a DDP strategy ('ddp', 'ddp_spawn', ...)"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "KFAC needs automatic optimization (the LightningModule sets "
                "automatic_optimization=False); precondition manually or turn it back on"
            )
        self._ride_along = True
        self._attach(pl_module)

    def _attach(self, pl_module: "pl.LightningModule") -> None:
        self._detach()
        self._layers = {}
        names = dict(pl_module.named_modules())
        if self.logits_module is not None and self.logits_module not in names:
            raise ValueError(f"logits_module must name a module of the model, got {self.logits_module!r}")
        for name, module in names.items():
            if not isinstance(module, SUPPORTED):
                continue
            if any(re.search(p, name) for p in self.skip) or not module.weight.requires_grad:
                if self.logits_module is None:  # a skipped classifier still provides the logits
                    self._handles.append(module.register_forward_hook(self._logits_hook))
                continue
            helper = make_helper(name, module)
            dtype = torch.promote_types(module.weight.dtype, torch.float32)
            rec = _Layer(helper, dtype)
            self._layers[name] = rec
            self._handles.append(module.register_forward_hook(self._make_forward_hook(rec)))
        if not self._layers:
            raise ValueError(
                f"KFAC found no supported layer (trainable nn.Linear / nn.Conv2d) in "
                f"{type(pl_module).__name__} with skip={list(self.skip)!r}"
            )
        if self.logits_module is not None:
            self._handles.append(names[self.logits_module].register_forward_hook(self._logits_hook))
        if self.seed is None:
            self.seed = int(torch.initial_seed()) % (2**62)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._detach()
            self._recording = False

    # ------------------------------------------------------------ module hooks
    def _make_forward_hook(self, rec: _Layer):
        def hook(module, inputs, output):
            if not self._recording or not torch.is_grad_enabled():
                return
            t0 = time.perf_counter()
            x = inputs[0].detach()
            with torch.autocast(x.device.type, enabled=False), record_function("kfac::A"):  # full precision
                s, c = rec.helper.input_sum(x, rec.dtype, self.conv_locations, self._generator(rec, 0))
            rec.add_a(s, c)
            if output.requires_grad:
                # Taken now, before any in-place op (e.g. ReLU(inplace=True)) edits the output:
                # the output's node and slot, and its tensor hook, then see the gradient w.r.t.
                # the layer's own output. mc reads it in the sampled pass (taps on the node),
                # empirical in the real backward (the tensor hook).
                fired = [False]
                if self.fisher == "empirical":
                    output.register_hook(self._make_grad_hook(rec, fired))
                self._pending.append((rec, fired, output.grad_fn, output.output_nr))
            if self.logits_module is None:
                self._logits = output
            self._factor_seconds += time.perf_counter() - t0
        return hook

    def _make_grad_hook(self, rec: _Layer, fired: list):
        def hook(grad):
            if fired[0]:
                return
            t0 = time.perf_counter()
            self._record_g(rec, fired, grad)
            self._factor_seconds += time.perf_counter() - t0
        return hook

    def _record_g(self, rec: _Layer, fired: list, grad: Tensor) -> None:
        """Add ``Σ ĝ ĝᵀ`` from the gradient w.r.t. ``rec``'s output to its pending sums."""
        fired[0] = True
        with torch.autocast(grad.device.type, enabled=False), record_function("kfac::G"):
            g = grad.detach().to(rec.dtype)
            if self.fisher == "empirical":
                # ĝ = B × ∂(batch-mean loss)/∂output; 1/accumulate and the AMP scale are undone later
                g = g * grad.shape[0]
            s, c = rec.helper.grad_sum(g, rec.dtype, self.conv_locations, self._generator(rec, 1))
        rec.add_g(s, c)

    def _logits_hook(self, module, inputs, output) -> None:
        if self._recording and torch.is_grad_enabled():
            self._logits = output

    def _generator(self, rec: _Layer, which: int) -> Optional[torch.Generator]:
        """Seeded source of conv location subsets (A: which=0, G: 1); None when all are used."""
        if self.conv_locations is None:
            return None
        return torch.Generator().manual_seed(self._mix(2 * zlib.crc32(rec.helper.name.encode()) + which))

    def _mix(self, salt: int = 0) -> int:
        rank = kdist.world()[0]
        return hash((self.seed, self.steps, self._micro, rank, salt)) & (2**63 - 1)

    # ------------------------------------------------------------ Lightning hooks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._recording = self.steps % self.factor_update_interval == 0

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        if not self._recording or self.fisher != "mc" or not self._pending:
            return
        t0 = time.perf_counter()
        logits = self._logits
        if logits is None or logits.dim() != 2 or logits.shape[1] < 2:
            shape = None if logits is None else tuple(logits.shape)
            where = repr(self.logits_module) if self.logits_module else "the last Linear/Conv2d that ran"
            raise ValueError(
                f"fisher='mc' needs logits of shape (batch, classes >= 2) from {where}, got "
                f"{shape}; pass logits_module='<name of the classifier layer>' or use fisher='empirical'"
            )
        # The sampled loss is a sum, not a mean: its gradient w.r.t. example n's output is ĝ_n.
        with torch.enable_grad():
            z = logits.detach().float().requires_grad_(True)
            with torch.no_grad():
                gen = torch.Generator(device=z.device).manual_seed(self._mix())
                labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=gen).squeeze(1)
            (cot,) = torch.autograd.grad(F.cross_entropy(z, labels, reduction="sum"), [z])
        cot = cot.to(logits.dtype)
        # ĝ of each layer is read where it arrives at the layer output's node, once
        taps: dict = {}
        for rec, fired, node, slot in self._pending:
            if node is not None:
                taps.setdefault(node, []).append(
                    (slot, lambda g, r=rec, f=fired: None if f[0] else self._record_g(r, f, g)))
        nodes = sb.plan(logits) if logits.device.type == "cpu" and self._ride_along else None
        if nodes is not None:
            # CPU: carried inside the real backward (see sampled_backward for why)
            self._sampled = sb.SampledBackward(logits, cot, nodes, taps)
        else:
            self._separate_sampled_pass(logits, cot, taps)
        self._factor_seconds += time.perf_counter() - t0

    def _separate_sampled_pass(self, logits: Tensor, cot: Tensor, taps: dict) -> None:
        """The sampled backward as its own ``autograd.grad`` pass over the retained graph."""
        def prehook(node):
            def hook(grad_outputs):
                for slot, fn in taps[node]:
                    if grad_outputs[slot] is not None:
                        fn(grad_outputs[slot])
            return hook

        handles = [node.register_prehook(prehook(node)) for node in taps]
        # Differentiate w.r.t. the weight of the first layer that ran: the backward passes every
        # layer output downstream of it (their taps read ĝ) but computes one weight gradient
        # only and captures no activation-sized gradient. Layers off that path get a second pass.
        try:
            with record_function("kfac::sampled_backward"):  # G is inside this range on this route
                first = self._pending[0][0].helper.module.weight
                torch.autograd.grad(logits, [first], cot, retain_graph=True, allow_unused=True)
                rest = list({id(p[0]): p[0].helper.module.weight for p in self._pending if not p[1][0]}.values())
                if rest:
                    torch.autograd.grad(logits, rest, cot, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()

    def on_after_backward(self, trainer, pl_module) -> None:
        sampled, self._sampled = self._sampled, None
        if sampled is None:
            return
        sampled.detach()
        self._factor_seconds += sampled.seconds
        if sampled.error is not None:
            # This step's statistics are incomplete. Poisoning them makes the factor update skip
            # them through the non-finite path, on every rank alike (the all-reduce still runs).
            for r in self._layers.values():
                d = r.helper.d_out
                r.g_sum = torch.full((d, d), math.nan, dtype=r.dtype, device=r.helper.module.weight.device)
                r.g_count = max(r.g_count, 1.0)
            self._ride_along = False
            self._warn_once("sampled-error", f"KFAC: the sampled-label (MC) backward failed inside the real backward "
                            f"at step {self.steps} ({type(sampled.error).__name__}: {sampled.error}); this factor "
                            "update is skipped, later ones use a separate autograd.grad pass")
        elif not sampled.reached:
            self._warn_once("sampled-unreached", "KFAC: fisher='mc' but the loss's backward never reached the "
                            "logits, so no layer got sampled-label statistics; make the loss depend on the "
                            "logits, set logits_module, or use fisher='empirical'")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._sampled is not None:  # no backward ran (e.g. the step returned None)
            self._sampled.detach()
            self._sampled = None
        self._recording = False
        self._logits = None
        self._pending.clear()
        self._micro += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._recording = False
        self._micro = 0
        metrics: dict[str, Any] = {}
        if self.steps % self.factor_update_interval == 0:
            t0 = time.perf_counter()
            with record_function("kfac::update_factors"):
                self._update_factors(trainer)
            metrics["kfac/factor_time_s"] = self._factor_seconds + time.perf_counter() - t0
            self._factor_seconds = 0.0
        if self.steps % self.inverse_update_interval == 0 or self._needs_decomposition:
            t0 = time.perf_counter()
            with record_function("kfac::decompose"):
                self._decompose()
            metrics["kfac/decomposition_time_s"] = time.perf_counter() - t0
        with record_function("kfac::precondition"):
            nu = self._precondition(optimizer)
        if nu is not None:
            metrics["kfac/nu"] = nu
        self.steps += 1
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True,
                               batch_size=1)

    # --------------------------------------------------------------- factors
    def _update_factors(self, trainer: "pl.Trainer") -> None:
        recs = list(self._layers.items())
        g_scale = 1.0
        if self.fisher == "empirical":
            # the real loss was divided by accumulate_grad_batches and multiplied by the AMP scale
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            amp = float(scaler.get_scale()) if scaler is not None else 1.0
            g_scale = (trainer.accumulate_grad_batches / amp) ** 2
        rank, world = kdist.world()
        if world > 1:
            self._all_reduce_sums([r for _, r in recs])
        sums = [t for _, r in recs for t in (r.a_sum, r.g_sum) if t is not None]
        finite = km.all_finite(sums)
        missing = []
        for name, r in recs:
            if r.a_sum is None or r.g_sum is None or r.a_count == 0 or r.g_count == 0:
                missing.append(name)
            elif finite:
                if r.A is None and self.steps % self.inverse_update_interval != 0:
                    self._needs_decomposition = True  # first factors: decompose now, not in 100 steps
                new_a = r.a_sum.div_(r.a_count)  # in place: the pending sums are ours, dropped below
                new_g = r.g_sum.mul_(g_scale / r.g_count)
                r.A = km.running_average(r.A, new_a, self.factor_decay)
                r.G = km.running_average(r.G, new_g, self.factor_decay)
            r.clear_pending()
        if not finite:
            self._warn_once("nonfinite", "KFAC: non-finite factor statistics (an fp16 overflow, or a failed "
                            f"sampled backward) at step {self.steps}; this factor update is skipped and the "
                            "previous factors are kept")
        if missing:
            self._warn_once("missing:" + ",".join(missing),
                            f"KFAC: no statistics for layer(s) {missing} (their forward or backward did not "
                            "run in training); they use the plain gradient until they have factors")

    def _all_reduce_sums(self, recs: list[_Layer]) -> None:
        """Sum every layer's pending statistics over ranks in one all-reduce per dtype."""
        by_dtype: dict[torch.dtype, list[_Layer]] = {}
        for r in recs:
            by_dtype.setdefault(r.dtype, []).append(r)
        for dtype, group in by_dtype.items():
            device = group[0].helper.module.weight.device
            mats, sizes = [], []
            for r in group:
                for s, d in ((r.a_sum, r.helper.d_in), (r.g_sum, r.helper.d_out)):
                    mats.append(s if s is not None else torch.zeros(d, d, dtype=dtype, device=device))
                    sizes.append(d)
            counts = torch.tensor([c for r in group for c in (r.a_count, r.g_count)], dtype=dtype, device=device)
            flat = torch.cat([kdist.pack_symmetric(mats), counts])
            kdist.all_reduce_sum_(flat)
            n = flat.numel() - counts.numel()
            full = kdist.unpack_symmetric(flat[:n], sizes)
            c = flat[n:].tolist()
            for i, r in enumerate(group):
                r.a_sum, r.g_sum = full[2 * i], full[2 * i + 1]
                r.a_count, r.g_count = c[2 * i], c[2 * i + 1]

    # --------------------------------------------------------- decompositions
    def _decompose(self) -> None:
        self._needs_decomposition = False
        recs = [r for r in self._layers.values() if r.A is not None]
        # one task per factor: (layer, 0 for A / 1 for G), cost ~ d³
        tasks = [(r, i) for r in recs for i in (0, 1)]
        rank, world = kdist.world()
        distribute = self.distribute_decompositions and world > 1
        owners = kdist.assign_by_cost([float(t[0].helper.d_in if t[1] == 0 else t[0].helper.d_out) ** 3
                                       for t in tasks], world) if distribute else [rank] * len(tasks)
        results: list[Optional[Any]] = [None] * len(tasks)
        shifts = {}
        if self.method == "inverse":
            root = math.sqrt(self.damping)
            for r in recs:
                pi = km.pi_damping(r.A, r.G)
                shifts[id(r)] = (pi * root, root / pi)
        for k, (r, i) in enumerate(tasks):
            if owners[k] != rank:
                continue
            factor = r.A if i == 0 else r.G
            if self.method == "eigen":
                fn = km.symmetric_eigen
            else:
                shift = shifts[id(r)][i]
                fn = lambda f, shift=shift: km.damped_inverse(f, shift.to(f.dtype))  # noqa: E731
            results[k] = self._robust(fn, factor, r.helper.name, "AG"[i])
        if distribute:
            results = self._share(tasks, owners, results, rank)
        for k, (r, i) in enumerate(tasks):
            if results[k] is None:  # failed: keep the previous decomposition of this factor
                continue
            old = r.decomposition or (None, None)
            r.decomposition = (results[k], old[1]) if i == 0 else (old[0], results[k])
            if i == 0:
                r.A_dec = r.A
            else:
                r.G_dec = r.G

    def _robust(self, fn, factor: Tensor, name: str, which: str):
        """Run a decomposition; retry in float64; on failure warn once and return None."""
        try:
            out = fn(factor)
            if _all_finite(out):
                return out
        except (torch.linalg.LinAlgError, RuntimeError):
            pass
        try:
            out = fn(factor.double())
            out = type(out)(*(t.to(factor.dtype) for t in out)) if isinstance(out, tuple) else out.to(factor.dtype)
            if _all_finite(out):
                return out
        except (torch.linalg.LinAlgError, RuntimeError):
            pass
        self._warn_once(f"decomp:{name}{which}",
                        f"KFAC: decomposing factor {which} of layer {name!r} failed (also in float64) at step "
                        f"{self.steps}; the previous decomposition is kept")
        return None

    def _share(self, tasks, owners, results, rank):
        """Give every rank every result in one SUM all-reduce (owners write, others add zeros)."""
        parts, shapes = [], []
        for k, (r, i) in enumerate(tasks):
            d = r.helper.d_in if i == 0 else r.helper.d_out
            dtype, device = r.dtype, r.helper.module.weight.device
            n = d * d + d if self.method == "eigen" else d * d
            if owners[k] == rank:
                res = results[k]
                ok = res is not None
                body = (torch.cat([res.Q.reshape(-1), res.d]) if self.method == "eigen" else res.reshape(-1)) \
                    if ok else torch.zeros(n, dtype=dtype, device=device)
                parts.append(torch.cat([body, torch.tensor([float(ok)], dtype=dtype, device=device)]))
            else:
                parts.append(torch.zeros(n + 1, dtype=dtype, device=device))
            shapes.append(d)
        common = parts[0].dtype if len({p.dtype for p in parts}) == 1 else torch.float64
        flat = kdist.all_reduce_sum_(torch.cat([p.to(common) for p in parts]))
        sizes = [d * d + d if self.method == "eigen" else d * d for d in shapes]
        ends = torch.tensor(sizes).add(1).cumsum(0) - 1  # position of each task's ok flag
        oks = (flat[ends.to(flat.device)] > 0.5).tolist()  # one host sync for all tasks
        out, pos = [], 0
        for k, d in enumerate(shapes):
            r, n, ok = tasks[k][0], sizes[k], oks[k]
            body = flat[pos:pos + n].to(r.dtype)
            pos += n + 1
            if not ok:
                out.append(None)
            elif self.method == "eigen":
                out.append(km.Eigen(body[: d * d].reshape(d, d), body[d * d:]))
            else:
                out.append(body.reshape(d, d))
        return out

    # --------------------------------------------------------- preconditioning
    def _precondition(self, optimizer) -> Optional[Tensor]:
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        updates = []
        vg: Optional[Tensor] = None
        for r in self._layers.values():
            dec = r.decomposition
            w = r.helper.module.weight
            if dec is None or dec[0] is None or dec[1] is None or id(w) not in lr_of:
                continue
            grad = r.helper.grad_matrix(r.dtype)
            if grad is None:
                continue
            if self.method == "eigen":
                pg = km.precondition_eigen(grad, dec[0], dec[1], self.damping)
            else:
                pg = km.precondition_inverse(grad, dec[0], dec[1])
            if self.kl_clip is not None:
                lr = float(lr_of[id(w)])
                term = torch.vdot(pg.reshape(-1), grad.reshape(-1)) * (lr * lr)
                vg = term if vg is None else vg + term.to(vg.device)
            updates.append((r, pg))
        nu = None
        if self.kl_clip is not None and vg is not None:
            nu = km.kl_clip_scale(vg, self.kl_clip)
        for r, pg in updates:
            if nu is not None:
                pg = pg.mul_(nu.to(pg.device, pg.dtype))
            r.helper.set_grad(pg)
        return nu

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        factors = {}
        for name, r in self._layers.items():
            if r.A is None:
                continue
            entry = {"A": r.A, "G": r.G}
            # what the current decomposition was computed from, when the factors moved since
            if r.A_dec is not None and r.A_dec is not r.A:
                entry["A_decomposed"] = r.A_dec
            if r.G_dec is not None and r.G_dec is not r.G:
                entry["G_decomposed"] = r.G_dec
            factors[name] = entry
        return {"steps": self.steps, "seed": self.seed, "factors": factors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._layers:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state["factors"]) - set(self._layers))
        if unknown:
            raise ValueError(f"KFAC checkpoint holds factors for layers {unknown} that this model does not "
                             f"have as K-FAC layers (model layers: {sorted(self._layers)})")
        self.steps = int(state["steps"])
        self.seed = int(state["seed"])
        for name, r in self._layers.items():
            entry = state["factors"].get(name)
            r.clear_pending()
            r.decomposition = None
            if entry is None:
                r.A = r.G = r.A_dec = r.G_dec = None
                continue
            device = r.helper.module.weight.device
            r.A = entry["A"].to(device, r.dtype)
            r.G = entry["G"].to(device, r.dtype)
            r.A_dec = entry["A_decomposed"].to(device, r.dtype) if "A_decomposed" in entry else r.A
            r.G_dec = entry["G_decomposed"].to(device, r.dtype) if "G_decomposed" in entry else r.G
        self._redecompose_from_sources()

    def _redecompose_from_sources(self) -> None:
        """Recompute decompositions from the factors they were made from (exact resume)."""
        running = {}
        for r in self._layers.values():
            running[id(r)] = (r.A, r.G)
            r.A, r.G = r.A_dec, r.G_dec
        self._decompose()
        for r in self._layers.values():
            r.A, r.G = running[id(r)]

    # ----------------------------------------------------------------- misc
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _all_finite(out) -> bool:
    return km.all_finite(list(out) if isinstance(out, tuple) else [out])
