"""flatness.py (paper §3.3, Eq. 3-5): where ν lives (‖ν_l‖ = ξ‖w_l‖ on the sphere, ≤ ξ‖w_l‖ after the
joint attack, only conv/linear tensors), that every measure leaves the model bit-identical, the
limits ξ = 0 and ξ growing, agreement with a plain independent implementation of Eq. 3, the
BN-compensated rescaling (logits, flatness, Hessian ∝ 1/α²), the power iteration against an exact
Hessian, and the command line (both modes, --epochs resume, landscape, hessian, errors)."""
import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, fit, run_script, separable_data

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import evaluate  # noqa: E402
import flatness  # noqa: E402

EPS, ALPHA = 8 / 255, 0.007
SIZE = 8  # 8×8 images: a width-8 ResNet-18 (global pooling) runs them 16× cheaper than 32×32


@pytest.fixture(scope="module")
def trained():
    """A width-8 ResNet-18 trained for 40 Adam steps (eval mode) and 40 held-out images."""
    torch.manual_seed(0)
    model = common.ResNet18(width=8)
    x, y = separable_data(400, seed=1, size=SIZE)
    fit(model, x, y, steps=40, batch_size=64)
    xt, yt = separable_data(40, seed=2, size=SIZE)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() >= 0.7, "the fixture model did not learn"
    return model, xt, yt


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "the measure changed the model"
    assert all(p.grad is None for p in model.parameters()), "the measure left parameter gradients"


def assert_layers_only(model, nu):
    """ν has exactly the conv/linear tensors; nothing of a BN or the normaliser (by module type)."""
    assert set(nu) == set(common.perturbable_params(model))
    for mname, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm2d, common.Normalize)):
            assert not any(k.startswith(mname + ".") for k in nu), mname


# ---------------------------------------------------------------------------------------------
# Where ν lives, and that the model is never touched
# ---------------------------------------------------------------------------------------------
def test_average_case_nu_on_the_sphere_and_model_untouched(trained):
    model, x, y = trained
    before, seen = snapshot(model), []
    weights = common.perturbable_params(model)
    flatness.average_case_draws(model, x, y, xi=0.3, samples=2, steps=2, on_sample=seen.append)
    assert len(seen) == 2
    for nu in seen:
        assert_layers_only(model, nu)
        for k, w in weights.items():  # Eq. 3: exactly on the per-layer sphere
            torch.testing.assert_close(nu[k].norm(), 0.3 * w.detach().norm(), rtol=1e-5, atol=0)
    assert not torch.equal(seen[0]["conv1.weight"], seen[1]["conv1.weight"])
    assert_unchanged(model, before)


@pytest.mark.parametrize("per_batch", [False, True])
def test_worst_case_iterates_inside_both_balls_and_model_untouched(trained, per_batch):
    """After the joint ascent every ν_l is inside ‖ν_l‖ ≤ ξ‖w_l‖ (on the sphere, in practice: the
    step is 13× the radius) and δ inside the ε-ball and the image box. A model in train mode keeps
    its mode and its BN statistics (the attack runs in eval mode)."""
    model, x, y = trained
    model.train()
    before, seen = snapshot(model), []
    xi = 0.00075
    losses, _ = flatness.worst_case_restarts(model, x, y, xi, restarts=1, passes=2, batch_size=16, per_batch=per_batch,
                                    on_restart=lambda nus, delta: seen.append((nus, delta)))
    assert model.training and model.bn1.training
    model.eval()
    assert_unchanged(model, before)
    nus, delta = seen[0]
    assert len(nus) == (3 if per_batch else 1)  # 40 images in batches of 16
    weights = common.perturbable_params(model)
    for nu in nus:
        assert_layers_only(model, nu)
        ratios = torch.stack([nu[k].norm() / (xi * w.detach().norm()) for k, w in weights.items()])
        assert (ratios <= 1 + 1e-5).all() and (ratios > 0.99).all()
    if per_batch:
        assert not torch.equal(nus[0]["linear.weight"], nus[1]["linear.weight"])
    assert delta.abs().max() <= EPS + 1e-6 and delta.abs().max() > EPS / 2
    assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6
    assert torch.isfinite(losses).all()


def test_weight_clipped_models_stay_in_their_box(trained, monkeypatch):
    """For a --clip model (every conv/linear entry in [−c, c]) both measures keep w + ν in the box:
    the average case clamps each draw, the worst case clamps before every projection onto the ball,
    whose iterates stay inside it."""
    model, x, y = trained
    clipped = copy.deepcopy(model)
    c = 0.0625  # exact in fp32
    common.clip_weights(clipped, c)
    weights = flatness.frozen_weights(clipped)
    assert max(w.abs().max().item() for w in weights.values()) == c  # many entries sit on the box
    perturbed = []
    monkeypatch.setattr(flatness, "Perturbed", lambda m, params: _Recorded(m, params, perturbed))
    flatness.average_case_draws(clipped, x, y, xi=0.5, samples=2, steps=1, box=c)
    assert len(perturbed) == 2
    for params in perturbed:
        assert max(p.abs().max().item() for p in params.values()) <= c
        assert not torch.equal(params["conv1.weight"], weights["conv1.weight"])  # ν still moved the weights

    xi, seen = 0.05, []
    flatness.worst_case_restarts(clipped, x, y, xi, restarts=1, passes=2, batch_size=16, box=c,
                        on_restart=lambda nus, delta: seen.append(nus))
    for nu in seen[0]:
        assert max((weights[k] + v).abs().max().item() for k, v in nu.items()) <= c + 1e-7
        assert all(v.norm() <= xi * weights[k].norm() * (1 + 1e-5) for k, v in nu.items())
    free = []
    flatness.worst_case_restarts(clipped, x, y, xi, restarts=1, passes=2, batch_size=16,
                        on_restart=lambda nus, delta: free.append(nus))
    assert max((weights[k] + v).abs().max().item() for k, v in free[0][0].items()) > c  # without the box it leaves


class _Recorded(flatness.Perturbed):
    def __init__(self, model, params, record):
        super().__init__(model, params)
        record.append(params)


def test_landscape_and_hessian_leave_the_model_untouched(trained):
    model, x, y = trained
    before = snapshot(model)
    args = common.threat_defaults(flatness.parse_args(["unused.pt", "--mode", "landscape", "--directions", "1",
                                                       "--points", "3", "--landscape-steps", "1",
                                                       "--adversarial-passes", "1"]))
    s, curves = flatness.landscape(model, x[:10], y[:10], args)
    assert s == [-1.0, 0.0, 1.0]
    assert all(len(curves[k]["robust"]) == 1 and len(curves[k]["robust"][0]) == 3 for k in curves)
    flatness.hessian_top_eigenvalue(model, x[:10], y[:10], iters=2)
    flatness.rescale(model, 2.0)
    assert_unchanged(model, before)


def test_direction_normalisations():
    w = {"a": torch.randn(4, 3, 3, 3), "b": torch.randn(10)}
    d = {"a": torch.randn(4, 3, 3, 3), "b": torch.randn(10)}
    l2 = flatness.normalise_direction(d, w, "l2", 1.0)  # Eq. 2: ‖d_l‖ = ‖w_l‖
    mx = flatness.normalise_direction(d, w, "max-abs", 0.01)  # released code: max|d_l| = 0.01·max|w_l|
    for k in w:
        torch.testing.assert_close(l2[k].norm(), w[k].norm())
        torch.testing.assert_close(mx[k].abs().max(), 0.01 * w[k].abs().max())
        assert torch.allclose(l2[k] / l2[k].norm(), d[k] / d[k].norm(), atol=1e-6)  # direction kept


# ---------------------------------------------------------------------------------------------
# Limits and orderings
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref(trained):
    """The reference RLoss, PGD-10 × 4 restarts (cut down from 20 × 10 for speed)."""
    model, x, y = trained
    return flatness.reference(model, x, y, steps=10, restarts=4)[0]


def last_iterate_pgd(model, x, y, steps, seed):
    """A plain PGD returning the last iterate's CE (what the joint attack does at ξ = 0)."""
    torch.manual_seed(seed)
    delta = torch.empty_like(x).uniform_(-EPS, EPS)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():
        return F.cross_entropy(model(x + delta), y)


def test_xi_zero(trained, ref):
    """ξ = 0: ν = 0, so the average case is a 1-restart PGD (≤ the 4-restart reference up to noise)
    and the worst case is a plain last-iterate PGD on the inputs (same start: equal)."""
    model, x, y = trained
    losses, _ = flatness.average_case_draws(model, x, y, xi=0.0, samples=2, steps=10)
    assert losses.mean() - ref <= 0.02 * ref
    worst, _ = flatness.worst_case_restarts(model, x, y, xi=0.0, restarts=1, passes=10, seed=3)
    torch.testing.assert_close(worst[0], last_iterate_pgd(model, x, y, 10, seed=3), rtol=1e-4, atol=1e-5)
    assert abs(worst[0] - ref) <= 0.1 * ref  # the final iterate of one restart is close to the best of 4


def test_flatness_grows_with_xi_and_worst_exceeds_average(trained, ref):
    """Same seed, so ν(ξ) = ξ·(the same directions): the RLoss grows along each ray. The joint
    attack (at the paper's 20 passes) beats both random draws and the unperturbed reference."""
    model, x, y = trained
    avg = {xi: flatness.average_case_draws(model, x, y, xi=xi, samples=2, steps=10)[0].mean().item() - ref
           for xi in (0.1, 0.5, 1.0)}
    assert avg[0.1] < avg[0.5] < avg[1.0], avg
    xi = 0.02
    average = flatness.average_case_draws(model, x, y, xi=xi, samples=2, steps=10)[0].mean().item() - ref
    worst = flatness.worst_case_restarts(model, x, y, xi=xi, restarts=1, passes=20)[0].max().item() - ref
    assert worst > average + 0.1, (worst, average)
    worst_paper = flatness.worst_case_restarts(model, x, y, xi=0.00075, restarts=1, passes=20)[0].max().item() - ref
    assert worst_paper > 0, "the joint attack's RLoss must exceed the reference RLoss"


def independent_average_case(model, x, y, xi, samples, steps, seed):
    """Eq. 3 written out plainly: per draw, a deep copy of the model with ν added in place, then a
    hand-written PGD (best iterate per example). Random draws in flatness.py's order: ν from its
    own generator (seed + NU_SEED_OFFSET), layer by layer in module order; PGD starts from the
    global generator (seed), one uniform_ per batch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + flatness.NU_SEED_OFFSET)
    out = []
    for _ in range(samples):
        net = copy.deepcopy(model).eval()
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    for p in module.parameters(recurse=False):  # weight, then bias
                        g = torch.randn(p.shape, dtype=p.dtype, generator=generator)
                        p.add_(g * (xi * p.norm() / g.norm()))
        delta = torch.empty_like(x).uniform_(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
        best = torch.full((len(y),), -float("inf"), dtype=x.dtype)
        for t in range(steps + 1):
            delta.requires_grad_(True)
            loss = F.cross_entropy(net(x + delta), y, reduction="none")
            best = torch.maximum(best, loss.detach())
            if t == steps:
                break
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
            delta = (x + delta).clamp(0, 1) - x
        out.append(best.mean())
    return torch.stack(out)


@pytest.fixture(scope="module")
def trained64(trained):
    """The fixture model and images in float64. Two implementations of a sign-step ascent part ways at the first
    rounding difference that flips a sign (float32 kernels round differently per CPU: AVX2, AVX-512, none), so
    they are compared where no rounding difference can flip one."""
    model, x, y = trained
    return copy.deepcopy(model).double(), x.double(), y


@pytest.mark.numerics
def test_average_case_matches_an_independent_implementation(trained64):
    model, x, y = trained64
    mine, _ = flatness.average_case_draws(model, x, y, xi=0.5, samples=3, steps=5, seed=7)
    plain = independent_average_case(model, x, y, xi=0.5, samples=3, steps=5, seed=7)
    assert mine.std() > 0.01, "the draws should differ"
    torch.testing.assert_close(mine, plain, rtol=1e-5, atol=1e-6, check_dtype=False)  # the CE is taken in fp32


def independent_worst_case(model, x, y, xi, restarts, passes, batch_size, seed, weight_step=0.01):
    """Eq. 5 written plainly on a deep copy whose weights are overwritten in place: per restart,
    ν_l = U(0,1)·ξ‖w_l‖·g/‖g‖ (same draws as flatness.py: its ν generator, layer by layer, randn then
    rand), δ uniform in the ε-ball (global generator); per mini-batch one backward, then
    ν_l ← Π(ν_l + 0.01‖w_l‖·∇_l/‖∇_l‖) onto ‖ν_l‖ ≤ ξ‖w_l‖ and δ ← Π(δ + α·sign ∇_δ); the score is
    the mean CE at the final ν and δ; the value is the max over restarts."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + flatness.NU_SEED_OFFSET)
    net = copy.deepcopy(model).eval()
    layers = [p for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters(recurse=False)]
    centre = [p.detach().clone() for p in layers]
    scores = []
    for _ in range(restarts):
        nu = []
        for w in centre:
            g = torch.randn(w.shape, dtype=w.dtype, generator=generator)
            nu.append(g * (xi * w.norm() * torch.rand((), generator=generator) / g.norm()))
        delta = torch.empty_like(x).uniform_(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(passes):
            for i in range(0, len(y), batch_size):
                with torch.no_grad():
                    for p, w, v in zip(layers, centre, nu):
                        p.copy_(w + v)
                d = delta[i:i + batch_size].clone().requires_grad_(True)
                net.zero_grad()
                F.cross_entropy(net(x[i:i + batch_size] + d), y[i:i + batch_size], reduction="sum").backward()
                with torch.no_grad():
                    for j, (p, w) in enumerate(zip(layers, centre)):
                        v = nu[j] + weight_step * w.norm() * p.grad / p.grad.norm()
                        nu[j] = v * min(1.0, float(xi * w.norm() / v.norm()))
                    step = (d + ALPHA * d.grad.sign()).clamp(-EPS, EPS)
                    delta[i:i + batch_size] = (x[i:i + batch_size] + step).clamp(0, 1) - x[i:i + batch_size]
        with torch.no_grad():
            for p, w, v in zip(layers, centre, nu):
                p.copy_(w + v)
            scores.append(F.cross_entropy(net(x + delta), y).item())
    return torch.tensor(scores)


@pytest.mark.numerics
def test_worst_case_matches_an_independent_implementation(trained64):
    model, x, y = trained64
    mine, _ = flatness.worst_case_restarts(model, x, y, xi=0.01, restarts=2, passes=3, batch_size=16, seed=3)
    plain = independent_worst_case(model, x, y, xi=0.01, restarts=2, passes=3, batch_size=16, seed=3)
    assert (mine - mine[0]).abs().max() > 1e-3, "the restarts should differ"
    torch.testing.assert_close(mine, plain, rtol=1e-5, atol=1e-6, check_dtype=False)  # the CE is taken in fp32


# ---------------------------------------------------------------------------------------------
# Scale invariance (§3.2)
# ---------------------------------------------------------------------------------------------
def test_rescale_pairs_every_resnet_conv_with_its_bn(trained):
    model, _, _ = trained
    pairs = flatness.conv_bn_pairs(model)
    assert len(pairs) == 20  # stem + 16 block convs + 3 projection shortcuts
    assert ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in pairs and ("conv1", "bn1") in pairs


@pytest.mark.numerics
@pytest.mark.parametrize("alpha", [2.0, 0.5])
def test_rescaling_keeps_logits_and_flatness(trained, alpha):
    """The rescaled copy has different weights but the same logits (exactly once the BN eps is
    rescaled too); flatness with the same seed agrees, since ξ is relative to ‖w_l‖."""
    model, x, y = trained
    scaled, _ = flatness.rescale(model, alpha)
    assert not torch.equal(scaled.conv1.weight, model.conv1.weight)
    assert torch.equal(scaled.linear.weight, model.linear.weight)  # the head is left alone
    diff, top = flatness.logit_change(model, scaled, x)
    assert diff <= 1e-3 * top  # approximate: BN eps is not rescaled (the paper's operation)
    exact, _ = flatness.rescale(model, alpha, bn_eps=True)
    assert flatness.logit_change(model, exact, x)[0] <= 1e-4
    a0, _ = flatness.average_case_draws(model, x, y, xi=0.5, samples=2, steps=3)
    a1, _ = flatness.average_case_draws(scaled, x, y, xi=0.5, samples=2, steps=3)
    torch.testing.assert_close(a1, a0, rtol=1e-2, atol=0)
    w0, _ = flatness.worst_case_restarts(model, x, y, xi=0.005, restarts=1, passes=3)
    w1, _ = flatness.worst_case_restarts(scaled, x, y, xi=0.005, restarts=1, passes=3)
    torch.testing.assert_close(w1, w0, rtol=1e-2, atol=0)


@pytest.mark.numerics
def test_hessian_eigenvalue_scales_with_one_over_alpha_squared(trained):
    """Conv weights feeding a BN scale by α, so their curvature scales by 1/α². The head is not
    rescaled, so the joint top eigenvalue follows only approximately (conv block dominates here)."""
    model, x, y = trained
    lam = {a: flatness.hessian_top_eigenvalue(flatness.rescale(model, a)[0] if a != 1 else model, x, y,
                                              iters=30, tol=1e-4)[0] for a in (1.0, 2.0, 0.5)}
    assert lam[1.0] > 0
    for a in (2.0, 0.5):
        assert lam[a] / lam[1.0] == pytest.approx(1 / a ** 2, rel=0.1), lam


# ---------------------------------------------------------------------------------------------
# Power iteration against the exact Hessian
# ---------------------------------------------------------------------------------------------
class SmallNet(nn.Module):
    """conv (with bias) → BN → ReLU → linear on 4×4 images: 108 + 160 weights of dim > 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        return self.linear(self.pool(F.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.numerics
def test_power_iteration_matches_exact_hessian():
    torch.manual_seed(0)
    net = SmallNet()
    x = torch.rand(64, 3, 4, 4)
    y = torch.arange(64) % 10
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    weights = {k: p.detach() for k, p in common.perturbable_params(net, weights_only=True).items()}
    assert set(weights) == {"conv.weight", "linear.weight"}  # biases and BN excluded
    shapes = [w.shape for w in weights.values()]
    sizes = [w.numel() for w in weights.values()]

    def mean_ce(flat):
        params = {k: t.view(s) for k, t, s in zip(weights, flat.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(mean_ce, torch.cat([w.flatten() for w in weights.values()])))
    assert exact[-1] > exact[0].abs(), "power iteration finds the largest |λ|: needs λ_max to dominate"
    lam, iters, converged, _ = flatness.hessian_top_eigenvalue(net, x, y, iters=500, tol=1e-7, batch_size=32)
    assert converged and iters > 2
    assert lam == pytest.approx(exact[-1].item(), rel=0.01)
    # the released code's reduction: the sum of batch means = 2 × the mean over 2 equal batches
    v = {k: torch.randn_like(w) for k, w in weights.items()}
    mean = flatness.hessian_vector_product(net, weights, x, y, v, batch_size=32)
    summed = flatness.hessian_vector_product(net, weights, x, y, v, batch_size=32, reduction="batch-sum")
    for k in v:
        torch.testing.assert_close(summed[k], 2 * mean[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # on a loaded shared CPU, 2 threads can be 10× slower
FAST = ["--device", "cpu", "--steps", "2", "--ref-restarts", "2", "--samples", "2", "--restarts", "1",
        "--passes", "2"]


def written(stdout):
    """{mode: result file} from flatness.py's `wrote PATH` lines (the name carries the settings' hash)."""
    paths = [Path(p) for p in re.findall(r"^wrote (.+)$", stdout, re.M)]
    return {json.loads(p.read_text())["settings"]["mode"]: p for p in paths}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained):
    """A run folder with ckpt_last.pt and two snapshots, in the format Run.end_epoch writes."""
    import train_at
    model, _, _ = trained
    args = vars(train_at.parse_args(["--width", "8", "--device", "cpu"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = tmp_path_factory.mktemp("run")
    for name, epoch in (("ckpt_last.pt", 10), ("ckpt_epoch005.pt", 5), ("ckpt_epoch010.pt", 10)):
        common.save_checkpoint(folder / name, model=model.state_dict(), optimizer=opt.state_dict(), scheduler={},
                               epoch=epoch, args=args, rng=common.rng_state(), es_best=None, metrics={})
    return folder


def test_cli_both_modes_write_their_json(run_dir, tiny_data):
    proc = run_script("flatness.py", run_dir / "ckpt_last.pt", "--mode", "both", "--n-eval", "20",
                      "--data-dir", tiny_data, *FAST, env=ONE_THREAD)
    files = written(proc.stdout)
    assert set(files) == {"average", "worst"}
    keys = {"n", "reference", "reference_err", "values", "errs", "value", "box", "epoch", "source", "model_args",
            "versions", "settings", "settings_hash", "non_default", "checkpoint_sha256"}
    for mode, xi, count in (("average", 0.5, "samples"), ("worst", 0.00075, "restarts")):
        r = json.loads(files[mode].read_text())
        s = r["settings"]
        assert files[mode].name == f"flatness_{mode}_last_{r['settings_hash']}.json"
        assert keys <= set(r) and r["settings_hash"] == evaluate.settings_hash(s)
        assert set(s) == {"tool", "mode", "checkpoint", "use_ema", "source", "arch", "data_dir", "dataset", "batch_size", "seed",
                          "scale", "scale_bn_eps", *flatness.MODE_SETTINGS[mode]}
        assert (s["tool"], s["mode"], s["checkpoint"], s["loss"], s["subset"], s["n_eval"], s["xi"], r["epoch"]) == \
            ("flatness.py", mode, "ckpt_last.pt", "robust", "eval", 20, xi, 10)
        assert "n_eval" in r["non_default"] and "xi" not in r["non_default"]
        assert r["n"] == 20 and len(r["values"]) == s[count] and s["scale"] == 1.0
        agg = sum(r["values"]) / len(r["values"]) if mode == "average" else max(r["values"])
        assert r["value"] == pytest.approx(agg - r["reference"])


def test_cli_epochs_measures_snapshots_skips_done_ones_and_force_replaces(run_dir, tiny_data, capsys):
    """The command line once (a child process), then the same flags in-process: skip, other settings, --force."""
    flags = [str(f) for f in ["--epochs", run_dir, "--mode", "average", "--loss", "clean", "--n-eval", "20",
                              "--data-dir", tiny_data, *FAST]]
    run_script("flatness.py", *flags, env=ONE_THREAD)
    files = sorted(run_dir.glob("flatness_average_epoch*.json"))
    assert [f.name.split("_")[2] for f in files] == ["epoch005", "epoch010"]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert [json.loads(f.read_text())["epoch"] for f in files] == [5, 10]
    assert json.loads(files[0].read_text())["settings"]["loss"] == "clean"
    flatness.main(flags)
    assert capsys.readouterr().out.splitlines() == [f"done: {f} (same settings; --force re-measures)" for f in files]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # other settings: new files beside these, which stay
    flatness.main(flags + ["--samples", "1"])
    assert len(list(run_dir.glob("flatness_average_epoch*.json"))) == 4
    assert [f.stat().st_mtime_ns for f in files] == stamps
    flatness.main(flags + ["--force"])
    assert all(f.stat().st_mtime_ns != t for f, t in zip(files, stamps))
    assert len(list(run_dir.glob("flatness_average_epoch*.json"))) == 4


def test_cli_landscape_rescaled_landscape_and_scaled_hessian(run_dir, tiny_data, monkeypatch, capsys):
    ckpt = run_dir / "ckpt_last.pt"
    flags = ["--directions", "2", "--points", "3", "--n-landscape", "10", "--landscape-steps", "1",
             "--adversarial-passes", "1", "--direction-norm", "max-abs", "--data-dir", tiny_data, "--device", "cpu"]
    path = written(run_script("flatness.py", ckpt, "--mode", "landscape", *flags, env=ONE_THREAD).stdout)["landscape"]
    r = json.loads(path.read_text())
    s = r["settings"]
    assert r["s"] == [-1.0, 0.0, 1.0] and s["direction_norm"] == "max-abs" and s["scale"] == 1.0
    assert (s["random_scale"], s["adversarial_scale"]) == (0.5, 0.01)
    model, _ = evaluate.model_from_checkpoint(ckpt, "cpu")
    x, y = common.eval_split(tiny_data, "early-stop", 10, "cpu")
    clean = common.clean_metrics(model, x, y)[0].mean().item()
    for kind in ("random", "adversarial"):
        assert len(r[kind]["robust"]) == 2 and len(r[kind]["clean"][0]) == 3
        for curve in r[kind]["clean"]:  # s = 0 is the unperturbed model
            assert curve[1] == pytest.approx(clean, rel=1e-5)
    # Fig. 4's rescaled model (§3.2): its own file, measured on the ×2 weights, the same function at s = 0
    seen, measure = [], flatness.landscape
    monkeypatch.setattr(flatness, "landscape", lambda model, *a: seen.append(model.conv1.weight) or measure(model, *a))
    flatness.main([str(ckpt), "--mode", "landscape", "--scale", "2", *map(str, flags)])
    scaled = written(capsys.readouterr().out)["landscape"]
    r2 = json.loads(scaled.read_text())
    torch.testing.assert_close(seen[0], 2 * model.conv1.weight)
    assert scaled != path and path.exists() and r2["settings"]["scale"] == 2.0 and r2["scale_pairs"] == 20
    assert r2["random"]["clean"][0][1] == pytest.approx(clean, rel=1e-3)
    # directions normalised per layer to the layer's size (Eq. 2) follow the rescaling: the same curves
    torch.testing.assert_close(torch.tensor(r2["random"]["clean"]), torch.tensor(r["random"]["clean"]),
                               rtol=1e-3, atol=0)

    flags = ["--scale", "2", "--n-hessian", "20", "--hessian-iters", "3", "--data-dir", tiny_data, "--device", "cpu"]
    flatness.main([str(ckpt), "--mode", "hessian", *map(str, flags)])
    stdout = capsys.readouterr().out
    r = json.loads(written(stdout)["hessian"].read_text())
    assert r["iterations"] <= 3 and r["n"] == 20 and r["settings"]["scale"] == 2.0
    assert r["settings"]["n_hessian"] == 20 and r["settings"]["hessian_iters"] == 3
    assert r["scale_pairs"] == 20 and r["scale_logit_max_diff"] <= 1e-3 * r["scale_logit_max"]
    assert r["eigenvalue"] == pytest.approx(r["history"][-1]) and "max |Δlogit|" in stdout


def test_every_setting_names_its_own_file():
    """Every flag of MODE_SETTINGS (and the seed, the PGD batch size, the rescaling, the model) changes the
    settings and so the file name; --device and flags of other modes do not; an explicit paper ξ is the default."""
    info = {"source": "ours", "args": {}}

    def path(mode, *flags):
        args = flatness.parse_args(["runs/x/ckpt_epoch005.pt", "--mode", mode, *flags])
        args.data_dir = "/data"
        return evaluate.result_path("runs/x", flatness.flatness_settings(args, info, mode)[0])

    changed = {"loss": ["--loss", "clean"], "subset": ["--subset", "train-eval"], "n_eval": ["--n-eval", "7"],
               "xi": ["--xi", "0.1"], "samples": ["--samples", "3"],
               "restarts_perturbed": ["--restarts-perturbed", "2"],
               "steps": ["--steps", "3"], "ref_restarts": ["--ref-restarts", "3"], "norm": ["--norm", "l2"],
               "epsilon": ["--epsilon", "4/255"],
               "attack_step": ["--attack-step", "0.01"], "restarts": ["--restarts", "3"], "passes": ["--passes", "3"],
               "weight_step": ["--weight-step", "0.1"], "per_batch": ["--per-batch"],
               "joint_batch_size": ["--joint-batch-size", "64"], "directions": ["--directions", "3"],
               "points": ["--points", "5"], "n_landscape": ["--n-landscape", "7"],
               "landscape_steps": ["--landscape-steps", "3"], "direction_norm": ["--direction-norm", "max-abs"],
               "random_scale": ["--random-scale", "0.3"], "adversarial_scale": ["--adversarial-scale", "0.3"],
               "adversarial_xi": ["--adversarial-xi", "0.1"], "adversarial_passes": ["--adversarial-passes", "3"],
               "n_hessian": ["--n-hessian", "7"], "hessian_iters": ["--hessian-iters", "7"],
               "hessian_tol": ["--hessian-tol", "0.1"], "hessian_reduction": ["--hessian-reduction", "batch-sum"]}
    shared = [["--seed", "1"], ["--batch-size", "64"], ["--scale", "2"], ["--scale-bn-eps"], ["--use-ema"]]
    measures = {"average": ("loss", "subset", "n_eval", "xi", "samples", "restarts_perturbed", "steps", "ref_restarts",
                            "norm", "epsilon", "attack_step"),
                "worst": ("loss", "subset", "n_eval", "xi", "restarts", "passes", "weight_step", "per_batch",
                          "joint_batch_size", "steps", "ref_restarts", "norm", "epsilon", "attack_step"),
                "landscape": ("directions", "points", "n_landscape", "landscape_steps", "direction_norm",
                              "random_scale", "adversarial_scale", "adversarial_xi", "adversarial_passes",
                              "weight_step", "norm", "epsilon", "attack_step"),
                "hessian": ("n_hessian", "hessian_iters", "hessian_tol", "hessian_reduction")}
    for mode, keys in measures.items():
        default = path(mode)
        assert default.name.startswith(f"flatness_{mode}_epoch005_")
        assert path(mode, "--device", "cpu") == default
        for flags in [changed[k] for k in keys] + shared:
            assert path(mode, *flags) != default, (mode, flags)
        for flags in [f for k, f in changed.items() if k not in keys and k != "xi"]:  # --xi: average/worst only
            assert path(mode, *flags) == default, (mode, flags)
    for mode, xi in flatness.DEFAULT_XI.items():
        assert path(mode, "--xi", str(xi)) == path(mode)


@pytest.mark.parametrize("flags,message", [
    (["missing.pt"], "does not exist"),
    (["{ckpt}", "--mode", "average", "--xi", "-1"], "--xi must be >= 0"),
    (["{ckpt}", "--xi", "0.1"], "--xi needs --mode average or --mode worst"),
    (["--epochs", "{run}/nowhere"], "is not a folder"),
    ([], "give a checkpoint"),
])
def test_bad_input_is_one_error_line(run_dir, tiny_data, capsys, flags, message):
    flags = [f.format(ckpt=run_dir / "ckpt_last.pt", run=run_dir) for f in flags]
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: flatness.main(flags + ["--data-dir", str(tiny_data), "--device", "cpu"]))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
