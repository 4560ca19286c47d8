"""The SWA callback and the paper's schedule in real Lightning runs."""
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.testing import assert_close

from conftest import TinyModule, loader, tiny_data, trainer
from lightning_kfac_swa import KFAC
from lightning_kfac_swa.schedules import HoldDecayLR, hold_decay_factor
from lightning_kfac_swa.swa import SWA


def bn_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 5))


class Scheduled(TinyModule):
    def __init__(self, lr=0.1, total=4):
        torch.manual_seed(0)
        super().__init__(lr=lr, net=bn_net())
        self.total = total

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": HoldDecayLR(opt, self.total, 0.01)}


class EpochCapture(Callback):
    """Independently records the weights at each epoch end and the lr of every step."""

    def __init__(self):
        self.weights, self.lrs, self.norms = {}, [], {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append((trainer.current_epoch, optimizer.param_groups[0]["lr"]))

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


def reference_bn_stats(net, params, batches):
    """Per-BN mean / unbiased var of its input over all examples, by an explicit layer loop in
    which each BN normalises by its batch's statistics (train mode)."""
    inputs = {}
    with torch.no_grad():
        for x in batches:
            h = x
            for i, m in enumerate(net):
                if isinstance(m, nn.BatchNorm2d):
                    inputs.setdefault(i, []).append(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]))
                    h = F.batch_norm(h, None, None, params[f"net.{i}.weight"], params[f"net.{i}.bias"], training=True)
                elif isinstance(m, (nn.Conv2d, nn.Linear)):
                    h = (F.conv2d(h, params[f"net.{i}.weight"], params[f"net.{i}.bias"], m.stride, m.padding)
                         if isinstance(m, nn.Conv2d) else F.linear(h, params[f"net.{i}.weight"], params[f"net.{i}.bias"]))
                else:
                    h = m(h)
    return {i: (torch.cat(v).mean(0), torch.cat(v).var(0, unbiased=True)) for i, v in inputs.items()}


def test_final_model_is_mean_of_end_of_epoch_weights_with_recalibrated_bn(tmp_path):
    cap = EpochCapture()
    swa = SWA(swa_epoch_start=2, swa_lr=0.05)
    m = Scheduled().double()
    ds = tiny_data(40, dtype=torch.float64)
    t = trainer(tmp_path, max_epochs=5, precision="64-true", callbacks=[cap, swa])
    t.fit(m, loader(ds), loader(tiny_data(16, dtype=torch.float64, seed=4)))
    assert swa.averaged_epochs == [2, 3, 4]
    mean = {k: torch.stack([cap.weights[e][k] for e in (2, 3, 4)]).mean(0) for k in cap.weights[4]}
    for k, p in m.named_parameters():
        assert_close(p, mean[k])
    ref = reference_bn_stats(m.net, mean, [x for x, _ in loader(ds)])
    for i, (mu, var) in ref.items():
        assert_close(m.net[i].running_mean, mu)
        assert_close(m.net[i].running_var, var)
    # every step of an SWA epoch ran at the SWA rate; earlier ones at the scheduler's rate
    for epoch, lr in cap.lrs:
        expected = 0.05 if epoch >= 2 else 0.1 * hold_decay_factor(epoch, 4, 0.01)
        assert lr == pytest.approx(expected)
    # the averaged model reported at the last epoch is the model the module now holds
    reported = t.callback_metrics["swa/val/loss"].item()
    assert "val/loss" in t.callback_metrics
    after = t.validate(m, loader(tiny_data(16, dtype=torch.float64, seed=4)), verbose=False)[0]["val/loss"]
    assert after == pytest.approx(reported, rel=1e-6)  # Lightning stores logged values in float32


def test_swa_lr_ratio_and_annealing_follow_initial_lr(tmp_path):
    cap = EpochCapture()
    swa = SWA(swa_epoch_start=0.5, swa_lr_ratio=0.5, annealing_epochs=2, swa_eval_interval=0)
    t = trainer(tmp_path, max_epochs=6, callbacks=[cap, swa])
    t.fit(Scheduled(lr=0.2, total=100), loader(tiny_data(16)))
    assert swa.start_epoch == 3
    by_epoch = {e: lr for e, lr in cap.lrs}
    assert by_epoch[2] == pytest.approx(0.2)
    assert by_epoch[3] == pytest.approx(0.2 + (0.1 - 0.2) * 0.5)
    assert by_epoch[4] == pytest.approx(0.1) and by_epoch[5] == pytest.approx(0.1)


def test_theorem_1_on_logged_norms(tmp_path):
    """||mean w||² <= mean ||w||² over the averaged epochs, strictly when the weights differ."""
    cap = EpochCapture()
    swa = SWA(swa_epoch_start=1, swa_lr=0.05)
    logs = []

    class LogReader(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            logs.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("weight_norm")})

    t = trainer(tmp_path, max_epochs=5, callbacks=[cap, swa, LogReader()])
    m = Scheduled()
    t.fit(m, loader(tiny_data(32)))
    current = [logs[e]["weight_norm/current"] for e in range(1, 5)]
    swa_norm = logs[-1]["weight_norm/swa"]
    mean_sq = sum(c * c for c in current) / len(current)
    assert swa_norm ** 2 < mean_sq
    # the logged norms are the norms of the captured weights / of the final averaged model
    for e in range(1, 5):
        ref = torch.sqrt(sum((w.double() ** 2).sum() for w in cap.weights[e].values())).item()
        assert current[e - 1] == pytest.approx(ref, rel=1e-5)
    final = torch.sqrt(sum((p.double() ** 2).sum() for p in m.parameters())).item()
    assert swa_norm == pytest.approx(final, rel=1e-5)
    # equality when all averaged weights agree: lr = 0 and no weight decay
    logs.clear()

    class Frozen(Scheduled):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)
    t = trainer(tmp_path, max_epochs=3, callbacks=[SWA(swa_epoch_start=1, swa_lr=1e-9), LogReader()])
    t.fit(Frozen(), loader(tiny_data(32)))
    assert logs[-1]["weight_norm/swa"] == pytest.approx(logs[-1]["weight_norm/current"], rel=1e-6)


class Crash(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_crash_mid_swa_and_resume_is_bit_identical_with_kfac(tmp_path):
    ds, val = tiny_data(40), tiny_data(16, seed=4)

    def cbs():
        return [KFAC(factor_update_interval=2, inverse_update_interval=3), SWA(swa_epoch_start=1, swa_lr=0.05)]

    straight_cbs = cbs()
    m1 = Scheduled(total=5)
    trainer(tmp_path / "a", max_epochs=5, callbacks=straight_cbs).fit(m1, loader(ds), loader(val))

    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "b", max_epochs=5, callbacks=cbs() + [Crash(3), ck], enable_checkpointing=True).fit(
            Scheduled(total=5), loader(ds), loader(val))
    ckpt = next((tmp_path / "ck").glob("epoch=2*.ckpt"))
    resumed_cbs = cbs()
    m2 = Scheduled(total=5)
    torch.manual_seed(123)
    trainer(tmp_path / "c", max_epochs=5, callbacks=resumed_cbs).fit(m2, loader(ds), loader(val), ckpt_path=str(ckpt))
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = straight_cbs[1].state_dict(), resumed_cbs[1].state_dict()
    assert s1["averaged_epochs"] == s2["averaged_epochs"] == [1, 2, 3, 4]
    for k in s1["average"]:
        assert torch.equal(s1["average"][k], s2["average"][k]), k
    assert straight_cbs[0].state_dict()["steps"] == resumed_cbs[0].state_dict()["steps"]


def test_final_swa_checkpoint_holds_averaged_weights(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path / "ck")
    m = Scheduled()
    t = trainer(tmp_path, max_epochs=3, callbacks=[SWA(swa_epoch_start=1, swa_lr=0.05, swa_eval_interval=0), ck],
                enable_checkpointing=True)
    t.fit(m, loader(tiny_data(32)))
    saved = torch.load(tmp_path / "ck" / "swa.ckpt", weights_only=False)["state_dict"]
    for k, v in m.state_dict().items():
        assert torch.equal(saved[k], v), k


@pytest.mark.parametrize("kwargs, match", [
    (dict(swa_epoch_start=-1), r"swa_epoch_start must be an int >= 0 .* got -1"),
    (dict(swa_epoch_start=1.5), r"swa_epoch_start must be .* got 1.5"),
    (dict(swa_epoch_start="10"), r"swa_epoch_start must be .* got '10'"),
    (dict(swa_lr=0.0), "swa_lr must be > 0 or None, got 0.0"),
    (dict(swa_lr=-1), "swa_lr must be > 0 or None, got -1"),
    (dict(swa_lr_ratio=0), r"swa_lr_ratio must be in \(0, 1\], got 0"),
    (dict(swa_lr_ratio=1.5), r"swa_lr_ratio must be in \(0, 1\], got 1.5"),
    (dict(annealing_epochs=-2), "annealing_epochs must be an integer >= 0, got -2"),
    (dict(swa_eval_interval=1.0), "swa_eval_interval must be an integer >= 0, got 1.0"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SWA(**kwargs)


class TwoOptimizers(TinyModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[:2].parameters(), lr=0.1), torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]


def test_setup_errors(tmp_path):
    with pytest.raises(ValueError, match=r"swa_epoch_start must be < max_epochs=3 .* got 3 \(epoch 3\)"):
        trainer(tmp_path, max_epochs=3, callbacks=[SWA(swa_epoch_start=3)]).fit(TinyModule(), loader(tiny_data()))
    with pytest.raises(ValueError, match="SWA supports exactly one optimizer, got 2"):
        trainer(tmp_path, max_epochs=2, callbacks=[SWA(swa_epoch_start=1)]).fit(TwoOptimizers(), loader(tiny_data()))
    from types import SimpleNamespace
    from lightning.pytorch.strategies import DeepSpeedStrategy
    try:
        strategy = DeepSpeedStrategy()
    except Exception:  # deepspeed not installed: a subclass named like it stands in
        strategy = type("DeepSpeedStrategy", (), {})()
    with pytest.raises(ValueError, match="SWA does not support the DeepSpeedStrategy strategy"):
        SWA().setup(SimpleNamespace(strategy=strategy, max_epochs=3), TinyModule(), "fit")


def hold_decay_reference(t, T, r):
    """Equation (7), written out."""
    if t / T <= 0.5:
        return 1.0
    if t / T <= 0.9:
        return 1.0 - (1.0 - r) * (t / T - 0.5) / 0.4
    return r


@pytest.mark.parametrize("T, r", [(300, 0.01), (161, 0.5)])
def test_hold_decay_lr_matches_equation_7_for_300_epochs(T, r):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.03)
    sched = HoldDecayLR(opt, T, r)
    for t in range(300):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.03 * hold_decay_reference(t, T, r), rel=1e-12), t
        opt.step()
        sched.step()


def test_hold_decay_lr_bad_arguments():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.03)
    with pytest.raises(ValueError, match="total_epochs must be an integer >= 1, got 0"):
        HoldDecayLR(opt, 0)
    with pytest.raises(ValueError, match=r"final_ratio must be in \(0, 1\], got 0"):
        HoldDecayLR(opt, 10, 0)
