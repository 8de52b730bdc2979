"""The Table 1 regulariser rows of train_at.py (paper Table 1) against hand computations: weight
clipping, label noise, label smoothing and every learning-rate schedule (the weight EMA: tests/test_wiring.py)."""
import argparse
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import train_at


def train_args(**overrides):
    """train_at.py's defaults, as its parser gives them."""
    args = train_at.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


# ---------------------------------------------------------------------------------------------
# Weight clipping
# ---------------------------------------------------------------------------------------------
def test_clip_weights_bounds_hold_after_an_optimiser_step():
    torch.manual_seed(0)
    model = common.ResNet18(width=4)
    w = 0.01
    common.clip_weights(model, w)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # a large step: most weights leave the box
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any((m.weight - 1).abs().max() > w for m in bns), "the step must violate the bounds first"
    common.clip_weights(model, w)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            for p in m.parameters(recurse=False):
                assert p.abs().max() <= w, name
        elif isinstance(m, nn.BatchNorm2d):  # γ around 1 (the paper's scale 1 + γ), β around 0
            assert (m.weight - 1).abs().max() <= w + 1e-7 and m.bias.abs().max() <= w, name
    assert model.linear.bias.abs().max().item() == pytest.approx(w)  # clipped, not zeroed
    assert torch.equal(model.normalize.std, torch.tensor(common.CIFAR_STD).view(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------
# Label noise and label smoothing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_noisy_labels_change_rate(p):
    """Each label is redrawn uniformly w.p. p, so it actually changes w.p. p·(K−1)/K, and the
    new labels are uniform over the other classes."""
    torch.manual_seed(0)
    n, k = 200_000, common.NUM_CLASSES
    y = torch.arange(n) % k
    noisy = common.noisy_labels(y, p, k)
    changed = noisy != y
    assert noisy.dtype == y.dtype and noisy.min() >= 0 and noisy.max() < k
    assert changed.float().mean().item() == pytest.approx(p * (k - 1) / k, abs=0.005)
    if p > 0:  # for true class 0 the replacement is any of 1..9 equally often
        counts = torch.bincount(noisy[changed & (y == 0)], minlength=k).float()
        assert counts[0] == 0
        assert (counts[1:] / counts[1:].sum() - 1 / (k - 1)).abs().max() < 0.01


def test_label_noise_in_training_loss_uses_noisy_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(4000, 10), torch.zeros(4000, dtype=torch.long)
    clean = train_at.training_loss(logits, y, train_args())
    noisy = train_at.training_loss(logits, y, train_args(label_noise=1.0))
    torch.testing.assert_close(clean, F.cross_entropy(logits, y))
    # with p = 1 every target is uniform: the loss is ≈ the mean CE over all classes
    expected = -F.log_softmax(logits, 1).mean()
    assert noisy.item() == pytest.approx(expected.item(), abs=0.05)


@pytest.mark.numerics
@pytest.mark.parametrize("tau", [0.1, 0.3])
def test_label_smoothing_equals_hand_written_target(tau):
    """CE against (1−τ)·onehot + τ/K (a distribution: sums to 1), as training_loss computes it."""
    torch.manual_seed(0)
    k = common.NUM_CLASSES
    logits, y = torch.randn(16, k) * 3, torch.randint(0, k, (16,))
    target = (1 - tau) * F.one_hot(y, k).float() + tau / k
    torch.testing.assert_close(target.sum(1), torch.ones(16))
    by_hand = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, y, label_smoothing=tau), by_hand)
    torch.testing.assert_close(train_at.training_loss(logits, y, train_args(label_smoothing=tau)), by_hand)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules (stepped per batch): 150 epochs of one step, so step = epoch
# ---------------------------------------------------------------------------------------------
def lrs_at(schedule, steps, optimizer="sgd", lr=0.05):
    args = optim_args(schedule, optimizer, lr)
    model = nn.Linear(2, 2)
    opt, sched = common.make_optimizer(model, args, steps_per_epoch=1)
    out = {}
    for s in range(max(steps) + 1):
        if s in steps:
            out[s] = opt.param_groups[0]["lr"]  # the lr that optimiser step s uses
        opt.step()
        sched.step()
    return out, opt


def optim_args(schedule="multistep", optimizer="sgd", lr=0.05, wd=5e-4, arch="resnet18", bn_decay="auto"):
    return argparse.Namespace(optimizer=optimizer, lr=lr, momentum=0.9, nesterov=False, wd=wd, epochs=150,
                              lr_schedule=schedule, cyclic_peak=0.2, cyclic_momentum=0.8, arch=arch, bn_decay=bn_decay)


STEPS = [0, 1, 59, 60, 89, 90, 119, 120, 139, 140, 144, 145, 149, 150]


@pytest.mark.parametrize("schedule,expected", [
    ("multistep", lambda s: 0.05 * 0.1 ** ((s >= 60) + (s >= 90) + (s >= 120))),
    ("late", lambda s: 0.05 * 0.1 ** ((s >= 140) + (s >= 145))),
    ("cyclic", lambda s: 0.2 * (1 - abs(s - 75) / 75)),
    ("cosine", lambda s: 0.05 * 0.5 * (1 + math.cos(math.pi * s / 150))),
    ("const", lambda s: 0.05),
])
def test_lr_schedules(schedule, expected):
    lrs, opt = lrs_at(schedule, STEPS + [75])
    for s, lr in lrs.items():
        assert lr == pytest.approx(expected(s), rel=1e-9, abs=1e-12), (schedule, s, lr)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_schedule_landmarks():
    """The numbers the paper states: multistep 0.05 → 0.005 → 0.0005 → 0.00005 at epochs 60/90/120
    of 150; cyclic 0 → 0.2 → 0; cosine ends at 0."""
    multi, _ = lrs_at("multistep", [59, 60, 90, 120])
    assert [round(v, 10) for v in multi.values()] == [0.05, 0.005, 0.0005, 0.00005]
    cyc, _ = lrs_at("cyclic", [0, 75, 150])
    assert cyc[0] == 0 and cyc[75] == pytest.approx(0.2) and cyc[150] == pytest.approx(0, abs=1e-12)
    cos, _ = lrs_at("cosine", [0, 150])
    assert cos[0] == pytest.approx(0.05) and cos[150] == pytest.approx(0, abs=1e-12)


def test_adam_optimizer():
    lrs, opt = lrs_at("multistep", [0, 60], optimizer="adam", lr=0.1)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    assert lrs[0] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.01)


def momenta_of_steps(opt, sched, steps):
    """The momentum each of `steps` optimiser steps used (read after the step: the pre-step hook sets it)."""
    model_params = [p for g in opt.param_groups for p in g["params"]]
    out = []
    for _ in range(steps):
        for p in model_params:
            p.grad = torch.ones_like(p)
        opt.step()
        out.append(opt.param_groups[0]["momentum"])
        sched.step()
    return out


def test_cyclic_schedule_cycles_sgd_momentum_inversely_to_the_lr_and_resumes():
    """--lr-schedule cyclic: step s uses momentum 0.9 − (0.9 − 0.8)·lr_s/0.2, the momentum cycling of
    PyTorch's CyclicLR (base_momentum 0.8, max_momentum 0.9) in the paper's code; it continues from a
    checkpoint (optimiser and schedule state dicts) where it left off. Other schedules keep 0.9."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    opt, sched = common.make_optimizer(model, optim_args("cyclic"), steps_per_epoch=1)
    momenta = momenta_of_steps(opt, sched, 100)
    for s in (0, 1, 30, 75, 99):
        lr = 0.2 * (1 - abs(s - 75) / 75)
        assert momenta[s] == pytest.approx(0.9 - 0.1 * lr / 0.2, abs=1e-12), s
    assert momenta[75] == pytest.approx(0.8) and momenta[0] == pytest.approx(0.9)

    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    rest = momenta_of_steps(opt, sched, 20)
    resumed = nn.Linear(2, 2)
    resumed.load_state_dict(state["model"])
    opt2, sched2 = common.make_optimizer(resumed, optim_args("cyclic"), steps_per_epoch=1)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert momenta_of_steps(opt2, sched2, 20) == rest
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))

    for schedule in ("multistep", "cosine"):
        opt, sched = common.make_optimizer(nn.Linear(2, 2), optim_args(schedule), steps_per_epoch=1)
        assert momenta_of_steps(opt, sched, 80) == [0.9] * 80


def test_cyclic_momentum_above_momentum_is_one_error_line():
    args = optim_args("cyclic")
    args.cyclic_momentum = 0.95
    with pytest.raises(common.UsageError, match="--cyclic-momentum"):
        common.make_optimizer(nn.Linear(2, 2), args, steps_per_epoch=1)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_pulls_bn_scales_to_one_and_weights_to_zero(optimizer):
    """One step with a zero loss gradient: the conv weights and biases move towards 0, the BN scales γ
    towards 1 (the paper's re-parameterised BN scale 1 + γ' with γ' decayed to 0) and the BN shifts
    towards 0. SGD: p − lr·d with d = wd·(p − c), c = 1 for γ, else 0; Adam's first step: p − lr·d/(|d| + 1e-8)."""
    torch.manual_seed(0)
    lr, wd = 0.1, 0.01
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.copy_(torch.tensor([0.5, 1.5, 0.9, 1.2][:len(bn.weight)]))
            bn.bias.uniform_(-0.5, 0.5)
    scales = {id(model[1].weight), id(model[4].weight)}
    before = [p.detach().clone() for p in model.parameters()]
    opt, _ = common.make_optimizer(model, optim_args("const", optimizer, lr, wd), steps_per_epoch=1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, p0 in zip(model.parameters(), before):
        centre = 1.0 if id(p) in scales else 0.0
        d = wd * (p0 - centre)
        expected = p0 - lr * (d if optimizer == "sgd" else d / (d.abs() + 1e-8))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
        assert ((p - p0) * (p0 - centre) < 0).all()  # every entry moved towards its centre


@pytest.mark.parametrize("arch,bn_decay,centre", [("resnet18", "auto", 1.0), ("wrn-10-1", "auto", 0.0),
                                                  ("preact-resnet18", "auto", 0.0), ("resnet18", "to-zero", 0.0),
                                                  ("wrn-10-1", "to-one", 1.0)])
def test_bn_decay_target_follows_the_architecture_or_the_flag(arch, bn_decay, centre):
    """--bn-decay auto: the paper's ResNet-18 decays BN scales towards 1 (its re-parameterised BN); PreAct ResNet
    and WideResNets towards 0, as the standard BN of their public code; the flag overrides both."""
    lr, wd = 0.1, 0.01
    model = common.build_model({"arch": arch, "act": "relu", "width": 4})
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight.fill_(0.5)
    opt, _ = common.make_optimizer(model, optim_args("const", "sgd", lr, wd, arch, bn_decay), steps_per_epoch=1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(bn.weight.detach(), torch.full_like(bn.weight, 0.5 - lr * wd * (0.5 - centre)))
