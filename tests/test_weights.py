"""Per-layer weight helpers (paper Eq. 3-4; README 'Conventions'): which tensors are 'layers', and the relative
per-layer ball ‖ν_l‖ ≤ ξ‖w_l‖ that flatness and AWP perturb in."""
import pytest
import torch
import torch.nn as nn

import common
import flatness


@pytest.fixture
def model():
    """A width-4 ResNet-18 whose head bias is not the initial zero (a trained model's is not; a zero
    layer has a zero relative ball)."""
    torch.manual_seed(0)
    net = common.ResNet18(width=4)
    with torch.no_grad():
        net.linear.bias.normal_(0, 0.1)
    return net


def test_resnet_layers_are_conv_and_linear_tensors(model):
    params = common.perturbable_params(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # stem + 16 block convs + 3 projection shortcuts
    assert set(params) == {f"{n}.weight" for n in convs} | {"linear.weight", "linear.bias"}
    assert not any("bn" in k or "shortcut.1" in k or "normalize" in k for k in params)
    named = dict(model.named_parameters())
    assert all(p is named[k] for k, p in params.items()), "must be the model's own parameters"
    assert all(p.requires_grad for p in params.values())


def test_batchnorm_excluded_by_type_not_name():
    """A BN layer named like a conv and a conv named like a BN: the module type decides."""
    net = nn.Sequential()
    net.add_module("normalize", common.Normalize())
    net.add_module("conv_bn", nn.BatchNorm2d(3))
    net.add_module("bn", nn.Conv2d(3, 4, 3))
    net.add_module("gn", nn.GroupNorm(2, 4))
    net.add_module("ln", nn.LayerNorm(4))
    assert set(common.perturbable_params(net)) == {"bn.weight", "bn.bias"}


def test_auxiliary_head_excluded(model):
    model.rotation_head = nn.Linear(32, 4)
    model.rotation_head.auxiliary = True
    model.aux_block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.Linear(3, 3)))
    model.aux_block.auxiliary = True  # flags every module below it
    model.extra = nn.Linear(3, 3)     # not flagged: a layer like any other
    keys = set(common.perturbable_params(model))
    assert not any(k.startswith(("rotation_head", "aux_block")) for k in keys)
    assert {"extra.weight", "extra.bias", "linear.bias"} <= keys


def test_weights_only_keeps_dim_above_one():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert set(common.perturbable_params(net)) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    only = common.perturbable_params(net, weights_only=True)
    assert set(only) == {"0.weight", "3.weight"}
    assert all(p.dim() > 1 for p in only.values())


def test_layer_norms(model):
    params = common.perturbable_params(model)
    norms = flatness.layer_norms(params)
    for k, p in params.items():
        assert torch.allclose(norms[k], torch.sqrt((p.detach() ** 2).sum()))
        assert not norms[k].requires_grad


def test_project_relative_onto_the_relative_ball(model):
    weights = common.perturbable_params(model)
    xi = 0.01
    g = torch.Generator().manual_seed(0)
    scale = {k: s for k, s in zip(weights, torch.linspace(0.001, 0.05, len(weights)))}  # some inside, some out
    nu = {k: torch.randn(w.shape, generator=g) * scale[k] for k, w in weights.items()}
    out = flatness.project_relative(nu, weights, xi)
    inside = outside = 0
    for k, w in weights.items():
        radius = xi * w.detach().norm()
        if nu[k].norm() <= radius:  # unchanged, bit for bit
            assert torch.equal(out[k], nu[k])
            inside += 1
        else:  # scaled onto the sphere, direction kept
            torch.testing.assert_close(out[k].norm(), radius, rtol=1e-5, atol=0)
            cos = (out[k] * nu[k]).sum() / (out[k].norm() * nu[k].norm())
            assert cos > 1 - 1e-5
            outside += 1
        assert out[k].norm() <= radius * (1 + 1e-5)
    assert inside and outside, "the test needs both cases"


def test_relative_random_radius(model):
    weights = common.perturbable_params(model)
    before = {k: w.detach().clone() for k, w in weights.items()}
    xi = 0.5
    nu = flatness.relative_random(weights, xi, torch.Generator().manual_seed(0))
    assert set(nu) == set(weights)
    for k, w in weights.items():
        assert nu[k].shape == w.shape and not nu[k].requires_grad
        torch.testing.assert_close(nu[k].norm(), xi * w.detach().norm(), rtol=1e-5, atol=0)

    inner = flatness.relative_random(weights, xi, torch.Generator().manual_seed(0), on_sphere=False)
    ratios = torch.stack([inner[k].norm() / (xi * w.detach().norm()) for k, w in weights.items()])
    assert (ratios <= 1 + 1e-5).all()
    assert ratios.min() < 0.9 and ratios.std() > 0.05, "on_sphere=False must draw the radius too"

    again = flatness.relative_random(weights, xi, torch.Generator().manual_seed(0))
    assert all(torch.equal(nu[k], again[k]) for k in nu), "a seeded generator must reproduce ν"
    other = flatness.relative_random(weights, xi, torch.Generator().manual_seed(1))
    assert not torch.equal(nu["conv1.weight"], other["conv1.weight"])
    assert all(torch.equal(w, before[k]) for k, w in weights.items()), "drawing ν must not move w"


def test_relative_random_directions_are_isotropic():
    """g/‖g‖ with g ~ N(0, I): over many draws the mean direction is ≈ 0 and every coordinate
    has variance 1/d (a non-centred or non-Gaussian draw fails this)."""
    w = {"w": torch.ones(4, 5)}
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([flatness.relative_random(w, 1.0, g)["w"].flatten() / w["w"].norm() for _ in range(4000)])
    assert draws.mean(0).abs().max() < 0.03
    torch.testing.assert_close(draws.pow(2).mean(0), torch.full((20,), 1 / 20), atol=0.01, rtol=0)
