"""The KFAC callback in real Lightning runs, against slow explicit references (float64)."""
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.testing import assert_close

from conftest import StepCapture, TinyModule, Twice, loader, tiny_data, tiny_net, trainer
from lightning_kfac_swa import KFAC
from lightning_kfac_swa import kfac_math as km
from test_kfac_math import explicit_patches


def reference_step(state, batch, bn=True, classes=5):
    """Slow references for one training step: A, G per layer and the raw gradients.

    Runs the network layer by layer in float64 (train mode), takes ĝ = B × ∂loss/∂output
    with autograd, and builds the factors from explicit patches and per-location loops.
    """
    net = tiny_net(bn, classes).double()
    net.load_state_dict({k[len("net."):]: v for k, v in state.items()})
    net.train()
    x, y = batch
    B = x.shape[0]
    conv, lin = net[0], net[-1]
    h = conv(x)
    conv_out = h
    for m in list(net)[1:-1]:
        h = m(h)
    lin_in = h
    out = lin(lin_in)
    loss = F.cross_entropy(out, y)
    g_conv, g_lin = torch.autograd.grad(loss, [conv_out, lin_in], retain_graph=True)
    g_lin = torch.autograd.grad(loss, out)[0]
    g_conv, g_lin = g_conv * B, g_lin * B
    rows, (ho, wo) = explicit_patches(x, conv)
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    A_conv = rows.T @ rows / (B * ho * wo)
    G_conv = sum(torch.outer(g_conv[n, :, i, j], g_conv[n, :, i, j])
                 for n in range(B) for i in range(ho) for j in range(wo)) / B
    a_lin = torch.cat([lin_in, torch.ones(B, 1, dtype=lin_in.dtype)], 1)
    A_lin = sum(torch.outer(a_lin[n], a_lin[n]) for n in range(B)) / B
    G_lin = sum(torch.outer(g_lin[n], g_lin[n]) for n in range(B)) / B
    return {"net.0": (A_conv, G_conv), "net.%d" % (len(net) - 1): (A_lin, G_lin)}


def dense_precondition(A, G, grad, damping):
    """vec(ΔW) = (A ⊗ G + λ I)⁻¹ vec(∇) with column-stacking vec, by a dense solve."""
    d_out, d_in = grad.shape
    dense = torch.kron(A, G) + damping * torch.eye(d_in * d_out, dtype=A.dtype)
    return torch.linalg.solve(dense, grad.T.reshape(-1)).reshape(d_in, d_out).T


def as_matrix(grads, name):
    w, b = grads[name + ".weight"], grads[name + ".bias"]
    return torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1)


class FactorCapture(Callback):
    """Copies the KFAC callback's factors after every optimizer step (public state_dict)."""

    def __init__(self, kfac):
        self.kfac, self.factors = kfac, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.factors.append({n: (f["A"].clone(), f["G"].clone())
                             for n, f in self.kfac.state_dict()["factors"].items()})


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("kl_clip", [None, 1e-4])
def test_empirical_factors_and_preconditioning_match_dense_reference(method, kl_clip, tmp_path):
    damping, lr = 0.05, 0.1
    kfac = KFAC(damping=damping, factor_decay=0.0, factor_update_interval=1, inverse_update_interval=1,
                kl_clip=kl_clip, fisher="empirical", method=method)
    before, after, factors = StepCapture(), StepCapture(), FactorCapture(kfac)
    module = TinyModule(lr=lr, nograd_forward=True).double()
    val = tiny_data(16, dtype=torch.float64, seed=5)
    val.tensors = (val.tensors[0] * 50, val.tensors[1])  # would wreck A if validation were recorded
    t = trainer(tmp_path, precision="64-true", max_steps=3, val_check_interval=1, limit_val_batches=1,
                callbacks=[before, kfac, after, factors])
    t.fit(module, loader(tiny_data(24, dtype=torch.float64)), loader(val))
    assert kfac.steps == 3
    for step in range(3):
        ref = reference_step(before.states[step], before.batches[step])
        got_factors = factors.factors[step]
        vg, pre = 0.0, {}
        for name, (A, G) in ref.items():
            assert_close(got_factors[name][0], A)
            assert_close(got_factors[name][1], G)
            raw = as_matrix(before.grads[step], name)
            if method == "eigen":
                pre[name] = dense_precondition(A, G, raw, damping)
            else:
                d_in, d_out = A.shape[0], G.shape[0]
                pi = ((torch.trace(A) / d_in) / (torch.trace(G) / d_out)).sqrt()
                pre[name] = torch.linalg.solve(G + damping ** 0.5 / pi * torch.eye(d_out, dtype=A.dtype),
                                               raw) @ torch.linalg.inv(A + pi * damping ** 0.5 * torch.eye(d_in, dtype=A.dtype))
            vg += lr ** 2 * (pre[name] * raw).sum()
        nu = 1.0 if kl_clip is None else min(1.0, (kl_clip / vg) ** 0.5)
        if kl_clip is not None:
            assert nu < 1.0  # the clip is active in this configuration
        for name in ref:
            assert_close(as_matrix(after.grads[step], name), nu * pre[name])
        # non-K-FAC parameters (BN) are untouched
        assert_close(after.grads[step]["net.1.weight"], before.grads[step]["net.1.weight"])


def test_mc_fisher_last_layer_approaches_model_fisher_and_differs_from_empirical(tmp_path):
    """With lr=0 the running G of the classifier converges to 1/B Σ (diag p − p pᵀ)."""
    B, steps = 32, 300
    base = tiny_data(B, seed=3)
    x, _ = base.tensors
    module = TinyModule(lr=0.0, bn=False)
    with torch.no_grad():
        p = torch.softmax(module(x), 1)
    disagree = p.argmin(1)  # labels the model considers least likely
    ds = torch.utils.data.TensorDataset(x.repeat(steps, 1, 1, 1), disagree.repeat(steps))
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    got = {}
    for fisher in ("mc", "empirical"):
        kfac = KFAC(factor_decay=0.99, factor_update_interval=1, inverse_update_interval=1000, fisher=fisher)
        trainer(tmp_path, max_steps=steps, callbacks=[kfac]).fit(TinyModule(lr=0.0, bn=False), loader(ds, B))
        got[fisher] = kfac.state_dict()["factors"]["net.3"]["G"]  # the classifier (no BN)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(got["mc"], expected) < 0.1
    assert rel(got["empirical"], expected) > 1.0
    e = F.one_hot(disagree, 5).float()
    emp_expected = ((p - e)[:, :, None] * (p - e)[:, None, :]).mean(0)
    assert_close(got["empirical"], emp_expected, rtol=1e-4, atol=1e-5)


class PythonNodeReLU(nn.Module):
    """relu(x) = relu(2x) / 2 through a Python autograd.Function: a graph node the sampled
    backward cannot apply directly, so KFAC takes the separate autograd.grad pass."""

    def forward(self, x):
        return torch.relu(Twice.apply(x)) / 2


@pytest.mark.parametrize("route", ["inside the real backward", "separate pass"])
def test_mc_factors_match_reference_for_the_sampled_labels(route, tmp_path, monkeypatch):
    """G from fisher='mc' is exactly 1/B Σ ĝ ĝᵀ of the loss on the labels it drew, on both routes."""
    from lightning_kfac_swa import sampled_backward as sb
    drawn, built = [], []
    real_multinomial, real_sampled = torch.multinomial, sb.SampledBackward

    def recording_multinomial(*args, **kwargs):
        out = real_multinomial(*args, **kwargs)
        drawn.append(out.squeeze(1).clone())
        return out

    def recording_sampled(*args, **kwargs):
        built.append(1)
        return real_sampled(*args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    monkeypatch.setattr(sb, "SampledBackward", recording_sampled)
    kfac = KFAC(factor_decay=0.0, factor_update_interval=1, fisher="mc")
    before, factors = StepCapture(), FactorCapture(kfac)
    module = TinyModule(lr=0.1).double()
    if route == "separate pass":
        module.net[2] = PythonNodeReLU()
    t = trainer(tmp_path, precision="64-true", max_steps=3, callbacks=[before, kfac, factors])
    t.fit(module, loader(tiny_data(24, dtype=torch.float64)))
    assert len(drawn) == 3 and len(built) == (3 if route == "inside the real backward" else 0)
    for step in range(3):
        x, y = before.batches[step]
        assert not torch.equal(drawn[step], y)  # the sampled labels are not the true ones
        ref = reference_step(before.states[step], (x, drawn[step]))
        for name, (A, G) in ref.items():
            assert_close(factors.factors[step][name][0], A)
            assert_close(factors.factors[step][name][1], G)


def test_failing_sampled_backward_skips_that_factor_update(tmp_path, monkeypatch):
    """An error inside the sampled pass never reaches the real backward: that step's factor
    update is skipped with a warning, the previous factors are kept, later steps take the
    separate pass, training goes on."""
    from lightning_kfac_swa import sampled_backward as sb
    kfac = KFAC(factor_update_interval=1, fisher="mc")
    factors = FactorCapture(kfac)
    real_step, calls = sb.SampledBackward._step, []

    def flaky_step(self, node, grads):
        calls.append(kfac.steps)
        if kfac.steps == 1:
            raise RuntimeError("simulated failure")
        return real_step(self, node, grads)

    monkeypatch.setattr(sb.SampledBackward, "_step", flaky_step)
    module = TinyModule()
    with pytest.warns(UserWarning, match="sampled-label \\(MC\\) backward failed inside the real backward at step 1"):
        trainer(tmp_path, max_steps=3, callbacks=[kfac, factors]).fit(module, loader(tiny_data()))
    assert set(calls) == {0, 1} and kfac.steps == 3
    for name, (A, G) in factors.factors[1].items():
        assert torch.equal(A, factors.factors[0][name][0]) and torch.equal(G, factors.factors[0][name][1])
        assert not torch.equal(G, factors.factors[2][name][1])  # step 2 updates again
    assert all(torch.isfinite(p).all() for p in module.parameters())


class Checkpointed(nn.Module):
    """tiny_net with its conv block under torch.utils.checkpoint (non-reentrant): saved
    tensors that can be unpacked only once per backward."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.net[:3], x, use_reentrant=False)
        return self.net[3:](h)


def test_mc_with_activation_checkpointing_falls_back_to_the_separate_pass(tmp_path):
    kfac = KFAC(factor_update_interval=1, fisher="mc")
    factors = FactorCapture(kfac)
    with pytest.warns(UserWarning, match="later ones use a separate autograd.grad pass"):
        trainer(tmp_path, max_steps=3, callbacks=[kfac, factors]).fit(TinyModule(net=Checkpointed()),
                                                                      loader(tiny_data()))
    assert set(factors.factors[2]) == {"net.net.0", "net.net.4"}
    for name, (A, G) in factors.factors[2].items():
        assert torch.isfinite(G).all() and G.trace() > 0
        assert not torch.equal(G, factors.factors[1][name][1])  # updated after the fallback


def test_kfac_phases_show_up_as_profiler_ranges(tmp_path):
    from torch.profiler import ProfilerActivity, profile
    kfac = KFAC(factor_update_interval=1, fisher="mc")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer(tmp_path, max_steps=2, callbacks=[kfac]).fit(TinyModule(), loader(tiny_data()))
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("kfac::")}
    assert calls["kfac::update_factors"] == 2 and calls["kfac::precondition"] == 2
    assert calls["kfac::A"] == calls["kfac::G"] == 4  # 2 layers x 2 steps
    assert calls["kfac::decompose"] >= 1 and calls["kfac::sampled_backward"] >= 2


def test_gradient_accumulation_counts_every_micro_batch(tmp_path):
    """Two micro-batches of 8 accumulated == one batch of 16 (no BN, so examples don't interact)."""
    ds = tiny_data(16, dtype=torch.float64)
    results = []
    for bs, acc in ((16, 1), (8, 2)):
        kfac = KFAC(factor_decay=0.0, factor_update_interval=1, inverse_update_interval=1,
                    fisher="empirical", kl_clip=1e-3)
        after = StepCapture()
        t = trainer(tmp_path, precision="64-true", max_steps=1, accumulate_grad_batches=acc,
                    callbacks=[kfac, after])
        t.fit(TinyModule(bn=False).double(), loader(ds, bs))
        results.append((kfac.state_dict()["factors"], after.grads[0]))
    (f1, g1), (f2, g2) = results
    for name in f1:
        assert_close(f1[name]["A"], f2[name]["A"])
        assert_close(f1[name]["G"], f2[name]["G"])
    for name in g1:
        assert_close(g1[name], g2[name])


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """3 epochs straight == 1 epoch, checkpoint, resume for 2 more (mc sampling, snapshots)."""
    def make():
        return KFAC(factor_update_interval=2, inverse_update_interval=4, fisher="mc", damping=0.01)
    ds = tiny_data(56)  # 7 steps an epoch: factor/decomposition steps straddle the checkpoint
    torch.manual_seed(7)
    straight = make()
    m1 = TinyModule()
    trainer(tmp_path / "a", max_epochs=3, callbacks=[straight]).fit(m1, loader(ds))
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    torch.manual_seed(7)
    first = make()
    trainer(tmp_path / "b", max_epochs=1, callbacks=[first, ck], enable_checkpointing=True).fit(TinyModule(), loader(ds))
    ckpt = next((tmp_path / "ck").glob("epoch=0*.ckpt"))
    state = first.state_dict()
    assert any("A_decomposed" in f for f in state["factors"].values())  # the snapshot path is exercised
    torch.manual_seed(99)  # the resumed run must not depend on the global RNG
    resumed = make()
    m2 = TinyModule()
    trainer(tmp_path / "c", max_epochs=3, callbacks=[resumed]).fit(m2, loader(ds), ckpt_path=str(ckpt))
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = straight.state_dict(), resumed.state_dict()
    assert s1["steps"] == s2["steps"] == 21 and s1["seed"] == s2["seed"]
    for name in s1["factors"]:
        for k in s1["factors"][name]:
            assert torch.equal(s1["factors"][name][k], s2["factors"][name][k])


def test_bf16_mixed_keeps_float32_factors_close_to_fp32(tmp_path):
    res = {}
    for precision in ("32-true", "bf16-mixed"):
        kfac = KFAC(factor_decay=0.0, factor_update_interval=1, inverse_update_interval=1, fisher="empirical")
        m = TinyModule(lr=0.0)
        trainer(tmp_path, precision=precision, max_steps=1, callbacks=[kfac]).fit(m, loader(tiny_data(16)))
        res[precision] = kfac.state_dict()["factors"]
        assert all(torch.isfinite(p).all() for p in m.parameters())
    for name, f in res["bf16-mixed"].items():
        assert f["A"].dtype == f["G"].dtype == torch.float32
        for k in ("A", "G"):
            ref = res["32-true"][name][k]
            assert ((f[k] - ref).norm() / ref.norm()).item() < 0.05


def test_mc_routes_agree_under_bf16_mixed(tmp_path):
    """Under autocast the graph mixes bf16 and float32 nodes: the ride-along pass must cast
    between them as the engine does, and give the separate pass's factors."""
    got = []
    for separate in (False, True):
        kfac = KFAC(factor_decay=0.0, factor_update_interval=1, fisher="mc")
        module = TinyModule(lr=0.0)
        if separate:
            module.net[2] = PythonNodeReLU()  # relu(2x)/2: the same values, bit for bit
        trainer(tmp_path, precision="bf16-mixed", max_steps=2, callbacks=[kfac]).fit(module, loader(tiny_data(16)))
        got.append(kfac.state_dict()["factors"])
    for name, f in got[0].items():
        assert f["G"].dtype == torch.float32
        assert_close(f["A"], got[1][name]["A"], rtol=0, atol=0)
        assert_close(f["G"], got[1][name]["G"])


def test_skip_leaves_layer_to_plain_optimizer(tmp_path):
    kfac = KFAC(skip=[r"^net\.4$"], factor_update_interval=1, inverse_update_interval=1)
    before, after = StepCapture(), StepCapture()
    trainer(tmp_path, max_steps=2, callbacks=[before, kfac, after]).fit(TinyModule(), loader(tiny_data()))
    assert set(kfac.state_dict()["factors"]) == {"net.0"}
    assert torch.equal(before.grads[1]["net.4.weight"], after.grads[1]["net.4.weight"])
    assert not torch.equal(before.grads[1]["net.0.weight"], after.grads[1]["net.0.weight"])


class UnusedLayer(TinyModule):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(3, 3)  # registered, never called


def test_layer_whose_hooks_never_fire_warns_and_stays_plain(tmp_path):
    kfac = KFAC(factor_update_interval=1, inverse_update_interval=1, fisher="empirical")
    with pytest.warns(UserWarning, match=r"no statistics for layer\(s\) \['spare'\]"):
        trainer(tmp_path, max_steps=2, callbacks=[kfac]).fit(UnusedLayer(), loader(tiny_data()))
    assert "spare" not in kfac.state_dict()["factors"]


def test_eigh_failure_keeps_previous_decomposition(tmp_path, monkeypatch):
    kfac = KFAC(factor_update_interval=1, inverse_update_interval=1)
    after = StepCapture()
    calls = {"n": 0}
    real = km.symmetric_eigen

    def flaky(f):
        calls["n"] += 1
        if calls["n"] > 4:  # every decomposition after the first step fails, float64 retry too
            raise torch.linalg.LinAlgError("injected")
        return real(f)
    monkeypatch.setattr(km, "symmetric_eigen", flaky)
    m = TinyModule()
    with pytest.warns(UserWarning, match="previous decomposition is kept"):
        trainer(tmp_path, max_steps=3, callbacks=[kfac, after]).fit(m, loader(tiny_data()))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(torch.isfinite(g).all() for step in after.grads for g in step.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(damping=0), "damping must be > 0, got 0"),
    (dict(damping=-1e-3), "damping must be > 0"),
    (dict(factor_decay=1.0), r"factor_decay must be in \[0, 1\), got 1.0"),
    (dict(factor_decay=-0.1), r"factor_decay must be in \[0, 1\)"),
    (dict(factor_update_interval=0), "factor_update_interval must be an integer >= 1, got 0"),
    (dict(inverse_update_interval=2.5), "inverse_update_interval must be an integer >= 1, got 2.5"),
    (dict(conv_locations=0), "conv_locations must be an integer >= 1 or None, got 0"),
    (dict(kl_clip=0.0), "kl_clip must be > 0 or None, got 0.0"),
    (dict(fisher="true"), "fisher must be one of 'mc', 'empirical', got 'true'"),
    (dict(method="cholesky"), "method must be one of 'eigen', 'inverse', got 'cholesky'"),
    (dict(skip="fc"), "skip must be a sequence of regular expressions, got 'fc'"),
    (dict(skip=["(unclosed"]), "skip must hold valid regular expressions"),
    (dict(logits_module=3), "logits_module must be a module name or None, got 3"),
    (dict(distribute_decompositions="yes"), "distribute_decompositions must be a bool"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFAC(**kwargs)


class NoLayers(TinyModule):
    def __init__(self):
        super().__init__(net=nn.Sequential(nn.Flatten(), nn.BatchNorm1d(192)))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()


class Manual(TinyModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def test_setup_errors(tmp_path):
    with pytest.raises(ValueError, match="KFAC found no supported layer"):
        trainer(tmp_path, max_steps=1, callbacks=[KFAC()]).fit(NoLayers(), loader(tiny_data()))
    with pytest.raises(ValueError, match="KFAC needs automatic optimization"):
        trainer(tmp_path, max_steps=1, callbacks=[KFAC()]).fit(Manual(), loader(tiny_data()))
    with pytest.raises(ValueError, match="logits_module must name a module of the model, got 'head'"):
        trainer(tmp_path, max_steps=1, callbacks=[KFAC(logits_module="head")]).fit(TinyModule(), loader(tiny_data()))
    with pytest.raises(ValueError, match=r"fisher='mc' needs logits of shape \(batch, classes >= 2\)"):
        trainer(tmp_path, max_steps=1, callbacks=[KFAC(logits_module="net.0")]).fit(TinyModule(), loader(tiny_data()))
    from lightning.pytorch.strategies import FSDPStrategy
    from types import SimpleNamespace
    with pytest.raises(ValueError, match="KFAC does not support the FSDPStrategy strategy"):
        KFAC().setup(SimpleNamespace(strategy=FSDPStrategy()), TinyModule(), "fit")


def test_groups_conv_refused_with_layer_name(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Flatten(), nn.Linear(216, 5))
    with pytest.raises(ValueError, match=r"K-FAC layer 'net.0': Conv2d with groups=3 is not supported"):
        trainer(tmp_path, max_steps=1, callbacks=[KFAC()]).fit(TinyModule(net=net), loader(tiny_data()))


def test_skipped_grouped_conv_is_fine_and_skipped_classifier_still_gives_logits(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(144, 5))
    kfac = KFAC(skip=[r"^net\.0$", r"^net\.3$"], factor_update_interval=1, fisher="mc")
    trainer(tmp_path, max_steps=2, callbacks=[kfac]).fit(TinyModule(net=net), loader(tiny_data()))
    assert set(kfac.state_dict()["factors"]) == {"net.1"}


def mlp(inplace):
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 5))


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_inplace_activation_after_a_layer_does_not_change_its_factors(fisher, tmp_path):
    """The output hook must see ∂/∂(layer output), not ∂/∂(ReLU output written over it)."""
    got = []
    for inplace in (False, True):
        kfac = KFAC(factor_decay=0.0, factor_update_interval=1, fisher=fisher)
        torch.manual_seed(5)
        trainer(tmp_path, max_steps=1, callbacks=[kfac]).fit(TinyModule(net=mlp(inplace)), loader(tiny_data()))
        got.append(kfac.state_dict()["factors"])
    for name in got[0]:
        assert_close(got[0][name]["G"], got[1][name]["G"])


class TwoBranch(nn.Module):
    """The first layer to run (``side``) is not upstream of ``conv``: its MC pass misses it."""

    def __init__(self, python_node=False):
        super().__init__()
        self.python_node = python_node  # a Python autograd node forces KFAC's separate MC pass
        self.side = nn.Linear(192, 4)
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.head = nn.Linear(4 + 32, 5)

    def forward(self, x):
        a = self.side(x.flatten(1))
        if self.python_node:
            a = Twice.apply(a) / 2
        b = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.cat([torch.relu(a), b], 1))


@pytest.mark.parametrize("python_node", [False, True])
def test_mc_reaches_layers_off_the_first_layers_path(python_node, tmp_path, recwarn):
    kfac = KFAC(factor_update_interval=1, fisher="mc")
    trainer(tmp_path, max_steps=2, callbacks=[kfac]).fit(TinyModule(net=TwoBranch(python_node)), loader(tiny_data()))
    factors = kfac.state_dict()["factors"]
    assert set(factors) == {"net.side", "net.conv", "net.head"}
    assert not [w for w in recwarn if "no statistics" in str(w.message)]
    for f in factors.values():
        assert torch.linalg.eigvalsh(f["G"]).min() > -1e-6 and f["G"].trace() > 0


def test_mc_routes_agree_on_layers_off_the_first_layers_path(tmp_path):
    """The separate pass needs a second autograd.grad for ``conv``; no layer counts twice."""
    got = []
    for python_node in (False, True):
        kfac = KFAC(factor_decay=0.0, factor_update_interval=1, fisher="mc")
        torch.manual_seed(0)  # the same weights and label sampler for both routes
        trainer(tmp_path, max_steps=1, callbacks=[kfac]).fit(TinyModule(net=TwoBranch(python_node)),
                                                             loader(tiny_data()))
        got.append(kfac.state_dict()["factors"])
    for name, f in got[0].items():
        assert_close(f["G"], got[1][name]["G"], rtol=1e-5, atol=1e-7)


def test_conv_locations_estimate_is_reproducible_and_resumes(tmp_path):
    """Subsampled statistics are drawn from the run's seed: two runs agree exactly."""
    got = []
    for run in range(2):
        kfac = KFAC(factor_update_interval=1, conv_locations=3)
        torch.manual_seed(run)  # the global RNG must not matter, only the base seed
        kfac.seed = 11
        trainer(tmp_path, max_steps=3, callbacks=[kfac]).fit(TinyModule(), loader(tiny_data()))
        got.append(kfac.state_dict()["factors"]["net.0"])
    assert torch.equal(got[0]["A"], got[1]["A"]) and torch.equal(got[0]["G"], got[1]["G"])


def test_16_mixed_divides_out_the_loss_scale(tmp_path):
    """With a GradScaler (scale 2**12) the empirical factors match a 32-true run."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    res = {}
    for name in ("32-true", "16-mixed"):
        kfac = KFAC(factor_decay=0.0, factor_update_interval=1, fisher="empirical")
        kw = {"precision": "32-true"} if name == "32-true" else {"plugins": [MixedPrecision(
            "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))]}
        trainer(tmp_path, max_steps=1, callbacks=[kfac], **kw).fit(TinyModule(lr=0.0), loader(tiny_data(16)))
        res[name] = kfac.state_dict()["factors"]
    for layer, f in res["16-mixed"].items():
        ref = res["32-true"][layer]["G"]
        assert f["G"].dtype == torch.float32
        assert ((f["G"] - ref).norm() / ref.norm()).item() < 0.02  # fp16 forward/backward rounding
