"""``kfac-swa``: LightningCLI over :class:`ImageClassifier` and the data modules.

    kfac-swa fit --config configs/quickstart.yaml
    kfac-swa fit --config configs/base.yaml --config configs/vgg16_kfac_swa.yaml
    kfac-swa fit --config configs/base.yaml --config configs/vgg16_kfac_swa.yaml --print_config

Besides LightningCLI's usual groups, ``checkpoint:`` configures the run's ModelCheckpoint
and ``lr_monitor:`` its LearningRateMonitor, so run configs list only their own callbacks.
"""
from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_kfac_swa.module import ImageClassifier


class KfacSwaCLI(LightningCLI):
    """LightningCLI with a ModelCheckpoint, a LearningRateMonitor and an end-of-fit summary."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})

    def after_fit(self) -> None:
        print_summary(self.trainer)


@rank_zero_only
def print_summary(trainer: "pl.Trainer") -> None:
    """Print validation loss / accuracy of the current and the averaged model after fit."""
    m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    rows = [("current model (last epoch)", m.get("val/acc"), m.get("val/loss"))]
    if "swa/val/acc" in m:
        rows.append(("SWA averaged model", m["swa/val/acc"], m["swa/val/loss"]))
    if all(acc is None for _, acc, _ in rows):
        return
    fmt = lambda v, pct: "   n/a" if v is None else (f"{100 * v:6.2f}" if pct else f"{v:6.4f}")  # noqa: E731
    lines = [f"{'model':<28} {'val acc %':>9} {'val loss':>9}"]
    lines += [f"{name:<28} {fmt(acc, True):>9} {fmt(loss, False):>9}" for name, acc, loss in rows]
    width = max(len(s) for s in lines)
    print("\n".join(["", "=" * width, *lines, "=" * width]))


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``kfac-swa`` console script."""
    KfacSwaCLI(
        ImageClassifier,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
