"""sampled_backward: a second cotangent carried inside the real backward, against autograd."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from conftest import Twice
from lightning_kfac_swa import sampled_backward as sb


class Tangle(nn.Module):
    """Every kind of edge the engine treats specially: broadcast, dtype casts, a multi-output
    node, in-place ops, views, a tensor used twice, a strided conv, BN, a frozen branch."""

    def __init__(self, python_node=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.lin = nn.Linear(6 * 4 * 4, 10)
        self.scale = nn.Parameter(torch.randn(1, 10, generator=g))  # broadcast over the batch
        self.frozen = nn.Linear(6 * 4 * 4, 10).requires_grad_(False)
        self.head = nn.Linear(10, 5)
        self.python_node = python_node
        self.taps = {}

    def tap(self, name, t):
        self.taps[name] = t
        return t

    def forward(self, x):
        h = self.tap("conv", self.conv(x))
        h = torch.relu_(self.bn(h))  # in place on the BN output
        flat = h.flatten(1)  # a view
        a = self.tap("lin", self.lin(flat))
        a = (a.double() * self.scale.double()).float()  # dtype casts + broadcast
        left, right = a.chunk(2, dim=1)  # one node, two outputs
        if self.python_node:
            left = Twice.apply(left)
        mixed = torch.cat([left * right, right], 1) + self.frozen(flat)[:, :10]
        mixed = mixed + a  # `a` is used twice: contributions add up
        mixed = mixed + a.mean(0, keepdim=True)  # a non-leaf broadcast over the batch
        return self.tap("head", self.head(mixed))


def run(model, x, y, cot, with_sampled, fail=False):
    """One forward and real backward; returns (sampled grads at the taps, param grads, helper)."""
    model.zero_grad(set_to_none=True)
    model.taps = {}
    logits = model(x)
    got, helper = {}, None
    if with_sampled:
        nodes = sb.plan(logits)
        assert nodes is not None

        def record(name):
            def fn(g):
                if fail and name == "lin":
                    raise RuntimeError("boom")
                got[name] = g.clone()
            return fn

        taps = {}
        for name, t in model.taps.items():
            taps.setdefault(t.grad_fn, []).append((t.output_nr, record(name)))
        helper = sb.SampledBackward(logits, cot, nodes, taps)
    F.cross_entropy(logits, y).backward()
    if helper is not None:
        helper.detach()
    return got, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, helper


def reference(model, x, cot):
    """The sampled gradients at the taps by a plain autograd pass with tensor hooks."""
    model.taps = {}
    ref = {}
    logits = model(x)
    for name, t in model.taps.items():
        if name != "head":
            t.register_hook(lambda g, name=name: ref.__setitem__(name, g.clone()))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(logits, params, cot)
    ref["head"] = cot
    return ref


@pytest.fixture
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(7, 3, 8, 8), torch.randint(0, 5, (7,))
    cot = torch.randn(7, 5)
    return Tangle(), x, y, cot


def test_taps_get_the_sampled_gradients_and_the_real_backward_is_untouched(setup):
    model, x, y, cot = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got, grads, helper = run(model, x, y, cot, with_sampled=True)
    assert helper.error is None and helper.reached and helper.seconds > 0
    model.load_state_dict(state)  # BN running stats moved: same start for every pass
    _, plain_grads, _ = run(model, x, y, cot, with_sampled=False)
    model.load_state_dict(state)
    ref = reference(model, x, cot)
    assert set(got) == {"conv", "lin", "head"}
    for name in got:
        assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name in grads:  # bit for bit: the sampled pass never writes into the real one
        assert torch.equal(grads[name], plain_grads[name]), name


def test_a_failing_tap_stops_the_sampled_pass_but_not_the_real_backward(setup):
    model, x, y, cot = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got, grads, helper = run(model, x, y, cot, with_sampled=True, fail=True)
    assert isinstance(helper.error, RuntimeError) and "lin" not in got and "conv" not in got
    model.load_state_dict(state)
    _, plain_grads, _ = run(model, x, y, cot, with_sampled=False)
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name


def test_plan_refuses_graphs_with_python_function_nodes():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 8, 8)
    assert sb.plan(Tangle(python_node=True)(x)) is None
    assert sb.plan(Tangle()(x)) is not None
    assert sb.plan(torch.randn(3, 5)) is None  # no graph at all


def test_not_reached_when_the_loss_bypasses_the_root(setup):
    model, x, y, cot = setup
    logits = model(x)
    helper = sb.SampledBackward(logits, cot, sb.plan(logits), {})
    model.lin.weight.sum().backward()  # a backward that never passes the logits
    helper.detach()
    assert not helper.reached and helper.error is None
