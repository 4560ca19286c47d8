"""Two-process CPU (gloo) DDP runs for tests/test_ddp.py.

Run as ``python tests/ddp_worker.py OUT_DIR``: Lightning's "ddp" launcher re-runs this script
for rank 1, both processes run every scenario below in order, and each rank saves what it saw
to ``OUT_DIR/<scenario>_rank<r>.pt`` for the test to compare.
"""
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from conftest import StepCapture, TinyModule, loader, tiny_data  # noqa: E402

from lightning_kfac_swa import KFAC, SWA  # noqa: E402
from lightning_kfac_swa import kfac_math as km  # noqa: E402

OUT = sys.argv[1]


def ddp_trainer(root, strategy="ddp", **kw):
    args = dict(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=os.path.join(OUT, root),
                use_distributed_sampler=True)
    args.update(kw)
    return pl.Trainer(**args)


class Interleaved(pl.LightningDataModule):
    """Rank r trains on examples r, r+2, r+4, ... in order (Lightning's own sampler would shuffle)."""

    def __init__(self, ds, batch_size):
        super().__init__()
        self.ds, self.batch_size = ds, batch_size

    def train_dataloader(self):
        t = self.trainer
        return torch.utils.data.DataLoader(self.ds, batch_size=self.batch_size, sampler=DistributedSampler(
            self.ds, num_replicas=t.world_size, rank=t.global_rank, shuffle=False))


def save(name, trainer, obj):
    torch.save(obj, os.path.join(OUT, f"{name}_rank{trainer.global_rank}.pt"))


class Counting:
    """Counts the decompositions this rank computes and records the MC labels it samples."""

    def __init__(self):
        self.eigen = 0
        self.labels = []
        real_eigen, real_multinomial = km.symmetric_eigen, torch.multinomial

        def eigen(f):
            self.eigen += 1
            return real_eigen(f)

        def multinomial(*a, **k):
            out = real_multinomial(*a, **k)
            self.labels.append(out.clone())
            return out
        km.symmetric_eigen = eigen
        torch.multinomial = multinomial


counting = Counting()

# 1. empirical K-FAC, no running average, decompositions every step, no BN: per-rank
#    preconditioned gradients and factors (the test compares with one process, full batch).
pl.seed_everything(0)
kfac = KFAC(damping=0.05, factor_decay=0.0, factor_update_interval=1, inverse_update_interval=1,
            fisher="empirical", kl_clip=1e-3)
after = StepCapture()
t = ddp_trainer("equiv", max_steps=2, precision="64-true", callbacks=[kfac, after], use_distributed_sampler=False)
t.fit(TinyModule(bn=False).double(), datamodule=Interleaved(tiny_data(32, dtype=torch.float64), 4))
save("equiv", t, {"grads": after.grads, "factors": kfac.state_dict()["factors"]})

# 2. mc sampling on identical data on both ranks (even/odd indices hold the same examples);
#    distributed decompositions (count per rank) with gradient accumulation.
base = tiny_data(8)
same = TensorDataset(base.tensors[0].repeat_interleave(2, 0), base.tensors[1].repeat_interleave(2, 0))
counting.eigen, counting.labels = 0, []
kfac = KFAC(factor_update_interval=1, inverse_update_interval=1, fisher="mc")
t = ddp_trainer("mc", max_steps=2, accumulate_grad_batches=2, callbacks=[kfac], use_distributed_sampler=False)
t.fit(TinyModule(), datamodule=Interleaved(same, 2))
save("mc", t, {"labels": counting.labels, "eigen_calls": counting.eigen, "factors": kfac.state_dict()["factors"],
               "params": {k: v.clone() for k, v in t.lightning_module.state_dict().items()}})

counting.eigen = 0
kfac = KFAC(factor_update_interval=1, inverse_update_interval=1, fisher="mc", distribute_decompositions=False)
t = ddp_trainer("mc_all", max_steps=1, callbacks=[kfac], use_distributed_sampler=False)
t.fit(TinyModule(), datamodule=Interleaved(same, 2))
save("mc_all", t, {"eigen_calls": counting.eigen})

# 3. SWA + KFAC with BN under DDP: weights and buffers on every rank, ready for a reference.
pl.seed_everything(0)
t = ddp_trainer("swa", max_epochs=3, callbacks=[KFAC(factor_update_interval=2), SWA(swa_epoch_start=1, swa_lr=0.05)])
m = TinyModule()
t.fit(m, loader(tiny_data(32), batch_size=4), loader(tiny_data(16, seed=4), batch_size=4))
save("swa", t, {"state": {k: v.clone() for k, v in m.state_dict().items()},
                "swa_val": float(t.callback_metrics["swa/val/loss"])})


# 4. resume under DDP: 3 epochs straight vs 1 epoch + resume, ddp_find_unused_parameters_true.
def cbs():
    return [KFAC(factor_update_interval=2, inverse_update_interval=3), SWA(swa_epoch_start=1, swa_lr=0.05)]


strategy = "ddp_find_unused_parameters_true"
pl.seed_everything(0)
m1 = TinyModule()
ddp_trainer("straight", strategy, max_epochs=3, callbacks=cbs()).fit(m1, loader(tiny_data(24), batch_size=4))
ck = ModelCheckpoint(dirpath=os.path.join(OUT, "ck"), save_top_k=-1, every_n_epochs=1)


pl.seed_everything(0)
# the interrupted run: stops after epoch 0 (3 steps per rank), leaving its epoch-0 checkpoint
ddp_trainer("first", strategy, max_epochs=3, max_steps=3, callbacks=cbs() + [ck], enable_checkpointing=True).fit(
    TinyModule(), loader(tiny_data(24), batch_size=4))
m2 = TinyModule()
t = ddp_trainer("resumed", strategy, max_epochs=3, callbacks=cbs())
t.fit(m2, loader(tiny_data(24), batch_size=4), ckpt_path=os.path.join(OUT, "ck", "epoch=0-step=3.ckpt"))
save("resume", t, {"straight": {k: v.clone() for k, v in m1.state_dict().items()},
                   "resumed": {k: v.clone() for k, v in m2.state_dict().items()}})
