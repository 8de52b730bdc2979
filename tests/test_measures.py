"""flatness.py's other measures (README "Other flatness measures"): adaptive worst- and average-case sharpness
(Andriushchenko et al. 2023), PAC-Bayes flatness and its magnitude-aware variant (Jiang et al. 2020) and the Hessian
trace (Hutchinson): where ν lives, agreement with independent implementations of the estimators, which measures a
function-preserving rescaling leaves unchanged, the bisection, the exact Hessian, and the command line."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, fit, separable_data

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import evaluate  # noqa: E402
import flatness  # noqa: E402

SIZE = 8


@pytest.fixture(scope="module")
def trained():
    """A width-8 ResNet-18 trained for 40 Adam steps (eval mode) and 40 held-out 8×8 images."""
    torch.manual_seed(0)
    model = common.ResNet18(width=8)
    x, y = separable_data(400, seed=1, size=SIZE)
    fit(model, x, y, steps=40, batch_size=64)
    xt, yt = separable_data(40, seed=2, size=SIZE)
    return model.eval(), xt, yt


class PlainNet(nn.Module):
    """conv → ReLU → conv → ReLU → pool → linear, no BN: every parameter is perturbed (as in sharpness.py)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 1).flatten(1))


@pytest.fixture(scope="module")
def plain64():
    """PlainNet fitted a little, in float64, with 48 images."""
    torch.manual_seed(0)
    net = PlainNet()
    x, y = separable_data(200, seed=3, size=SIZE)
    fit(net, x, y, steps=30, batch_size=50)
    xt, yt = separable_data(48, seed=4, size=SIZE)
    return net.double().eval(), xt.double(), yt


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the measure changed the model"
    assert all(p.grad is None for p in model.parameters()), "the measure left parameter gradients"


# ---------------------------------------------------------------------------------------------
# Adaptive worst case: the ball, the estimator against an independent sharpness.py-style loop, ρ = 0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adaptive_steps_stay_in_the_adaptive_ball(trained, norm):
    model, x, y = trained
    weights = flatness.frozen_weights(model)
    scale = {k: w.abs() for k, w in weights.items()}
    rho = 0.01
    nu = prev = {k: torch.zeros_like(w) for k, w in weights.items()}
    torch.manual_seed(1)
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights.values()]
        nu, prev = flatness.adaptive_step(nu, prev, grads, scale, rho, 2 * rho, norm), nu
        u = {k: torch.where(scale[k] > 0, nu[k] / scale[k], 0) for k in nu}
        if norm == "linf":
            assert max(v.abs().max().item() for v in u.values()) <= rho * (1 + 1e-6)
        else:
            assert torch.sqrt(sum((v ** 2).sum() for v in u.values())).item() <= rho * (1 + 1e-6)
    assert all((nu[k][scale[k] == 0] == 0).all() for k in nu)  # an element w_i = 0 is never perturbed
    # the last step moved every layer: the ball is reached, not just respected
    assert all(v.abs().sum() > 0 for v in nu.values())


def sharpness_py_linf(net, x, y, rho, n_iters, m):
    """Andriushchenko et al.'s eval_APGD_sharpness (adaptive, ℓ∞, zero init, 1 restart) written as their loop
    is: the parameters are changed in place, every iterate is scored by a separate forward, and a halving
    reloads the best weights while the perturbation goes on from the current one. The weights are float64, the
    CE is taken in float32 (as flatness.py takes every reported loss)."""
    import copy
    import math as m_
    p, w = [0, 0.22], [0, m_.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(m_.ceil(p[-1] * n_iters))
    w = w[1:]
    net = copy.deepcopy(net)
    params = list(net.parameters())
    orig = [q.detach().clone() for q in params]
    worsts, inits = [], []
    for i0 in range(0, len(y), m):
        xb, yb = x[i0:i0 + m], y[i0:i0 + m]
        with torch.no_grad():
            init = F.cross_entropy(net(xb).float(), yb).item()
        delta = [torch.zeros_like(q) for q in params]
        prev = [d.clone() for d in delta]
        worst, worst_state = init, [q.detach().clone() for q in params]
        step, prev_step, prev_worst, prev_cp, updates = 2 * rho, 2 * rho, init, 0, 0
        for i in range(n_iters):
            backup = [d.clone() for d in delta]
            grads = torch.autograd.grad(F.cross_entropy(net(xb).float(), yb), params)
            with torch.no_grad():
                delta = [d + step * g.sign() * o.abs() for d, g, o in zip(delta, grads, orig)]
                delta = [torch.max(torch.min(d, o.abs() * rho), -o.abs() * rho) for d, o in zip(delta, orig)]
                delta = [0.75 * d + 0.25 * pd for d, pd in zip(delta, prev)]
                for q, o, d in zip(params, orig, delta):
                    q.copy_(o + d)
                prev = backup
                cur = F.cross_entropy(net(xb).float(), yb).item()
                if cur > worst:
                    worst, worst_state, updates = cur, [q.detach().clone() for q in params], updates + 1
                if i in w:
                    c1 = updates < 0.75 * (i - prev_cp)
                    c2 = prev_step == step and prev_worst == worst
                    prev_step, prev_worst, prev_cp, updates = step, worst, i, 0
                    if c1 or c2:
                        step *= 0.5
                        for q, s in zip(params, worst_state):
                            q.copy_(s)
        with torch.no_grad():
            for q, o in zip(params, orig):
                q.copy_(o)
        worsts.append(worst)
        inits.append(init)
    return (sum(worsts) - sum(inits)) / len(worsts), worsts


@pytest.mark.numerics
@pytest.mark.parametrize("rho", [0.002, 0.05])
def test_adaptive_worst_case_matches_a_sharpness_py_style_loop(plain64, rho):
    """Float64 on a BN-free net (every parameter perturbed, as in sharpness.py): the fused loop (one
    forward + backward per step, best tracked on the device) equals their loop step for step."""
    net, x, y = plain64
    before = snapshot(net)
    ours = flatness.adaptive_worst_case(net, x, y, loss="clean", rho=rho, sharpness_batch=16, sharpness_steps=20)
    assert_unchanged(net, before)
    theirs, worsts = sharpness_py_linf(net, x, y, rho, 20, 16)
    assert ours.value > 0.0
    assert ours.values == pytest.approx(worsts, rel=1e-7)  # every batch's best loss: the same trajectory
    # the unperturbed batch loss: a mean of per-example CEs here, F.cross_entropy's mean there (≤ 1 float32 ulp apart)
    assert ours.value == pytest.approx(theirs, rel=0, abs=5e-7)
    assert len(ours.values) == 3 and ours.reference == pytest.approx(
        F.cross_entropy(net(x).float(), y, reduction="none").view(3, 16).mean(1).mean().item(), rel=1e-6)


def test_halving_checkpoints_are_sharpness_pys():
    """APGD's fractions 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of the steps, rounded up in float
    arithmetic as sharpness.py does (0.57 + 0.13 = 0.7000000000000001: 20 steps check at 15, not 14)."""
    assert flatness.halving_checkpoints(20) == {5, 9, 12, 15, 16, 18, 19, 20}
    assert flatness.halving_checkpoints(100) == {22, 41, 58, 70, 80, 87, 93, 99, 105}


@pytest.mark.parametrize("loss", ["clean", "robust"])
def test_adaptive_worst_case_is_zero_at_rho_zero_and_grows_with_rho(trained, loss):
    """At ρ = 0 the measure is exactly 0, RLoss too: the reference gets the same input attack (the reference's
    examples and the same joint steps); it grows with ρ."""
    model, x, y = trained
    kw = dict(loss=loss, sharpness_batch=20, sharpness_steps=6, steps=3, ref_restarts=1)
    values = [flatness.adaptive_worst_case(model, x, y, rho=r, **kw).value for r in (0.0, 0.01, 0.1)]
    assert values[0] == 0.0
    assert 0 < values[1] < values[2]


def test_robust_adaptive_worst_case_attacks_the_inputs(trained):
    """RLoss: the reference is at least the PGD reference (it continues from its examples), and the perturbed
    loss exceeds what the weights alone reach at the same examples."""
    model, x, y = trained
    kw = dict(rho=0.02, sharpness_batch=40, sharpness_steps=6, steps=3, ref_restarts=1)
    robust = flatness.adaptive_worst_case(model, x, y, **kw)
    pgd_ref, _ = flatness.reference(model, x, y, steps=3, restarts=1)
    assert robust.reference >= pgd_ref - 1e-6
    clean = flatness.adaptive_worst_case(model, x, y, loss="clean", **kw)
    assert robust.reference > clean.reference + 0.5  # the reference is a robust loss, not the clean CE
    assert robust.values[0] > robust.reference
    assert robust.values[0] > clean.values[0] + 0.5  # ν and δ jointly beat ν alone at the clean inputs


def test_robust_adaptive_ascent_starts_at_the_references_adversarial_examples(trained, monkeypatch):
    """The joint ascent's δ starts where the reference's PGD ended: per example the CE there is the reference's."""
    model, x, y = trained
    starts, real = [], flatness.adaptive_ascent
    monkeypatch.setattr(flatness, "adaptive_ascent", lambda *a, **k: starts.append(a[10]) or real(*a, **k))
    flatness.adaptive_worst_case(model, x, y, rho=0.01, sharpness_batch=20, sharpness_steps=2, steps=3, ref_restarts=2)
    assert len(starts) == 4  # 2 batches × (ρ = 0, ρ)
    delta = torch.cat([starts[0], starts[2]])
    assert torch.equal(starts[0], starts[1]) and delta.abs().max() <= 8 / 255 + 1e-6 and delta.abs().max() > 0
    ce, _ = flatness.reference_each(model, x, y, steps=3, restarts=2)
    with torch.no_grad():
        torch.testing.assert_close(F.cross_entropy(model(x + delta), y, reduction="none"), ce, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Adaptive average case against a hand formula
# ---------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adaptive_average_case_matches_a_hand_formula(plain64, norm):
    net, x, y = plain64
    rho, m, draws, seed = 0.5, 16, 4, 3
    got = flatness.adaptive_average_case(net, x, y, loss="clean", rho=rho, sharpness_norm=norm, sharpness_batch=m,
                                         sharpness_samples=draws, seed=seed)
    g = torch.Generator().manual_seed(seed + flatness.NU_SEED_OFFSET)
    named = dict(net.named_parameters())
    gaps = []
    for i in range(0, len(y), m):
        losses = []
        for _ in range(draws):
            params = {}
            for k, w in named.items():
                z = torch.randn(w.shape, generator=g, dtype=w.dtype) if norm == "l2" else \
                    torch.rand(w.shape, generator=g, dtype=w.dtype) * 2 - 1
                params[k] = w.detach() + rho * w.detach().abs() * z
            logits = torch.func.functional_call(net, params, (x[i:i + m],)).float()  # reported losses: fp32
            losses.append(F.cross_entropy(logits, y[i:i + m]))
        gaps.append(torch.stack(losses).mean() - F.cross_entropy(net(x[i:i + m]).float(), y[i:i + m]))
    assert got.value == pytest.approx(torch.stack(gaps).mean().item(), rel=0, abs=1e-6)  # fp32 losses
    assert abs(got.value) > 1e-3
    assert got.settings["rho"] == rho and len(got.values) == 3


def test_adaptive_average_case_recomputes_the_attack_on_every_perturbed_model(trained, monkeypatch):
    model, x, y = trained
    seen = []
    real = common.pgd

    def spy(m, *a, **k):
        seen.append(m)
        return real(m, *a, **k)
    monkeypatch.setattr(common, "pgd", spy)
    flatness.adaptive_average_case(model, x, y, rho=0.1, sharpness_batch=20, sharpness_samples=2, steps=2,
                                   ref_restarts=1)
    perturbed = [m for m in seen if isinstance(m, flatness.Perturbed)]
    assert len(perturbed) == 2 * 2  # 2 batches × 2 draws
    assert len({id(m.params["conv1.weight"]) for m in perturbed}) == 4


# ---------------------------------------------------------------------------------------------
# Reparameterisation: which measures a function-preserving rescaling keeps (§3.2's ×2 / ×0.5)
# ---------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("alpha", [2.0, 0.5])
def test_adaptive_and_magnitude_aware_measures_are_invariant_hessian_and_plain_pac_bayes_are_not(trained, alpha):
    model, x, y = trained
    scaled, _ = flatness.rescale(model, alpha, bn_eps=True)  # exact for a power of two
    kw = dict(sharpness_batch=20, steps=2, ref_restarts=1)

    def both(f, **settings):
        return f(model, x, y, **settings).value, f(scaled, x, y, **settings).value

    for norm, rho in (("linf", 0.05), ("l2", 2.0)):  # (ℓ2: one ball over all the tensors)
        a, b = both(flatness.adaptive_worst_case, rho=rho, sharpness_norm=norm, sharpness_steps=5, **kw)
        assert a > 0 and b == pytest.approx(a, rel=1e-4), norm
    a, b = both(flatness.adaptive_average_case, rho=0.1, sharpness_samples=2, **kw)
    assert a != 0 and b == pytest.approx(a, rel=1e-4)
    pb = dict(loss="clean", search_depth=8, mc_samples=2)
    a, b = (flatness.pac_bayes(m, x, y, magnitude_aware=True, magnitude_eps=0.0, **pb) for m in (model, scaled))
    assert b.value == pytest.approx(a.value, rel=1e-6) and b.errs == pytest.approx(a.errs, abs=1e-6)
    a, b = (flatness.pac_bayes(m, x, y, **pb) for m in (model, scaled))
    assert b.errs != pytest.approx(a.errs, abs=1e-6)  # absolute noise: the rescaled layers see another relative size
    a, b = both(flatness.hessian_trace, loss="clean", probes=4)
    assert b / a == pytest.approx(1 / alpha ** 2, rel=0.5) and abs(b / a - 1) > 0.2


# ---------------------------------------------------------------------------------------------
# PAC-Bayes: the noise and the bisection
# ---------------------------------------------------------------------------------------------
def test_pac_bayes_noise_has_jiang_et_als_variance():
    weights = {"a": torch.full((200_000,), 0.5), "b": torch.full((200_000,), -2.0)}
    g = torch.Generator().manual_seed(0)
    plain = flatness.pac_bayes_noise(weights, 0.3, None, g)
    assert plain["a"].std().item() == pytest.approx(0.3, rel=0.01) and plain["b"].std().item() == pytest.approx(0.3, rel=0.01)
    mag = flatness.pac_bayes_noise(weights, 0.3, 0.1, g)
    assert mag["a"].std().item() == pytest.approx(math.sqrt(0.3 ** 2 * 0.25 + 0.01), rel=0.01)
    assert mag["b"].std().item() == pytest.approx(math.sqrt(0.3 ** 2 * 4 + 0.01), rel=0.01)


def test_pac_bayes_bisection_finds_the_target_deviation(trained, monkeypatch):
    """With the error of w + u a known function of σ (err = 0.2 + σ/2, the reference 0.2), the bisection
    stops at the σ whose deviation is within the tolerance of the target: σ' ≈ 0.2 for a target of 0.1."""
    model, x, y = trained
    sigmas = []

    def noise(weights, sigma, magnitude_eps, generator):
        sigmas.append(sigma)
        return {k: torch.zeros_like(w) for k, w in weights.items()}

    def loss_of(m, x_, y_, *a, **k):
        if isinstance(m, flatness.Perturbed):
            err = min(1.0, 0.2 + sigmas[-1] / 2)
            ok = torch.arange(len(y_)) >= round(err * len(y_))
        else:
            ok = torch.arange(len(y_)) >= round(0.2 * len(y_))
        return torch.zeros(len(y_)), ok
    monkeypatch.setattr(flatness, "pac_bayes_noise", noise)
    monkeypatch.setattr(flatness, "loss_of", loss_of)
    x5, y5 = x[:1].repeat(1000, 1, 1, 1), y[:1].repeat(1000)
    got = flatness.pac_bayes(model, x5, y5, loss="clean", mc_samples=1, deviation_tolerance=0.002)
    sigma = got.details["sigma"]
    assert got.details["converged"] and abs(sigma - 0.2) <= 0.004 + 1e-9
    assert got.value == pytest.approx(1 / sigma ** 2)
    assert got.values[:3] == [1.0, 0.5, 0.25]  # bisection on [0, 2]: too much noise twice, then ...
    assert got.errs[0] == pytest.approx(0.7) and got.reference == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# Hessian trace against the exact Hessian
# ---------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_hutchinson_probes_are_v_h_v_of_the_exact_hessian(plain64):
    net, x, y = plain64
    weights = {k: p.detach() for k, p in common.perturbable_params(net, weights_only=True).items()}
    shapes, sizes = [w.shape for w in weights.values()], [w.numel() for w in weights.values()]

    def mean_ce(flat):
        params = {k: t.view(s) for k, t, s in zip(weights, flat.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)
    H = torch.autograd.functional.hessian(mean_ce, torch.cat([w.flatten() for w in weights.values()]))
    got = flatness.hessian_trace(net, x, y, loss="clean", probes=100, batch_size=16, seed=5)
    g = torch.Generator().manual_seed(5)
    for value in got.values[:3]:  # the same Rademacher vectors
        v = torch.cat([torch.randint(0, 2, w.shape, generator=g).to(w.dtype).mul_(2).sub_(1).flatten()
                       for w in weights.values()])
        assert value == pytest.approx((v @ H @ v).item(), rel=1e-6, abs=1e-5)  # (the CE in fp32, as every loss)
    assert abs(got.value - torch.trace(H).item()) <= 4 * got.details["stderr"]
    assert got.reference == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-6)


def test_robust_hessian_trace_is_at_the_references_adversarial_examples(trained):
    model, x, y = trained
    robust = flatness.hessian_trace(model, x, y, probes=2, steps=3, ref_restarts=2)
    rloss, _ = flatness.reference(model, x, y, steps=3, restarts=2)
    assert robust.reference == pytest.approx(rloss, rel=1e-5)
    clean = flatness.hessian_trace(model, x, y, loss="clean", probes=2)
    assert clean.reference < rloss - 0.5 and clean.value != robust.value


@pytest.mark.parametrize("call,settings,message", [
    ("adaptive_worst_case", {"rho": -1}, "rho must be a number >= 0"),
    ("adaptive_worst_case", {"sharpness_norm": "l3"}, "sharpness_norm must be 'linf' or 'l2'"),
    ("adaptive_average_case", {"sharpness_samples": 0}, "sharpness_samples must be an integer >= 1"),
    ("adaptive_average_case", {"logit_normalise": "yes"}, "logit_normalise must be True or False"),
    ("pac_bayes", {"target_deviation": 1.5}, "target_deviation must be in (0, 1)"),
    ("pac_bayes", {"magnitude_eps": 1e-3}, "unknown setting 'magnitude_eps'"),
    ("hessian_trace", {"probes": 0}, "probes must be an integer >= 1"),
    ("hessian_trace", {"hessian_reduction": "sum"}, "hessian_reduction must be 'mean' or 'batch-sum'"),
])
def test_api_refuses_bad_settings(trained, call, settings, message):
    model, x, y = trained
    with pytest.raises(evaluate.SettingError, match=re.escape(message)):
        getattr(flatness, call)(model, x, y, **settings)


def test_logit_normalisation_bounds_the_loss(trained):
    model, x, y = trained
    got = flatness.adaptive_worst_case(model, x, y, loss="clean", rho=0.5, logit_normalise=True,
                                       sharpness_batch=40, sharpness_steps=5)
    # CE of unit-norm logits over 10 classes lies in [log(10) − √(10/9)·…, log 10 + 1.06]: never large
    assert got.reference < math.log(10) + 1.1 and max(got.values) < math.log(10) + 1.1
    plain = flatness.adaptive_worst_case(model, x, y, loss="clean", rho=0.5, sharpness_batch=40, sharpness_steps=5)
    assert max(plain.values) > math.log(10) + 1.1


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
FAST = ["--device", "cpu", "--steps", "2", "--ref-restarts", "1", "--samples", "1", "--restarts", "1", "--passes", "1",
        "--sharpness-batch", "10", "--sharpness-steps", "3", "--sharpness-samples", "1", "--search-depth", "2",
        "--mc-samples", "1", "--probes", "2", "--hessian-iters", "2", "--n-hessian", "10"]


def written(stdout):
    paths = [Path(p) for p in re.findall(r"^wrote (.+)$", stdout, re.M)]
    return {json.loads(p.read_text())["settings"]["mode"]: p for p in paths}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained):
    import train_at
    model, _, _ = trained
    args = vars(train_at.parse_args(["--width", "8", "--device", "cpu"]))
    folder = tmp_path_factory.mktemp("run")
    common.save_checkpoint(folder / "ckpt_last.pt", model=model.state_dict(), optimizer={}, scheduler={}, epoch=3,
                           args=args, rng=common.rng_state(), es_best=None, metrics={})
    return folder


def test_cli_mode_all_writes_every_measure(run_dir, tiny_data, run_main):
    code, out, err = run_main(flatness, run_dir / "ckpt_last.pt", "--mode", "all", "--n-eval", "20",
                              "--data-dir", tiny_data, *FAST)
    assert code == 0, err
    files = written(out)
    assert set(files) == set(flatness.MEASURES)
    results = {mode: json.loads(p.read_text()) for mode, p in files.items()}
    norms = {r["weight_norm_sq"] for r in results.values()}
    model = common.ResNet18(width=8)
    model.load_state_dict(torch.load(run_dir / "ckpt_last.pt", weights_only=False)["model"])
    expected = sum((p.detach().double() ** 2).sum() for p in common.perturbable_params(model).values()).item()
    assert len(norms) == 1 and norms.pop() == pytest.approx(expected, rel=1e-9)
    for mode in ("adaptive-worst", "adaptive-average", "pac-bayes", "pac-bayes-mag", "hessian-trace"):
        r = results[mode]
        s = r["settings"]
        assert files[mode].name == f"flatness_{mode}_last_{r['settings_hash']}.json"
        assert set(s) == {"tool", "mode", "checkpoint", "use_ema", "source", "arch", "data_dir", "dataset",
                          "batch_size", "seed", "scale", "scale_bn_eps", *flatness.MODE_SETTINGS[mode]}
        assert isinstance(r["value"], float) and r["n"] == (10 if mode == "hessian-trace" else 20)
    assert results["adaptive-worst"]["settings"]["rho"] == 0.002
    assert results["adaptive-worst"]["settings"]["sharpness_norm"] == "linf"
    assert results["adaptive-average"]["settings"]["rho"] == 0.1
    assert results["adaptive-average"]["settings"]["sharpness_norm"] == "l2"
    assert results["pac-bayes-mag"]["settings"]["magnitude_eps"] == 1e-3 and "magnitude_eps" not in \
        results["pac-bayes"]["settings"]
    assert results["pac-bayes"]["value"] == pytest.approx(1 / results["pac-bayes"]["sigma"] ** 2)
    # one RLoss(w) for the measures on the --subset: the paper's reference is the PAC-Bayes one's
    assert results["average"]["reference"] == pytest.approx(results["pac-bayes"]["reference_loss"], rel=1e-6)
    assert results["average"]["reference_err"] == pytest.approx(results["pac-bayes"]["reference"])


def test_cli_adaptive_flags_choose_the_measure_and_name_its_file(run_dir, tiny_data, run_main):
    base = ["--mode", "adaptive-worst", "--loss", "clean", "--n-eval", "20", "--data-dir", tiny_data, *FAST]
    plain, l2, rho = (written(run_main(flatness, run_dir / "ckpt_last.pt", *base, *extra)[1])
                      for extra in ([], ["--sharpness-norm", "l2"], ["--rho", "0.01"]))
    files = [plain["adaptive-worst"], l2["adaptive-worst"], rho["adaptive-worst"]]
    assert len({f.name for f in files}) == 3
    s = [json.loads(f.read_text()) for f in files]
    assert (s[1]["settings"]["sharpness_norm"], s[1]["settings"]["rho"]) == ("l2", 0.5)
    assert "rho" not in s[1]["non_default"]  # ρ follows the chosen norm
    assert s[2]["settings"]["rho"] == 0.01 and "rho" in s[2]["non_default"]
    assert s[0]["value"] != s[2]["value"]


@pytest.mark.parametrize("flags,message", [
    (["--mode", "both", "--rho", "0.1"], "--rho needs --mode adaptive-worst or --mode adaptive-average"),
    (["--mode", "all", "--xi", "0.1"], "--xi needs --mode average or --mode worst"),
    (["--mode", "pac-bayes", "--target-deviation", "2"], "--target-deviation must be in (0, 1)"),
    (["--mode", "hessian-trace", "--probes", "0"], "must be >= 1"),
])
def test_bad_flags_are_one_error_line(run_main, flags, message):
    code, out, err = run_main(flatness, "ckpt.pt", *flags)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
