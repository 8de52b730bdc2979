"""train_misc.py: the invariants of each method's core, one step of each method against a hand
computation, and each method run in-process through main() on a tiny tree.

rotation     labels = the applied rot90; λ weights the rotation CE; the attacked part (--adv-fraction) is
             what the training forward sees; the head learns, is saved as 'aux' and restored on --resume
unlabeled    floor(f·B) pseudo-labelled images per batch (main passes f); trained on like labelled ones;
             pickles are read without running code (a malicious pickle is refused)
entropy-sgd  the outer step equals a hand computation (L, γ_t at t = outer steps taken, noise, η', wd)
pgd-tau      the training forward sees pgd_tau's δ at --tau; τ >= steps is plain PGD's last iterate
every step   label smoothing, label noise, clipping, EMA (τ read in main), the per-step schedule
"""
import copy
import inspect
import json
import math
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import common
import evaluate
import train_misc as tm
from conftest import TINY, run_ddp, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# rotation
# ---------------------------------------------------------------------------------------------
def test_rotate_is_rot90_by_k():
    x = torch.rand(12, 3, 5, 5)
    k = torch.arange(12) % 4
    out = tm.rotate(x, k)
    for i in range(12):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))
    assert not torch.equal(out[1], x[1])


def test_rotation_batch_label_is_the_rotation_applied_after_crop_and_flip():
    """With a one-image pool, rotating image i back by k_i must give one of the 162 crops/flips of
    that image, and rotating it back by any other multiple of 90° must not."""
    pool = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    x_rot, k = tm.rotation_batch(pool, 24, torch.Generator().manual_seed(0))
    padded = F.pad(pool[0].float() / 255, (4, 4, 4, 4))
    crops = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    candidates = torch.stack(crops + [c.flip(2) for c in crops])
    assert set(k.tolist()) == {0, 1, 2, 3}
    for i in range(len(k)):
        for q in range(4):
            back = torch.rot90(x_rot[i], -q, dims=(1, 2))
            is_crop = bool((back - candidates).abs().flatten(1).amax(1).min() < 1e-6)
            assert is_crop == (q == int(k[i])), (i, q, int(k[i]))


class _Recorder(tm.WithRotationHead):
    """Records the images of the training forward (the one called with n_labelled)."""

    def forward(self, x, n_labelled=None):
        if n_labelled is not None:
            self.trained_on = x.detach().clone()
        return super().forward(x, n_labelled)


def test_rotation_head_learns_is_not_perturbable_and_adv_fraction_is_respected():
    torch.manual_seed(0)
    args = tm.parse_args(["--method", "rotation", "--attack-steps", "2", "--adv-fraction", "0.5"])
    model = _Recorder(common.ResNet18(width=4))
    x, y = torch.rand(6, 3, 32, 32), torch.randint(10, (6,))
    x_rot, k = torch.rand(6, 3, 32, 32), torch.randint(4, (6,))
    loss, stats = tm.rotation_loss(model, model, x, y, x_rot, k, args)
    loss.backward()

    head = model.rotation_head
    assert (head.layers[0].in_features, head.layers[0].out_features, head.layers[-1].out_features) == (32, 16, 4)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    # loss = CE_class + λ·CE_rot with λ = 4 (both means over the batch)
    assert torch.isclose(loss, stats["loss"] / 6 + 4 * stats["rot_loss"] / 6, atol=1e-5)

    names = common.perturbable_params(model)
    assert names and not any("rotation_head" in n for n in names)
    assert set(names) == {f"net.{n}" for n in common.perturbable_params(model.net)}

    # --adv-fraction 0.5: the first 3 of each set are clean, the last 3 are moved inside the ε-ball
    seen = model.trained_on
    assert torch.equal(seen[:3], x[:3]) and torch.equal(seen[6:9], x_rot[:3])
    for part, orig in ((seen[3:6], x[3:6]), (seen[9:], x_rot[3:])):
        moved = (part - orig).abs().flatten(1).amax(1)
        assert (moved > 1e-4).all() and (moved <= 8 / 255 + 1e-6).all()


def test_rotation_head_is_the_papers_linear_relu_bn_linear_with_kaiming_init():
    """The paper's code: Linear d→d/2, ReLU, BatchNorm1d, Linear d/2→4; Kaiming-normal (fan_in, gain √2)
    weights and zero biases, as its other linear layers."""
    torch.manual_seed(0)
    head = tm.RotationHead(512)
    assert [type(m) for m in head.layers] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear]
    assert [(m.in_features, m.out_features) for m in (head.layers[0], head.layers[3])] == [(512, 256), (256, 4)]
    first, last = head.layers[0], head.layers[3]
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)  # PyTorch's default: 0.026
    assert last.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert not first.bias.any() and not last.bias.any()


def test_rotation_attack_loss_uses_each_head():
    logits = torch.randn(4, 14)
    target = torch.tensor([3, 7, 10 + 2, 10 + 0])
    expected = torch.stack([F.cross_entropy(logits[0, :10], target[0]), F.cross_entropy(logits[1, :10], target[1]),
                            F.cross_entropy(logits[2, 10:], torch.tensor(2)), F.cross_entropy(logits[3, 10:], torch.tensor(0))])
    assert torch.allclose(tm.rotation_attack_loss(logits, target), expected)


# ---------------------------------------------------------------------------------------------
# unlabeled
# ---------------------------------------------------------------------------------------------
def test_mixed_loader_fraction_shuffle_and_epoch_length():
    x = torch.zeros(60, 3, 32, 32, dtype=torch.uint8)          # labelled: black, classes 0..4
    y = torch.arange(60) % 5
    x_unl = torch.full((30, 3, 32, 32), 255, dtype=torch.uint8)  # pseudo-labelled: white, classes 5..9
    y_unl = 5 + torch.arange(30) % 5
    loader = tm.MixedLoader(x, y, x_unl, y_unl, 16, 0.7, torch.device("cpu"), seed=0)
    assert len(loader) == math.ceil(60 / 16) and loader.n_unlabeled == 11
    batches = list(loader)
    assert len(batches) == 4
    for xb, yb, is_unl in batches:
        assert abs(int(is_unl.sum()) - 0.7 * 16) <= 1
        assert torch.equal(is_unl, yb >= 5)                          # labels travel with their images
        assert torch.equal(is_unl, xb[:, 0, 16, 16] == 1.0)           # (the centre pixel survives any crop)
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32)
    assert any(not torch.equal(u, u.sort().values) for _, _, u in batches)  # shuffled together
    assert tm.MixedLoader(x, y, x_unl, y_unl, 128, 0.7, torch.device("cpu"), 0).n_unlabeled == 89  # paper code



@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.25, 5), (0.33, 6), (0.5, 10), (0.9, 18)])
def test_mixed_loader_has_floor_f_times_b_pseudo_labelled_images_per_batch(fraction, expected):
    x, y = torch.zeros(60, 3, 32, 32, dtype=torch.uint8), torch.arange(60) % 10
    x_unl, y_unl = torch.full((30, 3, 32, 32), 255, dtype=torch.uint8), torch.arange(30) % 10
    loader = tm.MixedLoader(x, y, x_unl, y_unl, 20, fraction, torch.device("cpu"), seed=0)
    counts = [(int(u.sum()), int((xb[:, 0, 16, 16] == 1.0).sum())) for xb, _, u in loader]
    assert len(counts) == 3 and counts == [(expected, expected)] * 3

def _write_unlabeled(path, n=7, drop=None, data=None):
    rng = np.random.default_rng(0)
    content = {"data": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) if data is None else data,
               "extrapolated_targets": np.arange(n) % 10}
    content.pop(drop, None)
    if str(path).endswith(".npz"):
        np.savez(path, **content)
    else:
        with open(path, "wb") as f:
            pickle.dump(content, f)
    return content


@pytest.mark.parametrize("name", ["pseudo.pickle", "pseudo.npz"])
def test_load_unlabeled_reads_pickle_and_npz(tmp_path, name):
    content = _write_unlabeled(tmp_path / name)
    x, y = tm.load_unlabeled(tmp_path / name, 10)
    assert x.dtype == torch.uint8 and x.shape == (7, 3, 32, 32)
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(content["data"]))
    assert y.dtype == torch.int64 and y.tolist() == list(range(7))


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": "extrapolated_targets"}, "extrapolated_targets"),
    ({"drop": "data"}, "'data'"),
    ({"data": np.zeros((7, 3, 32, 32), np.uint8)}, "N×32×32×3"),
    ({"data": np.zeros((7, 32, 32, 3), np.float32)}, "uint8"),
])
def test_load_unlabeled_errors(tmp_path, kwargs, message):
    _write_unlabeled(tmp_path / "bad.pickle", **kwargs)
    with pytest.raises(common.UsageError, match=message):
        tm.load_unlabeled(tmp_path / "bad.pickle", 10)


def test_unlabeled_file_without_targets_is_one_error_line(tiny_data, tmp_path):
    _write_unlabeled(tmp_path / "bad.pickle", drop="extrapolated_targets")
    out = tmp_path / "run"
    proc = run_script("train_misc.py", "--method", "unlabeled", "--unlabeled-data", tmp_path / "bad.pickle",
                      "--data-dir", tiny_data, "--out", out, "--device", "cpu", check=False, env=ONE_THREAD)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "extrapolated_targets" in lines[0]
    assert not out.exists()  # checked before a run folder is made


@pytest.mark.parametrize("protocol", [3, 4, 5])  # 5: pickle.HIGHEST_PROTOCOL, Python 3.14's default
def test_load_unlabeled_reads_every_python3_pickle_protocol(tmp_path, protocol):
    content = {"data": np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
               "extrapolated_targets": np.arange(5)}
    (tmp_path / "p.pickle").write_bytes(pickle.dumps(content, protocol=protocol))
    x, y = tm.load_unlabeled(tmp_path / "p.pickle", 10)
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(content["data"])) and y.tolist() == list(range(5))


class _Payload:
    """Unpickling this calls func(*args): how a crafted pickle runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious(kind, marker):
    payload = _Payload(os.system, f"touch {marker}") if kind == "os.system" else _Payload(open, str(marker), "w")
    if kind == "nested":  # the payload where an array should be, in an otherwise valid file
        return {"data": payload, "extrapolated_targets": np.arange(3)}
    return payload


@pytest.mark.parametrize("kind", ["os.system", "open", "nested"])
def test_malicious_pickle_is_refused_without_running_code(tiny_data, tmp_path, kind):
    # the file is really malicious: plain pickle.load runs it
    pickle.loads(pickle.dumps(_malicious(kind, tmp_path / "proof")))
    assert (tmp_path / "proof").exists()

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps(_malicious(kind, marker)))
    with pytest.raises(common.UsageError, match="not a readable pickle") as err:
        tm.load_unlabeled(evil, 10)
    assert "\n" not in str(err.value) and not marker.exists()
    out = tmp_path / "run"  # through main(): one error, nothing run, no run folder
    with pytest.raises(common.UsageError, match="--unlabeled-data"):
        tm.main(["--method", "unlabeled", "--unlabeled-data", str(evil), "--data-dir", str(tiny_data),
                 "--out", str(out), "--device", "cpu"])
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("key", ["data", "extrapolated_targets"])
def test_object_arrays_are_refused(tmp_path, key):
    content = {"data": np.zeros((3, 32, 32, 3), np.uint8), "extrapolated_targets": np.arange(3)}
    content[key] = content[key].astype(object)  # plain ints inside: ArrayUnpickler reads it, the check refuses
    (tmp_path / "obj.pickle").write_bytes(pickle.dumps(content))
    with pytest.raises(common.UsageError, match="arrays of Python objects"):
        tm.load_unlabeled(tmp_path / "obj.pickle", 10)


# ---------------------------------------------------------------------------------------------
# entropy-sgd
# ---------------------------------------------------------------------------------------------
A = torch.tensor([0.5, 2.0, -1.0, 3.0])
W0 = torch.tensor([1.0, -2.0, 0.5, 0.25])


def _quadratic(w):
    return lambda i: (0.5 * (A * w * w).sum(), {"calls": torch.tensor(1.0)})


@pytest.mark.numerics
def test_entropy_sgd_L1_closed_form_with_momentum():
    """L = 1, γ = 0, noise 0 on f(w) = ½ Σ a·w²: w' = w − η'(a + wd)w, μ = 0.75w + 0.25w', so the outer
    gradient is w − μ = 0.25·η'(a + wd)·w; SGD adds wd·w and momentum."""
    lr, mom, wd, eta = 0.1, 0.9, 0.01, 0.1
    w = nn.Parameter(W0.clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=mom, weight_decay=wd)
    sums = tm.entropy_sgd_step([w], opt, _quadratic(w), 1, 0.0, 0.0, eta, wd, [0.0])
    assert sums["calls"] == 1
    buf = 0.25 * eta * (A + wd) * W0 + wd * W0
    w1 = W0 - lr * buf
    assert torch.allclose(w.detach(), w1, atol=1e-7)
    tm.entropy_sgd_step([w], opt, _quadratic(w), 1, 0.0, 0.0, eta, wd, [0.0])
    buf = mom * buf + 0.25 * eta * (A + wd) * w1 + wd * w1  # momentum is applied (released code: 0)
    assert torch.allclose(w.detach(), w1 - lr * buf, atol=1e-7)


@pytest.mark.numerics
def test_entropy_sgd_L2_with_coupling_by_hand():
    lr, wd, eta, gamma = 0.05, 5e-4, 0.1, 0.3
    w = nn.Parameter(W0.clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=wd)
    tm.entropy_sgd_step([w], opt, _quadratic(w), 2, gamma, 0.0, eta, wd, [0.0])
    w1 = W0 - eta * (A * W0 + wd * W0)                          # coupling is 0 at w' = w_c
    w2 = w1 - eta * (A * w1 + wd * w1 - gamma * (W0 - w1))
    mu = 0.75 * (0.75 * W0 + 0.25 * w1) + 0.25 * w2
    assert torch.allclose(w.detach(), W0 - lr * (W0 - mu + wd * W0), atol=1e-7)


class _RecordingSGD(torch.optim.SGD):
    def step(self, closure=None):
        self.seen = [(p.detach().clone(), p.grad.clone()) for p in self.param_groups[0]["params"]]
        return super().step(closure)


def test_entropy_sgd_resets_weights_to_anchor_before_the_outer_step():
    torch.manual_seed(0)
    w = nn.Parameter(W0.clone())
    visited = []

    def inner(i):
        visited.append(w.detach().clone())
        return 0.5 * (A * w * w).sum(), {}

    opt = _RecordingSGD([w], lr=0.1, momentum=0.9)
    tm.entropy_sgd_step([w], opt, inner, 3, 1e-2, 1e-3, 0.1, 5e-4, [0.0])
    assert len(visited) == 3 and torch.equal(visited[0], W0)
    assert not torch.allclose(visited[2], W0)      # the inner loop did move the weights ...
    weights, grad = opt.seen[0]
    assert torch.equal(weights, W0)               # ... and the outer step starts from w_c
    assert not torch.equal(grad, torch.zeros_like(grad))


def test_scoped_gamma_grows_and_is_capped():
    assert tm.scoped_gamma(1e-4, 1e-3, 0, 0.1) == 1e-4
    assert math.isclose(tm.scoped_gamma(1e-4, 1e-3, 1000, 0.1), 1e-4 * 1.001 ** 1000)
    assert tm.scoped_gamma(1e-4, 1e-3, 10**7, 0.1) == 10.0  # 1/η', no float overflow
    assert tm.scoped_gamma(1e-4, 0.0, 10**7, 0.1) == 1e-4   # --esgd-scoping 0: the released code's constant γ


# ---------------------------------------------------------------------------------------------
# pgd-tau
# ---------------------------------------------------------------------------------------------
def _plain_pgd_last_iterate(model, x, y, eps, alpha, steps):
    """Textbook PGD that returns the last iterate (common.pgd returns the best-loss one)."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    with common.bn_mode(model, "eval"):
        for _ in range(steps):
            delta.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
            with torch.no_grad():
                delta = (delta + alpha * g.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0, 1) - x
    return delta


def test_pgd_tau_at_least_steps_is_plain_pgd_last_iterate():
    torch.manual_seed(0)
    model = common.ResNet18(width=4).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    delta, steps = tm.pgd_tau(model, x, y, 8 / 255, 0.007, 5, tau=5)
    torch.manual_seed(1)
    reference = _plain_pgd_last_iterate(model, x, y, 8 / 255, 0.007, 5)
    assert torch.allclose(delta, reference, atol=1e-7, rtol=0)
    assert steps.tolist() == [5] * 8
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # eval-mode BN


@pytest.mark.parametrize("tau, expected, expected_steps", [
    (0, [0.00, 0.01, 0.03, 0.05], [0, 1, 3, 7]),   # stop at the first misclassified iterate
    (1, [0.01, 0.02, 0.04, 0.05], [1, 2, 4, 7]),   # one step later
])
def test_pgd_tau_stops_where_a_linear_model_says(tau, expected, expected_steps):
    """Class-1 margin = Σ(x + δ) − 1.1 and the CE gradient sign is +1 everywhere, so from δ = 0 the
    iterates are δ_k = min(0.01k, 0.05) per pixel and the margin grows by 0.04 per step: examples with
    Σx = 1.2, 1.08, 1.0, 0.8 are first misclassified at k = 0, 1, 3 and never (last iterate)."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        model.bias.copy_(torch.tensor([0.0, -1.1]))
    x = torch.tensor([1.2, 1.08, 1.0, 0.8]).unsqueeze(1).repeat(1, 4) / 4
    y = torch.zeros(4, dtype=torch.long)
    delta, steps = tm.pgd_tau(model, x, y, 0.05, 0.01, 7, tau, start="zero")
    assert torch.allclose(delta, torch.tensor(expected).unsqueeze(1).expand(4, 4), atol=1e-6)
    assert steps.tolist() == expected_steps


# ---------------------------------------------------------------------------------------------
# one step of each method against a hand computation
# (the attack is spied on and the training forward recorded; the expected weights are computed
# from scratch on a copy of the model)
# ---------------------------------------------------------------------------------------------
# attacked, with train-mode BN; label smoothing, label noise, clipping: each changes the update
STEP_FLAGS = ["--epsilon", "0.05", "--attack-step", "0.02", "--attack-bn", "train", "--label-smoothing", "0.2",
              "--label-noise", "0.6", "--clip", "0.1"]
LR, EMA = 0.5, 0.75


def _args(method, *flags):
    unlabeled = ["--unlabeled-data", "pseudo.pickle"] if method == "unlabeled" else []
    return tm.parse_args(["--method", method, *unlabeled, *map(str, flags)])


class _Spy:
    """Wraps an attack (common.pgd, tm.pgd_tau) or a draw (tm.langevin_noise, label noise): records
    its arguments by name and what it returned; `active` while it runs."""

    def __init__(self, real):
        self.real, self.calls, self.active = real, [], False

    def __call__(self, *a, **kw):
        self.active = True
        try:
            out = self.real(*a, **kw)
        finally:
            self.active = False
        bound = inspect.signature(self.real).bind(*a, **kw)
        bound.apply_defaults()
        self.calls.append({**{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in bound.arguments.items()},
                           "out": out})
        return out


def _shifted_labels(y, p, num_classes=common.NUM_CLASSES):
    """Stands in for common.noisy_labels (tested in test_regularisers.py): a deterministic change of every
    label, so that the hand computation knows the labels the step must train on."""
    return (y + 1) % num_classes


def _spies(monkeypatch):
    spies = {"pgd": _Spy(common.pgd), "pgd_tau": _Spy(tm.pgd_tau), "noise": _Spy(_shifted_labels),
             "langevin": _Spy(tm.langevin_noise)}
    monkeypatch.setattr(common, "pgd", spies["pgd"])
    monkeypatch.setattr(tm, "pgd_tau", spies["pgd_tau"])
    monkeypatch.setattr(common, "noisy_labels", spies["noise"])
    monkeypatch.setattr(tm, "langevin_noise", spies["langevin"])
    return spies


def _record_training_forwards(model, spies):
    """The inputs (and n_labelled) of every forward of `model` outside an attack."""
    seen = []

    def hook(module, args, kwargs):
        if not (spies["pgd"].active or spies["pgd_tau"].active):
            seen.append((args[0].detach().clone(), kwargs.get("n_labelled")))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def _smoothed_ce(logits, y, ls):
    """CE with target (1 − ls)·onehot + ls/K, written out."""
    logp = logits.float().log_softmax(1)
    return -((1 - ls) * logp.gather(1, y[:, None]).squeeze(1) + ls * logp.mean(1)).mean()


def _clipped(net, c):
    """Every weight inside what --clip c allows (BN scale in [1 − c, 1 + c])."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if any(p.abs().max() > c + 1e-7 for p in m.parameters(recurse=False)):
                return False
        elif isinstance(m, nn.BatchNorm2d):
            if (m.weight - 1).abs().max() > c + 1e-7 or m.bias.abs().max() > c + 1e-7:
                return False
    return True


def _float_params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _assert_close(actual, expected, what, atol=1e-5):
    for k in expected:
        err = (actual[k] - expected[k]).abs().max().item()
        assert err <= atol, f"{what}: {k} off by {err:.3g}"


def _setup(method, *flags, seed=0):
    """A width-4 ResNet-18 (with the rotation head for rotation), SGD(LR) without momentum or decay, a
    constant schedule, and an EMA (decay EMA) whose weights differ from the model's."""
    torch.manual_seed(seed)
    args = _args(method, *STEP_FLAGS, *flags)
    net = common.ResNet18(width=4)
    model = (tm.WithRotationHead(net) if method == "rotation" else net).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(EMA), use_buffers=True)
    ema.update_parameters(net)  # n_averaged = 1: the next update averages
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return args, model, opt, sched, ema


def _expected_sgd(before, loss_of, lr, clip):
    """`before` (a copy of the model before the step) after one SGD step on loss_of(before), the
    classifier then clipped (a rotation head is not)."""
    params = [p for p in before.parameters()]
    grads = torch.autograd.grad(loss_of(before), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)
        common.clip_weights(tm.classifier(before), clip)
    return before


def _check_update_and_ema(model, expected, ema, ema_before):
    """The weights are the hand-computed ones; the EMA is EMA·old + (1 − EMA)·new over the classifier."""
    _assert_close(_float_params(model), _float_params(expected), "weights")
    net = _float_params(tm.classifier(model))
    _assert_close(_float_params(ema.module), {k: EMA * ema_before[k] + (1 - EMA) * net[k] for k in net}, "EMA")
    assert set(_float_params(ema.module)) == set(net)  # the EMA holds the classifier only


def _check_attack_call(call, args, x, y):
    assert torch.equal(call["x"], x) and torch.equal(call["y"], y)
    assert (call["eps"], call["alpha"], call["steps"], call["bn"]) == (0.05, 0.02, args.attack_steps, "train")
    assert call["out"][0].abs().max() > 1e-3  # a real perturbation


@pytest.mark.numerics
@pytest.mark.parametrize("steps", [2, 0])
def test_rotation_step_by_hand(monkeypatch, steps):
    """loss = CE_class(smoothed, noisy y) + λ·CE_rot on one forward of [x | x_rot] where, of each set, the
    first (1 − f)·B are clean and the rest are the attack's output (--attack-steps 0: all clean)."""
    lam, n, n_clean = 3.0, 6, 3
    args, model, opt, sched, ema = _setup("rotation", "--attack-steps", steps, "--rot-weight", lam,
                                          "--adv-fraction", 0.5)
    x, y = torch.rand(n, 3, 32, 32), torch.randint(10, (n,))
    x_rot, k = torch.rand(n, 3, 32, 32), torch.arange(n) % 4
    spies = _spies(monkeypatch)
    before, ema_before = copy.deepcopy(model), _float_params(ema.module)
    head_before = _float_params(model.rotation_head)
    seen, hook = _record_training_forwards(model, spies)
    stats = tm.rotation_train_step(model, model, opt, sched, ema, (x, y, x_rot, k), args)
    hook.remove()

    expected_input = torch.cat([x, x_rot])
    if steps:
        (call,) = spies["pgd"].calls
        attacked = torch.cat([x[n_clean:], x_rot[n_clean:]])
        _check_attack_call(call, args, attacked, torch.cat([y[n_clean:], k[n_clean:] + 10]))
        assert call["loss_fn"] is tm.rotation_attack_loss
        delta = call["out"][0]
        expected_input[n_clean:n] += delta[:n - n_clean]
        expected_input[n + n_clean:] += delta[n - n_clean:]
    else:
        assert spies["pgd"].calls == []
    assert len(seen) == 1 and seen[0][1] == n and torch.equal(seen[0][0], expected_input)
    (noise,) = spies["noise"].calls
    assert torch.equal(noise["y"], y) and noise["p"] == 0.6

    def loss_of(m):
        class_logits, rot_logits = m(expected_input, n_labelled=n)
        return _smoothed_ce(class_logits, noise["out"], 0.2) + lam * F.cross_entropy(rot_logits, k)

    expected = _expected_sgd(before, loss_of, LR, 0.1)
    _check_update_and_ema(model, expected, ema, ema_before)
    head = _float_params(model.rotation_head)
    assert all(not torch.equal(v, head_before[k]) for k, v in head.items())  # every head tensor learned
    assert any(v.abs().max() > 0.1 for v in head.values())  # the head is not clipped
    assert sched.last_epoch == 1 and _clipped(model.net, 0.1)
    assert float(stats["n"]) == n and float(stats["rot_err"]) <= n


@pytest.mark.numerics
@pytest.mark.parametrize("steps", [2, 0])
def test_unlabeled_step_by_hand(monkeypatch, steps):
    """AT on the whole mixed batch: the pseudo-labelled images are attacked and trained on with their
    pseudo-labels like labelled ones; *_labelled sums count the CIFAR part only."""
    args, model, opt, sched, ema = _setup("unlabeled", "--attack-steps", steps)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    is_unlabeled = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    spies = _spies(monkeypatch)
    before, ema_before = copy.deepcopy(model), _float_params(ema.module)
    seen, hook = _record_training_forwards(model, spies)
    stats = tm.unlabeled_train_step(model, model, opt, sched, ema, (x, y, is_unlabeled), args)
    hook.remove()

    expected_input = x.clone()
    if steps:
        (call,) = spies["pgd"].calls
        _check_attack_call(call, args, x, y)
        expected_input += call["out"][0]
    else:
        assert spies["pgd"].calls == []
    assert len(seen) == 1 and torch.equal(seen[0][0], expected_input)
    (noise,) = spies["noise"].calls
    assert torch.equal(noise["y"], y) and noise["p"] == 0.6
    expected = _expected_sgd(before, lambda m: _smoothed_ce(m(expected_input), noise["out"], 0.2), LR, 0.1)
    _check_update_and_ema(model, expected, ema, ema_before)
    assert sched.last_epoch == 1 and _clipped(model, 0.1)
    assert float(stats["n_labelled"]) == 3 and float(stats["n"]) == 8


@pytest.mark.numerics
@pytest.mark.parametrize("steps", [3, 0])
def test_pgd_tau_step_by_hand(monkeypatch, steps):
    """The training forward sees x + pgd_tau's δ, with --tau passed through; the update is AT's."""
    args, model, opt, sched, ema = _setup("pgd-tau", "--attack-steps", steps, "--tau", 1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    spies = _spies(monkeypatch)
    before, ema_before = copy.deepcopy(model), _float_params(ema.module)
    seen, hook = _record_training_forwards(model, spies)
    stats = tm.pgd_tau_train_step(model, model, opt, sched, ema, (x, y), args)
    hook.remove()

    expected_input, taken = x.clone(), torch.zeros(8)
    assert spies["pgd"].calls == []
    if steps:
        (call,) = spies["pgd_tau"].calls
        _check_attack_call(call, args, x, y)
        assert call["tau"] == 1 and call["start"] == "uniform"
        delta, taken = call["out"]
        expected_input += delta
    else:
        assert spies["pgd_tau"].calls == []
    assert len(seen) == 1 and torch.equal(seen[0][0], expected_input)
    assert float(stats["attack_steps"]) == float(taken.sum())
    (noise,) = spies["noise"].calls
    assert torch.equal(noise["y"], y) and noise["p"] == 0.6
    expected = _expected_sgd(before, lambda m: _smoothed_ce(m(expected_input), noise["out"], 0.2), LR, 0.1)
    _check_update_and_ema(model, expected, ema, ema_before)
    assert sched.last_epoch == 1 and _clipped(model, 0.1)


@pytest.mark.numerics
def test_autoaugment_step_by_hand(monkeypatch):
    """--method autoaugment trains as train_at.py does: the training forward sees x + PGD's δ, on the
    noisy labels with smoothing, then SGD, clipping, EMA and one schedule step."""
    args, model, opt, sched, ema = _setup("autoaugment", "--attack-steps", 2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    spies = _spies(monkeypatch)
    before, ema_before = copy.deepcopy(model), _float_params(ema.module)
    seen, hook = _record_training_forwards(model, spies)
    tm.autoaugment_train_step(model, model, opt, sched, ema, (x, y), args)
    hook.remove()

    (call,) = spies["pgd"].calls
    _check_attack_call(call, args, x, y)
    x_adv = x + call["out"][0]
    assert len(seen) == 1 and torch.equal(seen[0][0], x_adv)
    (noise,) = spies["noise"].calls
    assert torch.equal(noise["y"], y) and noise["p"] == 0.6
    expected = _expected_sgd(before, lambda m: _smoothed_ce(m(x_adv), noise["out"], 0.2), LR, 0.1)
    _check_update_and_ema(model, expected, ema, ema_before)
    assert sched.last_epoch == 1 and _clipped(model, 0.1)


def test_autoaugment_loader_augments_every_image_once_per_epoch_and_replays_an_epoch():
    """An epoch visits every image once (labels a permutation), the images are augmented (not the raw
    ones), and in workers setting .epoch replays that epoch's draws (what
    resume does; with --workers 0 the draws come from the process's RNG, which checkpoints restore)."""
    n = 40
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(30, 226, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10
    loader = tm.AutoAugmentLoader(x, y, 10, torch.device("cpu"), seed=0, workers=1)
    assert len(loader) == 4
    first = list(loader)
    assert sorted(torch.cat([yb for _, yb in first]).tolist()) == sorted(y.tolist())
    xb = torch.cat([b for b, _ in first])
    assert xb.dtype == torch.float32 and xb.shape == (n, 3, 32, 32) and 0 <= xb.min() and xb.max() <= 1
    raw = x.float() / 255
    assert all(not any(torch.equal(img, r) for r in raw) for img in xb)  # no image comes through unchanged
    names = [type(s).__name__ for s in loader.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "AutoAugment", "ConvertImageDtype", "Cutout"], names
    assert loader.transform.transforms[2].policy.name == "CIFAR10" and loader.transform.transforms[0].padding == [4] * 4
    second = list(loader)  # epoch 1 draws differently
    assert not torch.equal(torch.cat([b for b, _ in second]), xb)
    loader.epoch = 0
    replay = list(loader)
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(replay, first))


def test_cutout_fills_one_square_with_the_mean_colour_clipped_at_the_border():
    """Cutout(16): one 16×16 hole centred at a uniformly drawn pixel, clipped at the border, filled with
    the CIFAR-10 mean colour (the paper's code)."""
    random.seed(0)
    areas = set()
    mean = torch.tensor(common.CIFAR_MEAN).view(3, 1, 1)
    for _ in range(200):
        out = tm.Cutout(16)(torch.ones(3, 32, 32))
        hole = out != 1
        assert torch.equal(hole[0], hole[1]) and torch.equal(hole[0], hole[2])
        assert torch.equal(out[hole], mean.expand(3, 32, 32)[hole])
        rows, cols = hole[0].any(1).nonzero().flatten(), hole[0].any(0).nonzero().flatten()
        assert hole[0].sum() == len(rows) * len(cols)  # a rectangle
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16  # clipped at most to half of 16
        areas.add(int(hole[0].sum()))
    assert 256 in areas and min(areas) < 256  # whole holes inside, clipped ones at the border


def test_autoaugment_pads_and_fills_with_the_mean_colour():
    """The paper's code fills the crop padding, AutoAugment's empty areas and Cutout with the CIFAR-10 mean
    colour: as uint8, round(255·mean) = (125, 123, 114). Every crop of a white image shows the fill exactly
    where it is shifted out of the image."""
    loader = tm.AutoAugmentLoader(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                                  1, torch.device("cpu"), seed=0, workers=0)
    crop, _, autoaugment, _, cutout = loader.transform.transforms
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8).view(3, 1, 1)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    padded = 0
    for _ in range(20):
        out = crop(white)
        border = (out != 255).any(0)
        assert torch.equal(out[:, border], fill.expand(3, 32, 32)[:, border])
        padded += int(border.sum())
    assert padded > 0
    assert list(autoaugment.fill) == [125, 123, 114]
    assert torch.allclose(cutout.fill.flatten(), torch.tensor(common.CIFAR_MEAN))


def test_pgd_tau_changes_delta():
    """What τ does to the δ the step trains on (so a τ that is passed but ignored shows)."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        model.bias.copy_(torch.tensor([0.0, -1.1]))
    x, y = torch.full((1, 4), 1.08 / 4), torch.zeros(1, dtype=torch.long)
    deltas = [tm.pgd_tau(model, x, y, 0.05, 0.01, 7, tau, start="zero")[0] for tau in (0, 1, 2)]
    assert not torch.equal(deltas[0], deltas[1]) and not torch.equal(deltas[1], deltas[2])


@pytest.mark.numerics
def test_entropy_sgd_step_by_hand(monkeypatch):
    """One outer step on L = 2 attacked batches: the Langevin iterates w' with coupling γ_t at t = the
    outer steps taken (sched.last_epoch = 3), noise, η' and wd (towards c = 1 for the BN scales γ, 0
    elsewhere, inner and outer); μ; then make_optimizer's SGD with momentum and wd on w_c − μ from w_c,
    clipping, EMA, one schedule step."""
    L, gamma, scoping, t, noise, eta, wd, lr = 2, 0.5, 0.4, 3, 0.01, 0.5, 0.05, 0.1
    args, model, _, sched, ema = _setup("entropy-sgd", "--attack-steps", 2, "--L", L, "--esgd-gamma", gamma,
                                        "--esgd-scoping", scoping, "--esgd-noise", noise, "--esgd-inner-lr", eta,
                                        "--wd", wd, "--lr", lr, "--lr-schedule", "const")
    opt, sched = common.make_optimizer(model, args, steps_per_epoch=1)  # SGD, momentum 0.9
    sched.last_epoch = t  # three outer steps taken
    batches = [(torch.rand(6, 3, 32, 32), torch.randint(10, (6,))) for _ in range(L)]
    spies = _spies(monkeypatch)
    before, ema_before = copy.deepcopy(model), _float_params(ema.module)
    seen, hook = _record_training_forwards(model, spies)
    stats = tm.entropy_sgd_train_step(model, model, opt, sched, ema, batches, args)
    hook.remove()

    gamma_t = gamma * (1 + scoping) ** t
    assert len(spies["pgd"].calls) == len(seen) == len(spies["noise"].calls) == len(spies["langevin"].calls) == L
    params = list(before.parameters())
    scales = {id(m.weight) for m in before.modules() if isinstance(m, nn.BatchNorm2d)}
    centres = [1.0 if id(p) in scales else 0.0 for p in params]
    w_c = [p.detach().clone() for p in params]
    mu = [w.clone() for w in w_c]
    for i, (x, y) in enumerate(batches):
        call = spies["pgd"].calls[i]
        _check_attack_call(call, args, x, y)
        x_adv = x + call["out"][0]
        assert torch.equal(seen[i][0], x_adv)
        labels = spies["noise"].calls[i]
        assert torch.equal(labels["y"], y) and labels["p"] == 0.6
        grads = torch.autograd.grad(_smoothed_ce(before(x_adv), labels["out"], 0.2), params)
        z = spies["langevin"].calls[i]["out"]
        with torch.no_grad():
            for p, w, m, g, zp, c in zip(params, w_c, mu, grads, z, centres):
                p -= eta * (g + wd * (p - c) - gamma_t * (w - p) + noise / math.sqrt(0.5 * eta) * zp)
                m.mul_(0.75).add_(0.25 * p)
    with torch.no_grad():
        for p, w, m, c in zip(params, w_c, mu, centres):
            p.copy_(w - lr * ((w - m) + wd * (w - c)))  # the first SGD step: momentum buffer = gradient
        common.clip_weights(before, 0.1)
    _check_update_and_ema(model, before, ema, ema_before)
    assert sched.last_epoch == t + 1 and _clipped(model, 0.1)
    assert math.isclose(float(stats["esgd_gamma"]), gamma_t * 2 * 6, rel_tol=1e-6) and float(stats["n"]) == 12


# ---------------------------------------------------------------------------------------------
# each method through main(), in-process on the tiny tree: the flags main() reads reach the step
# ---------------------------------------------------------------------------------------------
MAIN_FLAGS = ["--width", "4", "--batch-size", "20", "--train-subset", "40", "--epochs", "1", "--n-log", "10",
              "--n-early-stop", "10", "--es-restarts", "1", "--attack-steps", "1", "--device", "cpu"]
METHOD_FLAGS = {"rotation": [], "unlabeled": ["--unlabeled-fraction", "0.25"],
                "entropy-sgd": ["--L", "2", "--esgd-scoping", "0.5"], "pgd-tau": ["--tau", "1"],
                "autoaugment": ["--workers", "0"]}


def _run_main(monkeypatch, method, argv):
    """train_misc.main(argv) with the method's step wrapped; per step: the batch, the schedule's count
    and lr, the classifier's and the EMA's weights before and after, and what the step returned."""
    real, steps, real_metrics = tm.TRAIN_STEPS[method], [], common.epoch_metrics

    def spy(model, attack_model, opt, sched, ema, batch, args):
        net = tm.classifier(model)
        rec = {"batch": batch, "t": sched.last_epoch, "lr": opt.param_groups[0]["lr"], "w": _float_params(net),
               "net": net, "ema_module": ema.module,
               "clipped": _clipped(net, args.clip), "ema": _float_params(ema.module), "n_averaged": int(ema.n_averaged)}
        rec["out"] = real(model, attack_model, opt, sched, ema, batch, args)
        head = getattr(model, "rotation_head", nn.Module())
        rec.update(t_after=sched.last_epoch, w_after=_float_params(net), clipped_after=_clipped(net, args.clip),
                   ema_after=_float_params(ema.module), head=_float_params(head))
        steps.append(rec)
        return rec["out"]

    def epoch_metrics(model, *a, **kw):
        out = real_metrics(model, *a, **kw)
        steps[-1].setdefault("evaluated", {})[a[4]] = model  # prefix → the model it measured
        return out

    monkeypatch.setitem(tm.TRAIN_STEPS, method, spy)
    monkeypatch.setattr(common, "epoch_metrics", epoch_metrics)
    tm.main([str(a) for a in argv])
    return steps


@pytest.mark.parametrize("method", tm.METHODS)
def test_main_wires_each_method(monkeypatch, tiny_data, tmp_path, method):
    """One epoch (2 steps) of each method with --ema 0.9 --clip 0.05 and the cosine schedule: main()'s
    batches are the method's, every step clips, averages with τ = 0.9 (ema ← τ·ema + (1 − τ)·w) and steps
    the schedule once; the run folder is what evaluate.py and plots.py read."""
    out = tmp_path / "run"
    flags = [*MAIN_FLAGS, "--data-dir", tiny_data, "--method", method, *METHOD_FLAGS[method], "--ema", 0.9,
             "--clip", 0.05, "--lr", 0.1, "--lr-schedule", "cosine", "--out", out]
    if method == "unlabeled":
        _write_unlabeled(tmp_path / "pseudo.pickle", n=30)
        flags += ["--unlabeled-data", tmp_path / "pseudo.pickle"]
    steps = _run_main(monkeypatch, method, flags)

    assert len(steps) == 2
    for s, rec in enumerate(steps):
        assert (rec["t"], rec["t_after"], rec["n_averaged"]) == (s, s + 1, s)  # one schedule step per step
        assert math.isclose(rec["lr"], 0.1 * 0.5 * (1 + math.cos(math.pi * s / 2)), rel_tol=1e-9)
        assert rec["clipped"] and rec["clipped_after"]  # clipped at the start and after every step
        assert any(not torch.equal(v, rec["w"][k]) for k, v in rec["w_after"].items())
        new = rec["w_after"]
        expected = new if s == 0 else {k: 0.9 * rec["ema"][k] + 0.1 * new[k] for k in new}  # the first copies
        _assert_close(rec["ema_after"], expected, f"EMA after step {s}")
        batch = rec["batch"]
        if method == "rotation":
            x, y, x_rot, k = batch
            assert len(x) == len(y) == len(x_rot) == len(k) == 20 and set(k.tolist()) <= {0, 1, 2, 3}
            assert any(v.abs().max() > 0.05 for v in rec["head"].values())  # the head is not clipped
        elif method == "unlabeled":
            x, y, is_unlabeled = batch
            assert len(y) == 20 and int(is_unlabeled.sum()) == 5  # floor(0.25·20)
        elif method == "entropy-sgd":
            assert len(batch) == 2 and all(len(y) == 20 for _, y in batch)  # --L 2 fresh batches
            assert math.isclose(float(rec["out"]["esgd_gamma"] / rec["out"]["n"]), 1e-4 * 1.5 ** s, rel_tol=1e-6)
        elif method == "pgd-tau":
            assert 0 <= float(rec["out"]["attack_steps"]) <= 20
        else:  # AutoAugmentLoader's float images of the global batch
            x, y = batch
            assert x.dtype == torch.float32 and x.shape == (20, 3, 32, 32) and 0 <= x.min() and x.max() <= 1

    # the test metrics measure the trained classifier, early stopping the EMA model (--ema)
    assert steps[-1]["evaluated"]["es_"] is steps[-1]["ema_module"]
    assert steps[-1]["evaluated"]["test_"] is steps[-1]["net"]

    (m,) = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isclose(m["lr"], 0.1, rel_tol=1e-12)  # the lr of the epoch's first step (after it: 0)
    keys = {"rotation": ["train_rot_loss", "train_rot_err"], "unlabeled": ["train_loss_labelled", "train_err_labelled"],
            "entropy-sgd": ["train_esgd_gamma"], "pgd-tau": ["train_attack_steps"], "autoaugment": []}[method]
    for k in ["train_loss", "train_err", "test_rloss", "test_rerr", "es_rerr", *keys]:
        assert math.isfinite(m[k]), (k, m)
    if method == "entropy-sgd":  # the epoch's mean γ_t over outer steps t = 0, 1
        assert math.isclose(m["train_esgd_gamma"], 1e-4 * (1 + 1.5) / 2, rel_tol=1e-6)
    assert json.loads((out / "args.json").read_text())["method"] == method
    model, ckpt = evaluate.model_from_checkpoint(out / "ckpt_last.pt", "cpu")  # evaluate.py's loader
    assert isinstance(model, common.ResNet18) and ckpt["args"]["width"] == 4
    assert not any("rotation" in k for k in ckpt["model"]) and set(ckpt["ema"]) == set(ckpt["model"])
    assert ("aux" in ckpt) == (method == "rotation")
    if method == "rotation":
        assert set(ckpt["aux"]) == set(tm.RotationHead(32).state_dict())


def test_rotation_resume_restores_the_head_bit_for_bit(tiny_data, tmp_path):
    """2 epochs straight == 1 epoch, then --resume from its snapshot: weights, head ('aux'), EMA, optimiser
    and metrics bit for bit (a head left at its initialisation would change epoch 2)."""
    flags = [*MAIN_FLAGS, "--data-dir", tiny_data, "--method", "rotation", "--epochs", 2, "--es-every", 1,
             "--ema", 0.9]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tm.main([str(a) for a in [*flags, "--out", straight]])
    shutil.copytree(straight, resumed)
    shutil.copy(resumed / "ckpt_epoch001.pt", resumed / "ckpt_last.pt")
    tm.main([str(a) for a in [*flags, "--out", resumed, "--resume"]])

    a, b = (evaluate.load_checkpoint(d / "ckpt_last.pt") for d in (straight, resumed))
    first = evaluate.load_checkpoint(straight / "ckpt_epoch001.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert set(a["aux"]) == set(tm.RotationHead(32).state_dict())
    assert all(not torch.equal(v, first["aux"][k]) for k, v in a["aux"].items() if v.is_floating_point())
    for part in ("model", "aux", "ema"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part}: {differ[:5]}"
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}
    assert [strip(m) for m in a["history"]] == [strip(m) for m in b["history"]]


def test_entropy_sgd_ddp_replicas_stay_identical(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the outer gradient w_c − μ is not averaged by DDP, so the
    Langevin noise must be the same on every rank; rank 1 ends bit-identical to rank 0's checkpoint."""
    out = tmp_path / "ddp"
    _, other = run_ddp("train_misc.py", tmp_path, "--method", "entropy-sgd", "--L", 2, "--data-dir", tiny_data,
                       *TINY, "--epochs", 1, "--out", out)
    ckpt = evaluate.load_checkpoint(out / "ckpt_last.pt")["model"]
    differ = [k for k in ckpt if not torch.equal(ckpt[k], other[k])]
    assert not differ, f"ranks ended with different {differ[:5]}"


def test_langevin_noise_is_standard_normal_in_one_process():
    params = [torch.zeros(3, 4), torch.zeros(5)]
    torch.manual_seed(0)
    z = tm.langevin_noise(params)
    torch.manual_seed(0)
    assert all(torch.equal(a, torch.randn_like(p)) for a, p in zip(z, params))
