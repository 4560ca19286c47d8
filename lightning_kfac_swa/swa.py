"""The :class:`SWA` Lightning callback: Stochastic Weight Averaging as in the paper.

Thin glue over public Lightning hooks; the averaging and BatchNorm mathematics are in
:mod:`lightning_kfac_swa.averaging`.

Timeline for ``swa_epoch_start = e`` (0-based epochs):

* from epoch e on, every training step runs at the SWA learning rate (set at each batch
  start, so it overrides whatever scheduler the run configured);
* after the last training batch of each epoch >= e (before that epoch's validation), the
  weights join the equal-weight average; on evaluation epochs the averaged model's BatchNorm
  statistics are then recomputed with a forward-only pass over the training data;
* validation reports the current model as usual and the averaged one under ``swa/val/...``;
* at the end of fit the LightningModule receives the averaged weights and recalibrated BN
  buffers (so ``trainer.test``/``predict`` use them) and, when the run has a
  ``ModelCheckpoint`` directory, ``swa.ckpt`` is written there with them.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.func import functional_call

from lightning_kfac_swa import averaging

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class SWA(Callback):
    """Stochastic Weight Averaging with a held learning rate and BatchNorm recalibration.

    Args:
        swa_epoch_start: an int e >= 0 is the 0-based first averaged epoch (the paper's
            "from the 161st epoch" is 160); a float in (0, 1) is that fraction of
            ``max_epochs`` (``int(fraction * max_epochs)``). Must be < ``max_epochs``.
        swa_lr: absolute SWA learning rate > 0 for every param group; None: each group runs
            at ``swa_lr_ratio`` × its initial lr.
        swa_lr_ratio: in (0, 1]; the paper holds 0.5 α0.
        annealing_epochs: >= 0. With k > 0 the rate moves linearly, epoch by epoch, from
            the scheduler's rate at epoch e to the SWA rate, reaching it at epoch e + k - 1.
        swa_eval_interval: evaluate the averaged model every this many epochs once averaging
            has begun (>= 1; each evaluation costs a BN recalibration, i.e. one forward pass
            over the training data); 0 disables it.

    The averaged model is evaluated through the LightningModule's ``forward`` on the first
    element of each batch, with cross-entropy loss and top-1 accuracy (a classifier); the
    BN pass uses the first element of each training batch as input.
    """

    def __init__(
        self,
        swa_epoch_start: Union[int, float] = 0.8,
        swa_lr: Optional[float] = None,
        swa_lr_ratio: float = 0.5,
        annealing_epochs: int = 0,
        swa_eval_interval: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(swa_epoch_start, bool) or not isinstance(swa_epoch_start, (int, float)) or (
                isinstance(swa_epoch_start, int) and swa_epoch_start < 0) or (
                isinstance(swa_epoch_start, float) and not 0 < swa_epoch_start < 1):
            raise ValueError("swa_epoch_start must be an int >= 0 (epoch index) or a float in (0, 1) "
                             f"(fraction of max_epochs), got {swa_epoch_start!r}")
        if swa_lr is not None and (isinstance(swa_lr, bool) or not isinstance(swa_lr, (int, float))
                                   or not swa_lr > 0):
            raise ValueError(f"swa_lr must be > 0 or None, got {swa_lr!r}")
        if isinstance(swa_lr_ratio, bool) or not isinstance(swa_lr_ratio, (int, float)) \
                or not 0 < swa_lr_ratio <= 1:
            raise ValueError(f"swa_lr_ratio must be in (0, 1], got {swa_lr_ratio!r}")
        for arg, val in (("annealing_epochs", annealing_epochs), ("swa_eval_interval", swa_eval_interval)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{arg} must be an integer >= 0, got {val!r}")
        self.swa_epoch_start = swa_epoch_start
        self.swa_lr = None if swa_lr is None else float(swa_lr)
        self.swa_lr_ratio = float(swa_lr_ratio)
        self.annealing_epochs = annealing_epochs
        self.swa_eval_interval = swa_eval_interval

        self.n_averaged = 0
        self.averaged_epochs: list[int] = []
        self.average: dict[str, Tensor] = {}  # params and buffers of the averaged model
        self.bn_fresh = False  # average's BN buffers match its current weights
        self.base_lrs: Optional[list[float]] = None
        self.anneal_from: Optional[list[float]] = None
        self._start: Optional[int] = None
        self._eval_sums: Optional[Tensor] = None

    # ------------------------------------------------------------------ setup
    @property
    def start_epoch(self) -> int:
        """The resolved 0-based first averaged epoch (after ``setup``)."""
        if self._start is None:
            raise RuntimeError("SWA.start_epoch is known once fit has been set up")
        return self._start

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if any(c.__name__ in _UNSUPPORTED_STRATEGIES for c in type(trainer.strategy).__mro__):
            raise ValueError(f"SWA does not support the {type(trainer.strategy).__name__} strategy "
                             "(sharded parameters); use a single device or a DDP strategy")
        max_epochs = trainer.max_epochs
        if getattr(trainer, "fast_dev_run", False):
            rank_zero_info("SWA: fast_dev_run is set, so no epoch is averaged in this run")
            self._start = max_epochs
            self._init_average(pl_module)
            return
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"SWA needs Trainer(max_epochs=...) >= 1, got max_epochs={max_epochs!r}")
        start = self.swa_epoch_start
        start = int(start * max_epochs) if isinstance(start, float) else start
        if start >= max_epochs:
            raise ValueError(f"swa_epoch_start must be < max_epochs={max_epochs} so that at least one epoch "
                             f"is averaged, got {self.swa_epoch_start!r} (epoch {start})")
        self._start = start
        self._init_average(pl_module)

    def _init_average(self, pl_module: "pl.LightningModule") -> None:
        state = pl_module.state_dict()
        if set(self.average) != set(state):  # fresh start (a loaded average keeps its values)
            self.average = {k: v.detach().clone() for k, v in state.items()}
        else:
            self.average = {k: v.to(state[k].device) for k, v in self.average.items()}

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SWA supports exactly one optimizer, got {len(trainer.optimizers)}")
        if self.base_lrs is None:
            self.base_lrs = [g.get("initial_lr", g["lr"]) for g in trainer.optimizers[0].param_groups]

    # -------------------------------------------------------- learning rate
    def swa_lrs(self) -> list[float]:
        """The SWA learning rate of every param group."""
        assert self.base_lrs is not None
        if self.swa_lr is not None:
            return [self.swa_lr] * len(self.base_lrs)
        return [self.swa_lr_ratio * b for b in self.base_lrs]

    def _apply_lr(self, trainer: "pl.Trainer", epoch: int) -> None:
        """Set every param group to the SWA rate of ``epoch`` (annealed), if averaging has begun."""
        if epoch < self.start_epoch or epoch >= (trainer.max_epochs or 0):
            return
        groups = trainer.optimizers[0].param_groups
        targets = self.swa_lrs()
        if self.annealing_epochs > 0:
            if self.anneal_from is None:
                self.anneal_from = [g["lr"] for g in groups]
            t = min(1.0, (epoch - self.start_epoch + 1) / self.annealing_epochs)
            targets = [a + (s - a) * t for a, s in zip(self.anneal_from, targets)]
        for g, lr in zip(groups, targets):
            g["lr"] = lr

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._apply_lr(trainer, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # every batch, so that no step-interval scheduler can move the rate inside an SWA epoch
        self._apply_lr(trainer, trainer.current_epoch)

    # ------------------------------------------------------------ averaging
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self._end_of_epoch(trainer, pl_module)
            # the epoch scheduler has just stepped: show the next epoch's rate from now on
            # (e.g. to a LearningRateMonitor at the next epoch start)
            self._apply_lr(trainer, trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end_of_epoch(trainer, pl_module)  # no-op when the last batch already did it
        pl_module.log("weight_norm/current", averaging.weight_norm(pl_module.parameters()),
                      on_epoch=True, on_step=False)
        if self.n_averaged:
            names = [n for n, _ in pl_module.named_parameters()]
            pl_module.log("weight_norm/swa", averaging.weight_norm(self.average[n] for n in names),
                          on_epoch=True, on_step=False)

    def _end_of_epoch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch or (self.averaged_epochs and self.averaged_epochs[-1] == epoch):
            return
        with torch.no_grad():
            averaging.update_average_(self.average, pl_module.state_dict(), self.n_averaged)
        self.n_averaged += 1
        self.averaged_epochs.append(epoch)
        self.bn_fresh = False
        if self._evaluates(epoch) and trainer.val_dataloaders is not None and trainer.limit_val_batches != 0:
            seconds = self._recalibrate(trainer, pl_module)
            pl_module.log("swa/recalibration_time_s", seconds, on_epoch=True, on_step=False, rank_zero_only=True)

    def _evaluates(self, epoch: int) -> bool:
        return self.swa_eval_interval > 0 and (epoch - self.start_epoch) % self.swa_eval_interval == 0

    def _recalibrate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> float:
        """Recompute the averaged model's BN statistics over the training data (all ranks); seconds taken."""
        self.bn_fresh = True
        layers = averaging.batchnorm_layers(pl_module)
        if not layers:
            return 0.0
        t0 = time.perf_counter()
        loader = trainer.train_dataloader
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise ValueError(f"SWA recalibrates BatchNorm over a single training DataLoader, got {type(loader).__name__}")
        avg = self.average
        tracked = {k: v.clone() for k, v in avg.items() if k.endswith("num_batches_tracked")}

        def forward(batch):
            batch = trainer.strategy.batch_to_device(batch)
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            functional_call(pl_module, avg, (x,))

        stats = averaging.bn_population_stats(
            pl_module, loader, forward, lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        for name, (mean, var) in stats.items():
            avg[f"{name}.running_mean"].copy_(mean)
            avg[f"{name}.running_var"].copy_(var)
        for k, v in tracked.items():
            avg[k].copy_(v)
        return time.perf_counter() - t0

    # ------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval_sums = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not self.n_averaged or not self._evaluates(self.averaged_epochs[-1]) \
                or self.averaged_epochs[-1] != trainer.current_epoch or not self.bn_fresh:
            return
        x, y = batch[0], batch[1]
        logits = functional_call(pl_module, self.average, (x,))
        sums = torch.stack([F.cross_entropy(logits.float(), y, reduction="sum"),
                            (logits.argmax(1) == y).sum().float(),
                            torch.tensor(float(y.shape[0]), device=logits.device)])
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._eval_sums is None:
            return
        sums = trainer.strategy.reduce(self._eval_sums, reduce_op="sum")
        pl_module.log("swa/val/loss", sums[0] / sums[2], on_epoch=True, on_step=False)
        pl_module.log("swa/val/acc", sums[1] / sums[2], on_epoch=True, on_step=False)
        self._eval_sums = None

    # ------------------------------------------------------------ end of fit
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.n_averaged:
            return
        if not self.bn_fresh:
            self._recalibrate(trainer, pl_module)
        with torch.no_grad():
            pl_module.load_state_dict(self.average)
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if dirpath:
            trainer.save_checkpoint(os.path.join(dirpath, "swa.ckpt"))

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"n_averaged": self.n_averaged, "averaged_epochs": list(self.averaged_epochs),
                "average": self.average if self.n_averaged else {}, "bn_fresh": self.bn_fresh,
                "base_lrs": self.base_lrs, "anneal_from": self.anneal_from}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_averaged = int(state_dict["n_averaged"])
        self.averaged_epochs = list(state_dict["averaged_epochs"])
        self.bn_fresh = bool(state_dict["bn_fresh"])
        self.base_lrs = state_dict["base_lrs"]
        self.anneal_from = state_dict["anneal_from"]
        if state_dict["average"]:
            if self.average and set(self.average) != set(state_dict["average"]):
                raise ValueError("SWA checkpoint's averaged model does not match this model's state_dict keys")
            for k, v in state_dict["average"].items():
                if k in self.average:
                    self.average[k].copy_(v)
                else:
                    self.average[k] = v.clone()
