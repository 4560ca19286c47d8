"""``ImageClassifier``: the LightningModule of the paper's runs."""
from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_kfac_swa.averaging import weight_norm


def _num_classes(network: nn.Module) -> int:
    last = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"network must end in an nn.Linear classifier to infer num_classes, "
                         f"got {type(network).__name__} without one; pass num_classes")
    return last[-1].out_features


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around any network.

    The optimizer and scheduler come from LightningCLI's ``optimizer:`` / ``lr_scheduler:``
    (or :meth:`configure_optimizers` of a subclass); schedulers step once per epoch.

    Logged per epoch: ``{train,val,test}/loss``, ``/acc`` (top-1), ``/acc5`` (top-5) and
    ``/ece`` (expected calibration error, 15 bins; val and test), and ``train/weight_norm``
    (L2 norm of all parameters; the paper's Figure 1).

    Args:
        network: the ``nn.Module`` mapping images to logits (e.g. ``VGG16``, ``PreResNet``).
        num_classes: C >= 2; None reads it from the network's last ``nn.Linear``.
    """

    def __init__(self, network: nn.Module, num_classes: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        if num_classes is None:
            num_classes = _num_classes(network)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.num_classes = num_classes
        top5 = min(5, num_classes)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_acc5", MulticlassAccuracy(num_classes, top_k=top5, average="micro"))
        for stage in ("val", "test"):
            setattr(self, f"{stage}_ece", MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"))

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def _step(self, batch, stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=stage != "train")
        for metric in ("acc", "acc5", "ece"):
            m = getattr(self, f"{stage}_{metric}", None)
            if m is None:
                continue
            m(logits.detach().float(), y)
            self.log(f"{stage}/{metric}", m, on_step=False, on_epoch=True, prog_bar=metric == "acc")
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.softmax(self(x), 1)

    def on_train_epoch_end(self) -> None:
        self.log("train/weight_norm", weight_norm(self.parameters()), on_epoch=True)

    def configure_optimizers(self):
        # Used when no optimizer is given by LightningCLI: the paper's SGD.
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
