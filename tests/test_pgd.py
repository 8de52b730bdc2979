"""PGD (common.pgd; README 'Conventions'): the threat model's constraints, that the attack actually ascends,
the best-iterate / best-restart bookkeeping, and that the caller's model is left as it was."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import fit

EPS, ALPHA, STEPS = 8 / 255, 4 / 255, 10
SIZE = 8  # 8×8 images keep the attack cheap; nothing in pgd depends on the image size
pytestmark = pytest.mark.numerics  # .ci/run runs these under every CPU kernel set too


def teacher_data(n, seed):
    """Uniform images labelled by a fixed random linear teacher: many examples lie within ε of a
    decision boundary, so an attack has something to find."""
    x = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    w = torch.randn(10, 3 * SIZE * SIZE, generator=torch.Generator().manual_seed(123))
    return x, ((x.flatten(1) - 0.5) @ w.T).argmax(1)


class TinyNet(nn.Module):
    """Normalize → conv → BN → ReLU → linear: a small model with a BN layer and the normaliser."""

    def __init__(self):
        super().__init__()
        self.normalize = common.Normalize()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16 * SIZE * SIZE, 10)

    def forward(self, x):
        return self.linear(F.relu(self.bn(self.conv(self.normalize(x)))).flatten(1))


@pytest.fixture(scope="module")
def trained():
    """A TinyNet trained for 100 Adam steps on teacher data, in eval mode, and a held-out batch."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = teacher_data(1000, seed=1)
    fit(model, x, y, steps=100, batch_size=100)
    xt, yt = teacher_data(60, seed=2)
    assert ce(model, x[:500], y[:500]).mean() < 0.5, "the fixture model did not learn"
    return model, xt, yt


def ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def reference_pgd(model, x, y, eps, alpha, steps):
    """A plain PGD as Madry et al. 2018 define it (uniform start, sign steps, projections), returning the
    loss of every iterate, so the best and the last iterate can be compared with common.pgd."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    losses = []
    for t in range(steps + 1):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="none")
        losses.append(loss.detach())
        if t == steps:
            break
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return torch.stack(losses)  # (steps + 1) × n


@pytest.mark.parametrize("start,restarts", [("uniform", 1), ("uniform", 3), ("normal", 1), ("zero", 2)])
def test_delta_in_eps_ball_and_image_box(trained, start, restarts):
    model, x, y = trained
    x = x.clone()
    x[:, :, :4] = 0.0  # pixels at the box borders, where the [0, 1] clip binds
    x[:, :, -4:] = 1.0
    torch.manual_seed(0)
    delta, loss = common.pgd(model, x, y, EPS, ALPHA, STEPS, restarts=restarts, start=start)
    assert delta.shape == x.shape and loss.shape == y.shape
    assert delta.abs().max() <= EPS + 1e-6
    assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6
    assert delta.abs().max() > EPS / 2, "the attack did not move"


@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_a_tiny_or_zero_radius_bounds_the_start_too(trained, start):
    """The start is a candidate iterate: at ε = 0 nothing may move (TRADES' 0.001·N(0, I) start
    used to escape a ball smaller than its noise)."""
    model, x, y = trained
    for eps in (0.0, 1e-4):
        delta, _ = common.pgd(model, x, y, eps, ALPHA, 2, start=start)
        assert delta.abs().max() <= eps + 1e-6 * (eps > 0)  # (x + δ) − x rounds in fp32


def test_pgd_raises_the_loss(trained):
    """On a trained model PGD-10 raises the loss well above the clean loss and above its own
    random start (steps=0, same seed); and its per-example loss is that of the returned δ."""
    model, x, y = trained
    clean = ce(model, x, y)
    torch.manual_seed(1)
    _, start_loss = common.pgd(model, x, y, EPS, ALPHA, 0)
    torch.manual_seed(1)
    delta, adv = common.pgd(model, x, y, EPS, ALPHA, STEPS)
    assert adv.mean() > clean.mean() + 0.5, (adv.mean(), clean.mean())
    assert adv.mean() > start_loss.mean() + 0.5
    assert (adv >= start_loss - 1e-5).all()  # the random start is one of the iterates
    torch.testing.assert_close(adv, ce(model, x + delta, y), atol=1e-5, rtol=1e-5)


def test_best_iterate_matches_reference_and_beats_last(trained):
    """The returned loss is the per-example maximum over all iterates of a plain PGD (same
    seed, so the same random start), hence ≥ the last iterate's loss, and ≥ every shorter run."""
    model, x, y = trained
    torch.manual_seed(2)
    ref = reference_pgd(model, x, y, EPS, ALPHA, STEPS)
    torch.manual_seed(2)
    _, best = common.pgd(model, x, y, EPS, ALPHA, STEPS)
    torch.testing.assert_close(best, ref.max(0).values, atol=1e-5, rtol=1e-5)
    assert (best >= ref[-1] - 1e-5).all()
    assert (best > ref[-1] + 1e-3).any(), "no example where the best iterate is not the last: weak test data"
    for k in (0, 3, 7):
        torch.manual_seed(2)
        _, shorter = common.pgd(model, x, y, EPS, ALPHA, k)
        assert (best >= shorter - 1e-5).all()


def test_restarts_never_lower_the_loss(trained):
    """pgd draws all restarts' starts with one uniform_ over the repeated batch, so with the same
    seed restart 1 of an R-restart run is the 1-restart run: R restarts give ≥ per example.
    Exactly, R restarts = per-example max over a 1-restart run on the batch repeated R times."""
    model, x, y = trained
    torch.manual_seed(3)
    _, one = common.pgd(model, x, y, EPS, ALPHA, STEPS, restarts=1)
    torch.manual_seed(3)
    delta, three = common.pgd(model, x, y, EPS, ALPHA, STEPS, restarts=3)
    assert (three >= one - 1e-5).all()
    assert (three > one + 1e-4).any(), "restarts changed nothing"
    torch.manual_seed(3)
    _, flat = common.pgd(model, x.repeat(3, 1, 1, 1), y.repeat(3), EPS, ALPHA, STEPS, restarts=1)
    torch.testing.assert_close(three, flat.view(3, -1).max(0).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(three, ce(model, x + delta, y), atol=1e-5, rtol=1e-5)  # δ of the best restart


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_modes_restored_and_attack_runs_in_requested_mode(bn):
    torch.manual_seed(0)
    model = common.ResNet18(width=4)
    model.train()
    model.layer2.eval()          # mixed per-submodule modes must come back exactly
    model.layer3[1].bn1.train()
    model.bn1.eval()
    before = modes(model)
    seen = []
    hook = model.layer1[0].bn1.register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = teacher_data(4, seed=0)
    common.pgd(model, x, y, EPS, ALPHA, 2, bn=bn)
    hook.remove()
    assert seen == [bn == "train"] * 3  # 2 gradient steps + the final iterate
    assert modes(model) == before

    model.eval()
    model.layer4.train()
    before = modes(model)
    common.pgd(model, x, y, EPS, ALPHA, 1, bn=bn)
    assert modes(model) == before


def test_eval_mode_attack_leaves_bn_statistics_and_weights_untouched():
    torch.manual_seed(0)
    model = common.ResNet18(width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = teacher_data(4, seed=0)
    common.pgd(model, x, y, EPS, ALPHA, 3, bn="eval")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_parameter_gradients_untouched():
    """The attack differentiates w.r.t. δ only (autograd.grad): .grad stays None, or unchanged."""
    torch.manual_seed(0)
    model = common.ResNet18(width=4)
    x, y = teacher_data(4, seed=0)
    common.pgd(model, x, y, EPS, ALPHA, 2, restarts=2)
    assert all(p.grad is None for p in model.parameters())

    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    common.pgd(model, x, y, EPS, ALPHA, 2)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert not x.requires_grad


def test_weights_frozen_during_the_attack_and_restored_after():
    """Inside pgd no parameter requires grad (autograd records nothing for the weights); afterwards
    every flag is what the caller had, a parameter the caller froze stays frozen, and an error
    inside the attack restores the flags too."""
    torch.manual_seed(0)
    model = common.ResNet18(width=4)
    model.linear.bias.requires_grad_(False)  # the caller's own choice must survive
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(any(p.requires_grad for p in m.parameters())))
    x, y = teacher_data(4, seed=0)
    common.pgd(model, x, y, EPS, ALPHA, 2)
    assert seen == [False] * 3
    assert not model.linear.bias.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "linear.bias")

    def failing_loss(logits, y):
        raise ValueError("inside the attack")

    with pytest.raises(ValueError):
        common.pgd(model, x, y, EPS, ALPHA, 2, loss_fn=failing_loss)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "linear.bias")


def test_pgd_inside_no_grad_is_the_same_attack():
    """A caller under torch.no_grad() (an evaluation loop) gets the same δ and loss as one outside it."""
    model = common.ResNet18(width=4).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(10, (6,))
    torch.manual_seed(3)
    d_grad, l_grad = common.pgd(model, x, y, 8 / 255, 2 / 255, 3, restarts=2)
    torch.manual_seed(3)
    with torch.no_grad():
        d_nograd, l_nograd = common.pgd(model, x, y, 8 / 255, 2 / 255, 3, restarts=2)
        assert not torch.is_grad_enabled()  # the caller's grad mode is back
    assert d_grad.abs().max() > 1e-3
    assert torch.equal(d_grad, d_nograd) and torch.equal(l_grad, l_nograd)
