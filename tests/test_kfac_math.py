"""K-FAC math against references built the slow, obvious way (float64, tiny shapes)."""
import itertools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_kfac_swa import distributed as kdist
from lightning_kfac_swa import kfac_math as km


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def explicit_patches(x, conv):
    """Patches ā_{n,t} by explicit loops over examples, output locations and kernel taps."""
    geo = km.conv_geometry(conv)
    left, right, top, bottom = geo.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = torch.nn.functional.pad(x, (left, right, top, bottom), mode=mode)
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    out = conv(x)
    ho, wo = out.shape[2:]
    rows = []
    for n in range(x.shape[0]):
        for i in range(ho):
            for j in range(wo):
                patch = [xp[n, c, i * sh + a * dh, j * sw + b * dw]
                         for c in range(x.shape[1]) for a in range(kh) for b in range(kw)]
                rows.append(torch.stack(patch))
    rows = torch.stack(rows)
    # the reference patches must reproduce the convolution itself (checks the padding split)
    w = conv.weight.reshape(conv.out_channels, -1)
    y = rows @ w.T + (0 if conv.bias is None else conv.bias)
    assert_close(y.reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2), out)
    return rows, (ho, wo)


def reference_input_sum(x, conv):
    """``(Σ ā āᵀ, rows)`` from the explicit patches, with the bias's 1 appended when there is one."""
    rows, _ = explicit_patches(x, conv)
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1)], 1)
    return rows.T @ rows, len(rows)


CONVS = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1, dilation=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=2, padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect", bias=False),
    dict(kernel_size=1, stride=2, bias=False),
]


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_input_sum_matches_explicit_patches(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **cfg)
    x = torch.randn(2, 3, 7, 6)
    ref, rows = reference_input_sum(x, conv)
    s, count = km.conv_input_sum(x, km.conv_geometry(conv), conv.bias is not None)
    assert count == rows
    assert_close(s, ref)


@pytest.mark.parametrize("stride, per_example", [(1, 3 * 64), (2, 27 * 16 + 27 * 27)])
def test_conv_input_sum_chunks_agree(monkeypatch, stride, per_example):
    """Both routes (shifted products for stride 1, unfolded patches otherwise) in chunks of a few examples."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=stride)
    x = torch.randn(9, 3, 8, 8)
    ref, rows = reference_input_sum(x, conv)
    monkeypatch.setattr(km, "CHUNK_ELEMENTS", 2 * per_example)
    chunked, count = km.conv_input_sum(x, km.conv_geometry(conv), True)
    assert count == rows
    assert_close(chunked, ref)


SHIFTED = [  # stride-1 geometries, including maps smaller than the kernel's reach
    (dict(kernel_size=3, padding=1), (2, 2)),
    (dict(kernel_size=3, padding=1), (1, 4)),
    (dict(kernel_size=5, padding=2), (4, 3)),
    (dict(kernel_size=3, padding=0), (5, 4)),
    (dict(kernel_size=(1, 3), padding=(0, 1)), (3, 5)),
    (dict(kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1)), (5, 4)),
    (dict(kernel_size=2, padding="same", dilation=2), (4, 5)),
    (dict(kernel_size=3, padding=1, padding_mode="circular"), (4, 4)),
    (dict(kernel_size=3, padding=2, padding_mode="replicate", bias=False), (3, 4)),
]


@pytest.mark.parametrize("cfg, hw", SHIFTED)
def test_shifted_input_sum_matches_explicit_patches(cfg, hw):
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, **cfg)
    x = torch.randn(3, 2, *hw)
    ref, rows = reference_input_sum(x, conv)
    s, count = km.shifted_input_sum(x, km.conv_geometry(conv), conv.bias is not None)
    assert count == rows
    assert_close(s, ref)
    assert torch.equal(s, s.T)  # every block written once, its mirror as the exact transpose


def test_shifted_input_sum_refuses_strides():
    conv = nn.Conv2d(2, 3, 3, stride=2)
    with pytest.raises(ValueError, match=r"stride \(1, 1\)"):
        km.shifted_input_sum(torch.randn(1, 2, 5, 5), km.conv_geometry(conv), True)


@pytest.mark.parametrize("keep", [1, 5, 100])
def test_location_subsets_use_exactly_the_drawn_locations(keep):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=1, padding=1)
    x = torch.randn(3, 2, 6, 5)
    rows, (ho, wo) = explicit_patches(x, conv)
    rows = torch.cat([rows, torch.ones(len(rows), 1)], 1).reshape(3, ho * wo, -1)
    idx = km.location_subset(3, ho * wo, keep, torch.Generator().manual_seed(7))
    if keep >= ho * wo:
        assert idx is None
        idx = torch.arange(ho * wo).expand(3, -1)
    else:  # distinct locations, drawn separately for each example
        assert idx.shape == (3, keep) and all(len(set(r.tolist())) == keep for r in idx)
        assert not torch.equal(idx[0], idx[1])
    chosen = torch.cat([rows[n, idx[n]] for n in range(3)])
    s, count = km.conv_input_sum(x, km.conv_geometry(conv), True, keep, torch.Generator().manual_seed(7))
    assert count == chosen.shape[0]
    assert_close(s, chosen.T @ chosen)
    g = torch.randn(3, 3, ho, wo)
    gs, gcount = km.output_grad_sum(g, keep, torch.Generator().manual_seed(7))
    gflat = g.reshape(3, 3, -1)
    gk = torch.cat([gflat[n][:, idx[n]].T for n in range(3)])
    assert_close(gs, gk.T @ gk)
    assert gcount == pytest.approx(3 * idx.shape[1] / (ho * wo))


def test_location_subsets_are_unbiased():
    """The mean over many random subsets converges to the all-locations statistics."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    geo = km.conv_geometry(conv)
    full, n_full = km.conv_input_sum(x, geo, True)
    gen = torch.Generator().manual_seed(0)
    est = sum(km.conv_input_sum(x, geo, True, 3, gen)[0] / 12 for _ in range(4000)) / 4000
    assert_close(est, full / n_full, rtol=0.03, atol=0.02)  # Monte Carlo tolerance


def test_second_moment_with_bias_column():
    torch.manual_seed(3)
    a = torch.randn(7, 4)
    ab = torch.cat([a, torch.ones(7, 1)], 1)
    assert_close(km.second_moment_sum(a, True), ab.T @ ab)
    assert_close(km.second_moment_sum(a, False), a.T @ a)


def random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, 2 * d, generator=g)
    return m @ m.T / d


def test_precondition_eigen_is_exact_damped_kronecker_inverse():
    A, G = random_spd(5, 0), random_spd(3, 1)
    grad = torch.randn(3, 5)
    lam = 0.03
    dense = torch.kron(A, G) + lam * torch.eye(15)
    vec = grad.T.reshape(-1)  # column-stacking vec
    ref = torch.linalg.solve(dense, vec).reshape(5, 3).T
    out = km.precondition_eigen(grad, km.symmetric_eigen(A), km.symmetric_eigen(G), lam)
    assert_close(out, ref)


def test_precondition_inverse_matches_factored_tikhonov_formula():
    A, G = random_spd(4, 2), random_spd(3, 3)
    grad = torch.randn(3, 4)
    lam = 0.01
    pi = ((torch.trace(A) / 4) / (torch.trace(G) / 3)).sqrt()
    ref = torch.linalg.inv(G + lam ** 0.5 / pi * torch.eye(3)) @ grad @ torch.linalg.inv(
        A + pi * lam ** 0.5 * torch.eye(4))
    a_inv, g_inv = km.inverse_pair(A, G, lam)
    assert_close(km.precondition_inverse(grad, a_inv, g_inv), ref)


def test_damped_inverse_raises_on_indefinite_matrix():
    with pytest.raises(torch.linalg.LinAlgError):
        km.damped_inverse(-torch.eye(3), 0.1)


def test_kl_clip_scale():
    assert km.kl_clip_scale(torch.tensor(4.0), 1.0).item() == pytest.approx(0.5)
    assert km.kl_clip_scale(torch.tensor(0.1), 1.0).item() == 1.0
    assert km.kl_clip_scale(torch.tensor(0.0), 1.0).item() == 1.0


def test_running_average_first_update_stores_new():
    new = torch.randn(3, 3)
    assert km.running_average(None, new, 0.9) is new
    old = torch.randn(3, 3)
    old_copy, expected = old.clone(), 0.9 * old + 0.1 * new
    out = km.running_average(old, new, 0.9)
    assert_close(out, expected)
    assert torch.equal(old, old_copy)  # the running factor may still source a decomposition


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_any_non_finite_element(bad):
    ok = [torch.randn(4, 4), torch.randn(3)]
    assert km.all_finite(ok) and km.all_finite([])
    for i in range(2):
        for pos in range(ok[i].numel()):
            t = [x.clone() for x in ok]
            t[i].view(-1)[pos] = bad
            assert not km.all_finite(t)
    both = [torch.tensor([float("inf"), -float("inf"), 1.0])]  # opposite infinities: NaN sum
    assert not km.all_finite(both)


def test_pack_unpack_symmetric_roundtrip_and_size():
    mats = [random_spd(d, d) for d in (1, 4, 6)]
    flat = kdist.pack_symmetric(mats)
    assert flat.numel() == sum(d * (d + 1) // 2 for d in (1, 4, 6))
    for m, r in zip(mats, kdist.unpack_symmetric(flat, [1, 4, 6])):
        assert_close(r, m)


def test_assign_by_cost_balances_and_is_deterministic():
    costs = [4609.0 ** 3] * 5 + [512.0 ** 3] * 5 + [64.0 ** 3] * 4
    owners = kdist.assign_by_cost(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert set(owners) == {0, 1}
    assert max(loads) / sum(loads) < 0.61  # 3 of the 5 big ones on one rank at worst
    assert owners == kdist.assign_by_cost(costs, 2)
    best = min(max(sum(c for c, o in zip(costs, ow) if o == r) for r in range(2))
               for ow in itertools.product(range(2), repeat=len(costs)))
    assert max(loads) <= 4 / 3 * best  # the LPT bound
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        kdist.assign_by_cost(costs, 0)


@pytest.mark.parametrize("module", [nn.Linear(4, 3), nn.Linear(4, 3, bias=False),
                                    nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 2, bias=False)])
def test_helper_gradient_matrix_layout_and_roundtrip(module):
    from lightning_kfac_swa.kfac_layers import make_helper
    module = module.double()
    helper = make_helper("layer", module)
    module.weight.grad = torch.randn_like(module.weight)
    if module.bias is not None:
        module.bias.grad = torch.randn_like(module.bias)
    mat = helper.grad_matrix(torch.float64)
    assert mat.shape == (helper.d_out, helper.d_in)
    expected = module.weight.grad.reshape(helper.d_out, -1)
    if module.bias is not None:
        expected = torch.cat([expected, module.bias.grad[:, None]], 1)
    assert_close(mat, expected)
    new = torch.randn_like(mat)
    helper.set_grad(new)
    assert_close(helper.grad_matrix(torch.float64), new)
