"""Shared test fixtures: tiny LightningModules and data, and callbacks that capture state."""
import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def tiny_net(bn: bool = True, classes: int = 5) -> nn.Sequential:
    layers = [nn.Conv2d(3, 4, 3, stride=2, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, classes)]
    return nn.Sequential(*layers)


class TinyModule(pl.LightningModule):
    """Conv2d(+BN)+Linear classifier on (3, 8, 8) inputs; SGD with momentum and weight decay."""

    def __init__(self, bn=True, lr=0.1, classes=5, nograd_forward=False, net=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = net if net is not None else tiny_net(bn, classes)
        self.lr = lr
        self.nograd_forward = nograd_forward

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.nograd_forward:  # a no-grad forward inside training_step must not be recorded
            with torch.no_grad():
                self.net(x * 100.0)
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class Twice(torch.autograd.Function):
    """x -> 2x as a Python autograd node (one the sampled backward cannot apply directly)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def tiny_data(n=32, classes=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g).to(dtype), torch.randint(0, classes, (n,), generator=g))


def loader(ds, batch_size=8, shuffle=False):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def trainer(tmp_path=None, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    if tmp_path is not None:
        args["default_root_dir"] = str(tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


class StepCapture(Callback):
    """Records, at on_before_optimizer_step, the gradients as this callback sees them, and at
    on_train_batch_start the module's full state (weights before the step)."""

    def __init__(self):
        self.grads, self.states, self.batches = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(copy.deepcopy({k: v.detach().clone() for k, v in pl_module.state_dict().items()}))
        self.batches.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})


@pytest.fixture
def seed():
    pl.seed_everything(1234, workers=True)
    return 1234
