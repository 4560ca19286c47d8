"""K-FAC and SWA under DDP: two CPU processes (gloo), compared with one-process references."""
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from conftest import StepCapture, TinyModule, loader, tiny_data, trainer
from lightning_kfac_swa import KFAC

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    def load(name):
        return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]
    return load


def test_preconditioned_gradient_equals_one_process_full_batch(ddp_results, tmp_path):
    ranks = ddp_results("equiv")
    kfac = KFAC(damping=0.05, factor_decay=0.0, factor_update_interval=1, inverse_update_interval=1,
                fisher="empirical", kl_clip=1e-3)
    after = StepCapture()
    trainer(tmp_path, max_steps=2, precision="64-true", callbacks=[kfac, after]).fit(
        TinyModule(bn=False).double(), loader(tiny_data(32, dtype=torch.float64), batch_size=8))
    for r in ranks:
        for step in range(2):
            for name, g in after.grads[step].items():
                assert_close(r["grads"][step][name], g)
        for name, f in kfac.state_dict()["factors"].items():
            assert_close(r["factors"][name]["A"], f["A"])
            assert_close(r["factors"][name]["G"], f["G"])


def test_mc_labels_differ_across_ranks_and_factors_agree(ddp_results):
    r0, r1 = ddp_results("mc")
    assert len(r0["labels"]) == len(r1["labels"]) == 4  # 2 steps x 2 accumulated micro-batches
    # both ranks saw identical examples, so identical seeds would have drawn identical labels
    assert any(not torch.equal(a, b) for a, b in zip(r0["labels"], r1["labels"]))
    for name in r0["factors"]:
        for k in ("A", "G"):
            assert torch.equal(r0["factors"][name][k], r1["factors"][name][k])
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k


def test_decompositions_are_shared_out_by_cost(ddp_results):
    r0, r1 = ddp_results("mc")
    tasks = 2 * 2 * 2  # 2 steps x 2 layers x (A, G)
    assert r0["eigen_calls"] > 0 and r1["eigen_calls"] > 0
    assert r0["eigen_calls"] + r1["eigen_calls"] == tasks
    a0, a1 = ddp_results("mc_all")
    assert a0["eigen_calls"] == a1["eigen_calls"] == 4  # every rank computes all of them


def test_swa_ranks_agree_and_bn_equals_one_process_recalibration(ddp_results):
    r0, r1 = ddp_results("swa")
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["swa_val"] == r1["swa_val"]
    # reference: BN input (the conv output) over the whole training set with the final weights
    state = r0["state"]
    x, _ = tiny_data(32).tensors
    h = torch.nn.functional.conv2d(x, state["net.0.weight"], state["net.0.bias"], stride=2, padding=1)
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).double()
    assert_close(state["net.1.running_mean"], flat.mean(0).float())
    assert_close(state["net.1.running_var"], flat.var(0).float())


def test_resume_under_ddp_continues_exactly(ddp_results):
    for r in ddp_results("resume"):
        for k, v in r["straight"].items():
            assert torch.equal(v, r["resumed"][k]), k


def test_ddp_spawn_runs_kfac_and_swa(tmp_path):
    from lightning_kfac_swa import SWA
    m = TinyModule()
    t = trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=2,
                callbacks=[KFAC(factor_update_interval=1), SWA(swa_epoch_start=1, swa_lr=0.05)])
    t.fit(m, loader(tiny_data(16), batch_size=4))
    assert all(torch.isfinite(p).all() for p in m.parameters())
