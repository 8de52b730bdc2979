"""The Table 1 regulariser rows of train_at.py (paper Table 1) against hand computations: weight
clipping, label noise, label smoothing and every learning-rate schedule (the weight EMA: tests/test_wiring.py)."""
import argparse
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
    noisy = common.noisy_labels(y, p)
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
    args = argparse.Namespace(optimizer=optimizer, lr=lr, momentum=0.9, nesterov=False, wd=5e-4,
                              epochs=150, lr_schedule=schedule, cyclic_peak=0.2)
    model = nn.Linear(2, 2)
    opt, sched = common.make_optimizer(model, args, steps_per_epoch=1)
    out = {}
    for s in range(max(steps) + 1):
        if s in steps:
            out[s] = opt.param_groups[0]["lr"]  # the lr that optimiser step s uses
        opt.step()
        sched.step()
    return out, opt


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
