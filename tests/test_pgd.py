"""PGD (common.pgd; README 'Conventions'): the threat model's constraints, that the attack actually ascends,
the best-iterate / best-restart bookkeeping, and that the caller's model is left as it was."""
import copy

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


# The ℓ2 threat model (norm="l2": Rice et al.'s and AWP's attack) ---------------------------------------------------
L2_EPS, L2_ALPHA = 0.5, 0.1  # (128/255 and 15/255 on 32×32 CIFAR; these 8×8 images have 1/16 of the coordinates)


def rice_attack_pgd_l2(model, X, y, epsilon, alpha, attack_iters, restarts, early_stop=False):
    """Rice et al.'s `attack_pgd` (robust_overfitting, train_cifar.py) for norm 'l_2', written out again: per restart
    a Gaussian direction scaled to a U(0, 1)·ε radius and clamped to the box; `attack_iters` steps of α along
    g/(‖g‖+1e-10) of the batch-mean CE, each renormed to ε and clamped to the box, where with early_stop only
    the examples still classified correctly step; of the restarts, per example the last one whose final CE is
    ≥ the best so far. Returns (max_delta, the δ of every iterate of the last restart)."""
    max_loss, max_delta = torch.zeros(len(y), dtype=X.dtype), torch.zeros_like(X)
    for _ in range(restarts):
        delta = torch.zeros_like(X).normal_()
        n = delta.view(len(X), -1).norm(p=2, dim=1).view(-1, 1, 1, 1)
        r = torch.zeros_like(n).uniform_(0, 1)
        delta *= r / n * epsilon
        delta = torch.max(torch.min(delta, 1 - X), 0 - X)
        delta.requires_grad = True
        iterates = [delta.detach().clone()]
        for _ in range(attack_iters):
            output = model(X + delta)
            index = torch.where(output.max(1)[1] == y)[0] if early_stop else slice(None)
            if early_stop and len(index) == 0:
                break
            F.cross_entropy(output, y).backward()
            grad = delta.grad.detach()
            d, g, x = delta[index], grad[index], X[index]
            g_norm = g.view(len(g), -1).norm(dim=1).view(-1, 1, 1, 1)
            d = (d + g / (g_norm + 1e-10) * alpha).view(len(d), -1).renorm(p=2, dim=0, maxnorm=epsilon).view_as(d)
            d = torch.max(torch.min(d, 1 - x), 0 - x)
            delta.data[index] = d
            delta.grad.zero_()
            iterates.append(delta.detach().clone())
        all_loss = F.cross_entropy(model(X + delta), y, reduction="none")
        max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
        max_loss = torch.max(max_loss, all_loss)
    return max_delta, iterates


def recorded_deltas(model, x):
    """Hook that records δ = input − x of every forward of common.pgd (restarts = 1), one entry per iterate."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, inputs: seen.append((inputs[0] - x).detach().clone()))
    return seen, handle


def test_l2_reaches_the_closed_form_optimum_of_a_linear_model():
    """For a linear 2-class model the CE of class 0 grows with the margin z1 − z0 = (w1 − w0)·(x + δ) + c, so where
    the box does not bind its maximiser over ‖δ‖₂ ≤ ε is δ* = ε·u, u = (w1 − w0)/‖w1 − w0‖ (−ε·u for class 1).
    From a zero start two steps of ε/2 reach it; from the random start the part of δ orthogonal to u shrinks
    by ε/(ε + α) per step, below 1e-9 after 60 steps. (torch.renorm scales by ε/(‖·‖ + 1e-7): δ ends within 1e-7
    of the sphere, hence the 1e-6.) The returned δ is the first iterate whose CE, kept in fp32, is the optimum's;
    its distance to δ* is then of the order of the square root of fp32's resolution."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2)).double()
    x = 0.5 + 0.1 * torch.rand(6, 3, SIZE, SIZE, dtype=torch.float64)  # in [0.5, 0.6]; |δ*_i| ≤ ε·|u_i| < 0.4
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    w = model[1].weight.detach()
    u = ((w[1] - w[0]) / (w[1] - w[0]).norm()).view(3, SIZE, SIZE)
    optimum = torch.stack([L2_EPS * u if c == 0 else -L2_EPS * u for c in y])
    for start, steps in (("zero", 2), ("uniform", 60)):
        seen, handle = recorded_deltas(model, x)
        torch.manual_seed(1)
        delta, loss = common.pgd(model, x, y, L2_EPS, L2_EPS / 2, steps, start=start, norm="l2")
        handle.remove()
        assert (seen[-1] - optimum).flatten(1).norm(dim=1).max() < 1e-6, start
        assert (delta - optimum).flatten(1).norm(dim=1).max() < 1e-3, start
        torch.testing.assert_close(loss, F.cross_entropy(model(x + optimum), y, reduction="none").float())
    torch.manual_seed(1)
    delta, _ = common.pgd(model, x, y, L2_EPS, L2_EPS / 2, 0, norm="l2")
    assert (delta - optimum).flatten(1).norm(dim=1).min() > 0.1, "the random start alone is already the optimum"


@pytest.mark.parametrize("start,restarts,max_inputs", [("uniform", 1, None), ("uniform", 3, None), ("uniform", 3, 70),
                                                       ("normal", 1, None), ("zero", 2, 60)])
def test_l2_every_iterate_in_the_l2_ball_and_image_box(trained, start, restarts, max_inputs):
    """Every iterate the network sees (all steps, all restarts, chunked or not) and the returned δ: ‖δ‖₂ ≤ ε per
    example and x + δ in [0, 1], with pixels on the box borders, where the clamp binds. (1e-6: x + δ − x rounds
    each of the 192 coordinates by at most 6e-8 in fp32.)"""
    model, x, y = trained
    x = x.clone()
    x[:, :, :3] = 0.0
    x[:, :, -3:] = 1.0
    inputs = []
    handle = model.register_forward_pre_hook(lambda m, i: inputs.append(i[0].detach().clone()))
    torch.manual_seed(0)
    delta, _ = common.pgd(model, x, y, L2_EPS, L2_ALPHA, STEPS, restarts=restarts, start=start, norm="l2",
                          max_inputs=max_inputs)
    handle.remove()
    assert len(inputs) == (STEPS + 1) * (restarts if max_inputs else 1)
    norms = [delta.flatten(1).norm(dim=1)]
    for inp in inputs:
        assert inp.min() >= 0 and inp.max() <= 1
        norms.append((inp - x.repeat(len(inp) // len(x), 1, 1, 1)).flatten(1).norm(dim=1))
    assert max(n.max() for n in norms) <= L2_EPS + 1e-6
    assert ((x + delta).min() >= 0) and ((x + delta).max() <= 1)
    assert norms[0].min() > 0.9 * L2_EPS, "the attack did not reach the sphere"
    assert (delta.abs().max() > 2 * EPS), "an ℓ∞-sized attack, not ℓ2"


def double_trained(trained):
    model, x, y = trained
    return copy.deepcopy(model).double(), x.double(), y


def test_l2_equals_rice_et_al_attack_pgd_step_by_step(trained):
    """Float64, the same seed: Rice et al.'s ℓ2 attack_pgd (above, restarts = 1, no early stop: their training call)
    and common.pgd(norm="l2") visit the same iterates, from the same random start (the same randn and rand draws),
    step by step (no sign in an ℓ2 step: rounding differences stay at 1e-15). common.pgd gets the batch-mean CE as
    its summed loss (loss_fn = CE / n), as theirs, so g/(‖g‖ + 1e-10) is the same to the 1e-10. Their result is the
    last iterate; ours the best iterate, whose CE is the maximum of the CE of their iterates (a step of 0.6·ε, so
    that the best iterate is not always the last)."""
    model, x, y = double_trained(trained)
    alpha = 0.3
    torch.manual_seed(4)
    rice_delta, rice_iterates = rice_attack_pgd_l2(model, x, y, L2_EPS, alpha, STEPS, restarts=1)
    seen, handle = recorded_deltas(model, x)
    torch.manual_seed(4)
    delta, loss = common.pgd(model, x, y, L2_EPS, alpha, STEPS, norm="l2",
                             loss_fn=lambda logits, y: F.cross_entropy(logits, y, reduction="none") / len(y))
    handle.remove()
    assert len(seen) == len(rice_iterates) == STEPS + 1
    torch.testing.assert_close(torch.stack(seen), torch.stack(rice_iterates), atol=1e-12, rtol=0)
    torch.testing.assert_close(seen[-1], rice_delta, atol=1e-12, rtol=0)
    rice_ce = torch.stack([F.cross_entropy(model(x + d), y, reduction="none") for d in rice_iterates]).detach()
    torch.testing.assert_close(loss.double() * len(y), rice_ce.max(0).values, rtol=1e-6, atol=0)  # (fp32 loss)
    assert (rice_ce.argmax(0) < STEPS).any(), "the best iterate is always the last: the comparison shows nothing"
    assert (torch.stack(seen[1:]) - torch.stack(seen[:-1])).abs().max() > 1e-3, "no steps were taken"


def test_l2_equals_rice_et_al_attack_pgd_with_early_stop(trained):
    """Float64: with early_stop (their evaluation call) an example stops stepping at its first misclassified
    iterate τ and keeps it: their iterate t is ours at min(t, τ). The misclassification decisions are argmaxes,
    so the test first checks that no logit gap at any iterate is within 1e-9 of a tie (no rounding can flip one)."""
    model, x, y = double_trained(trained)
    torch.manual_seed(5)
    _, rice_iterates = rice_attack_pgd_l2(model, x, y, L2_EPS, L2_ALPHA, STEPS, restarts=1, early_stop=True)
    seen, handle = recorded_deltas(model, x)
    torch.manual_seed(5)
    common.pgd(model, x, y, L2_EPS, L2_ALPHA, STEPS, norm="l2",
               loss_fn=lambda logits, y: F.cross_entropy(logits, y, reduction="none") / len(y))
    handle.remove()
    with torch.no_grad():
        logits = torch.stack([model(x + d) for d in seen])  # (STEPS + 1) × n × classes
    top2 = logits.topk(2, dim=2).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-9
    wrong = logits.argmax(2) != y
    tau = torch.where(wrong.any(0), wrong.float().argmax(0), torch.tensor(STEPS))  # first misclassified iterate
    assert 0 < (tau < STEPS).sum() < len(y), "early stopping changes nothing or everything: weak test data"
    for t, rice in enumerate(rice_iterates):
        ours = torch.stack([seen[min(t, int(tau[i]))][i] for i in range(len(y))])
        torch.testing.assert_close(rice, ours, atol=1e-12, rtol=0)
