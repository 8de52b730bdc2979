"""train_misc.py: the invariants of each method's core, and every method end to end on a tiny tree.

rotation     labels = the applied rot90; the head learns; it is never perturbable; `model` loads alone
unlabeled    the requested share of pseudo-labelled images per batch; pickle/.npz read; clear errors
entropy-sgd  the outer step equals a hand computation on a quadratic; weights are reset to w_c
pgd-tau      τ >= steps is plain PGD's last iterate; τ = 0/1 stop where a linear toy model says
"""
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
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
    x, y = tm.load_unlabeled(tmp_path / name)
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
        tm.load_unlabeled(tmp_path / "bad.pickle")


def test_unlabeled_file_without_targets_is_one_error_line(tmp_path):
    _write_unlabeled(tmp_path / "bad.pickle", drop="extrapolated_targets")
    out = tmp_path / "run"
    proc = run_script("train_misc.py", "--method", "unlabeled", "--unlabeled-data", tmp_path / "bad.pickle",
                      "--out", out, "--device", "cpu", check=False, env=ONE_THREAD)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "extrapolated_targets" in lines[0]
    assert not out.exists()  # checked before a run folder is made


# ---------------------------------------------------------------------------------------------
# entropy-sgd
# ---------------------------------------------------------------------------------------------
A = torch.tensor([0.5, 2.0, -1.0, 3.0])
W0 = torch.tensor([1.0, -2.0, 0.5, 0.25])


def _quadratic(w):
    return lambda i: (0.5 * (A * w * w).sum(), {"calls": torch.tensor(1.0)})


def test_entropy_sgd_L1_closed_form_with_momentum():
    """L = 1, γ = 0, noise 0 on f(w) = ½ Σ a·w²: w' = w − η'(a + wd)w, μ = 0.75w + 0.25w', so the outer
    gradient is w − μ = 0.25·η'(a + wd)·w; SGD adds wd·w and momentum."""
    lr, mom, wd, eta = 0.1, 0.9, 0.01, 0.1
    w = nn.Parameter(W0.clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=mom, weight_decay=wd)
    sums = tm.entropy_sgd_step([w], opt, _quadratic(w), 1, 0.0, 0.0, eta, wd)
    assert sums["calls"] == 1
    buf = 0.25 * eta * (A + wd) * W0 + wd * W0
    w1 = W0 - lr * buf
    assert torch.allclose(w.detach(), w1, atol=1e-7)
    tm.entropy_sgd_step([w], opt, _quadratic(w), 1, 0.0, 0.0, eta, wd)
    buf = mom * buf + 0.25 * eta * (A + wd) * w1 + wd * w1  # momentum is applied (released code: 0)
    assert torch.allclose(w.detach(), w1 - lr * buf, atol=1e-7)


def test_entropy_sgd_L2_with_coupling_by_hand():
    lr, wd, eta, gamma = 0.05, 5e-4, 0.1, 0.3
    w = nn.Parameter(W0.clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=wd)
    tm.entropy_sgd_step([w], opt, _quadratic(w), 2, gamma, 0.0, eta, wd)
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
    tm.entropy_sgd_step([w], opt, inner, 3, 1e-2, 1e-3, 0.1, 5e-4)
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
# end to end on the tiny tree
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, extra, keys", [
    ("rotation", ["--epochs", "2", "--es-every", "1"], ["train_rot_loss", "train_rot_err"]),
    ("unlabeled", ["--unlabeled-fraction", "0.5"], ["train_loss_labelled", "train_err_labelled"]),
    ("entropy-sgd", ["--L", "2"], ["esgd_gamma"]),
    ("pgd-tau", ["--tau", "0"], ["train_attack_steps"]),
])
def test_end_to_end(tiny_data, tmp_path, method, extra, keys):
    out = tmp_path / "run"
    if method == "unlabeled":  # a pseudo-labelled file: 60 generated images
        _write_unlabeled(tmp_path / "pseudo.pickle", n=60)
        extra = extra + ["--unlabeled-data", tmp_path / "pseudo.pickle"]
    flags = [*TINY, "--data-dir", tiny_data, "--train-subset", "100", "--epochs", "1", "--method", method, *extra]
    run_script("train_misc.py", *flags, "--out", out, env=ONE_THREAD)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        for k in ["train_loss", "train_err", "test_rloss", "test_rerr", "es_rerr", *keys]:
            assert math.isfinite(m[k]), (k, m)
    assert json.loads((out / "args.json").read_text())["method"] == method
    model, ckpt = common.model_from_checkpoint(out / "ckpt_last.pt", "cpu")  # evaluate.py's loader
    assert isinstance(model, common.ResNet18) and ckpt["args"]["width"] == 8
    assert not any("rotation" in k for k in ckpt["model"])
    if method == "pgd-tau":
        assert 0 <= lines[0]["train_attack_steps"] <= 7
    if method == "entropy-sgd":  # γ_t after the last of 2 outer steps (t = 1)
        assert math.isclose(lines[0]["esgd_gamma"], 1e-4 * 1.001)
    if method == "rotation":
        assert set(ckpt["aux"]) == set(tm.RotationHead(64).state_dict())
        # resume from the epoch-1 snapshot reproduces epoch 2 exactly (head restored from 'aux')
        resumed = tmp_path / "resumed"
        shutil.copytree(out, resumed)
        shutil.copy(resumed / "ckpt_epoch001.pt", resumed / "ckpt_last.pt")
        run_script("train_misc.py", *flags, "--out", resumed, "--resume", env=ONE_THREAD)
        again = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
        strip = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}
        assert [strip(m) for m in again] == [strip(m) for m in lines]


def test_entropy_sgd_ddp_replicas_stay_identical(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the outer gradient w_c − μ is not averaged by DDP, so the
    Langevin noise must be the same on every rank; rank 1 ends bit-identical to rank 0's checkpoint."""
    out = tmp_path / "ddp"
    _, other = run_ddp("train_misc.py", tmp_path, "--method", "entropy-sgd", "--L", 2, "--data-dir", tiny_data,
                       *TINY, "--epochs", 1, "--out", out)
    ckpt = common.load_checkpoint(out / "ckpt_last.pt")["model"]
    differ = [k for k in ckpt if not torch.equal(ckpt[k], other[k])]
    assert not differ, f"ranks ended with different {differ[:5]}"


def test_langevin_noise_is_standard_normal_in_one_process():
    params = [torch.zeros(3, 4), torch.zeros(5)]
    torch.manual_seed(0)
    z = tm.langevin_noise(params)
    torch.manual_seed(0)
    assert all(torch.equal(a, torch.randn_like(p)) for a, p in zip(z, params))
