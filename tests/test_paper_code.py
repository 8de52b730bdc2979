"""evaluate.py --estimator paper-code: RLoss/RErr as the paper's released code estimated them. Its loss is capped
(−log(p_y + 1e-12)), its PGD starts from a Gaussian scaled to ‖δ‖∞ = ε·u, per example it keeps the restart whose
adversarial example makes a wrong class most probable, its RErr counts a clean correctness given from outside
(flatness: the unperturbed model's), and ε is 0.0314. The flag and the API setting record the estimator, and it
enters the result file's hash only when it is not ours (every earlier file name stays)."""
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluate
from conftest import fit, separable_data

EPS = evaluate.PAPER_CODE_EPSILON


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained():
    """The tiny CNN after 60 Adam steps on 8×8 separable images (so some examples survive a small attack and
    others do not), and 24 held-out images."""
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = separable_data(300, seed=1, size=8)
    fit(model, x, y, steps=60, batch_size=50)
    xt, yt = separable_data(24, seed=2, size=8)
    return model, xt, yt


# ---------------------------------------------------------------------------------------------
# The three pieces: the capped loss, the start, the restart choice
# ---------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_capped_ce_is_minus_log_p_plus_1e_12_in_float32():
    """−log(softmax_y + 1e-12) on ordinary logits; for a huge margin against y it stops at −ln 1e-12 ≈ 27.63
    while the cross-entropy grows with the margin; float32 whatever the logits' dtype."""
    logits, y = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 3, torch.arange(6)
    torch.testing.assert_close(evaluate.capped_ce(logits, y),
                               -torch.log(torch.softmax(logits, 1)[torch.arange(6), y] + 1e-12), rtol=1e-6, atol=0)
    huge = torch.zeros(2, 10)
    huge[:, 0] = 200.0  # class 0 wins by 200 nats; y = 1, 2 lose
    y = torch.tensor([1, 2])
    capped = evaluate.capped_ce(huge, y)
    torch.testing.assert_close(capped, torch.full((2,), -torch.tensor(1e-12).log().item()))
    assert capped.max() < 27.64 and (F.cross_entropy(huge, y, reduction="none") > 199).all()
    assert evaluate.capped_ce(huge.double(), y).dtype == torch.float32


def test_paper_code_start_is_a_gaussian_at_linf_radius_eps_u():
    """δ = g/‖g‖∞ · ε·u per example (g ~ N(0, I) over 3×32×32, then u ~ U(0, 1), from the global RNG): ‖δ‖∞ = ε·u,
    reached at the coordinate where |g| peaks, the direction is g's, the radii spread over (0, ε), and most
    coordinates start near x (mean |δ| ≈ 0.2·‖δ‖∞; a uniform start in the box gives 0.5 and ‖δ‖∞ ≈ ε)."""
    x = torch.rand(200, 3, 32, 32)
    common.seed_everything(3)
    delta = evaluate.paper_code_start(x, EPS)
    torch.manual_seed(3)
    g = torch.randn_like(x)
    u = torch.rand(len(x))
    top, where = delta.flatten(1).abs().max(1)
    torch.testing.assert_close(top, EPS * u, rtol=1e-6, atol=0)
    assert torch.equal(where, g.flatten(1).abs().argmax(1))
    direction = g.flatten(1) / g.flatten(1).abs().amax(1, keepdim=True)
    torch.testing.assert_close(delta.flatten(1) / (EPS * u[:, None]), direction, rtol=1e-5, atol=1e-6)
    radius = top / EPS
    assert radius.max() <= 1 and radius.min() < 0.05 and radius.max() > 0.95 and abs(radius.mean() - 0.5) < 0.06
    spread = delta.flatten(1).abs().mean(1) / top
    assert (spread < 0.3).all(), spread.max()


def reference_estimate(model, x, y, eps, alpha, steps, starts):
    """The released code's estimate written out plainly, in the inputs' dtype: for each restart (a start from
    `starts`), PGD that projects δ onto [0, 1] then [−ε, ε] before each forward, keeps per example the iterate of
    lowest −CE, steps δ − α·sign(∇(−CE)), then forwards x + δ_best again for the probabilities; then per example
    the restart of largest wrong-class probability (the first on a tie). Returns (loss, correct on it) and, to
    show that the test data tells the choices apart, the loss of the restart of highest CE instead and the number of
    (restart, example) pairs whose best iterate is not the last."""
    probs, not_last = [], 0
    for delta in starts:
        best_objective, best_delta = torch.full((len(y),), float("inf"), dtype=x.dtype), delta.clone()
        best_t = [0] * len(y)
        for t in range(steps + 1):
            delta = torch.clamp(torch.clamp(x + delta.detach(), 0, 1) - x, -eps, eps).requires_grad_(True)
            objective = -F.cross_entropy(model(x + delta), y, reduction="none")
            for b in range(len(y)):
                if objective[b] < best_objective[b]:
                    best_objective[b], best_delta[b], best_t[b] = objective[b].detach(), delta[b].detach(), t
            if t == steps:
                break
            (grad,) = torch.autograd.grad(objective.sum(), delta)
            delta = delta.detach() - alpha * grad.sign()
        not_last += sum(t < steps for t in best_t)
        with torch.no_grad():
            probs.append(torch.softmax(model(x + best_delta), dim=1))
    loss, correct, highest_ce = (torch.zeros(len(y), dtype=x.dtype), torch.zeros(len(y), dtype=torch.bool),
                                 torch.zeros(len(y), dtype=x.dtype))
    for b in range(len(y)):
        wrong = [max(p[b, c].item() for c in range(p.shape[1]) if c != y[b]) for p in probs]
        p = probs[wrong.index(max(wrong))][b]
        loss[b], correct[b] = -torch.log(p[y[b]] + 1e-12), p.argmax() == y[b]
        highest_ce[b] = -torch.log(min(p[b, y[b]] for p in probs) + 1e-12)
    return loss, correct, highest_ce, not_last


@pytest.mark.numerics
@pytest.mark.parametrize("batch_size,alpha,shows", [(24, 0.02, "restart-choice"), (10, 0.08, "best-iterate")])
def test_paper_code_metrics_equals_a_plain_reimplementation(trained, monkeypatch, batch_size, alpha, shows):
    """In float64 on the tiny CNN, from the same starts: paper_code_metrics gives reference_estimate's losses (to
    float32, capped_ce's precision) and correctness (exactly), whether the restarts run in chunks of two (batch 24)
    or one at a time over batches of 10, 10 and 4. With steps of 0.2·ε the restart of highest CE would give other
    losses; with steps of 0.8·ε some iterates overshoot, so the last one is not always the best."""
    model, x, y = trained
    model, x = model.double(), x.double()
    starts, start = [], evaluate.paper_code_start

    def recorded(x, eps):
        starts.append(start(x, eps))
        return starts[-1]
    monkeypatch.setattr(evaluate, "paper_code_start", recorded)
    eps, steps, restarts = 0.1, 4, 4
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            clean_ok = model(x).argmax(1) == y
        loss, ok = evaluate.paper_code_metrics(model, x, y, eps, alpha, steps, restarts, batch_size)
        assert len(starts) == -(-len(y) // batch_size)  # one draw per batch of images
        refs = [reference_estimate(model, x[i:i + batch_size], y[i:i + batch_size], eps, alpha, steps,
                                   s.view(restarts, -1, *x.shape[1:]))
                for i, s in zip(range(0, len(y), batch_size), starts)]
        expected, expected_ok, highest_ce = (torch.cat(parts) for parts in list(zip(*refs))[:3])
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(ok, expected_ok & clean_ok)
        assert 0 < int(ok.sum()) < len(y), "all or no example survives: weak test data"
        if shows == "restart-choice":
            assert (highest_ce - expected).abs().max() > 1e-2, "the highest-CE restart is the chosen one: weak data"
        else:
            assert sum(ref[3] for ref in refs) > 0, "every best iterate is the last one: weak test data"
    finally:
        model.float()


def test_restart_choice_is_the_most_probable_wrong_class_not_the_highest_ce():
    """most_wrong_restart on hand-made logits: restart 0 has the higher CE (p_y lowest, mass spread over the wrong
    classes), restart 1 the most probable wrong class; the released code keeps restart 1. A tie keeps the first."""
    y = torch.tensor([0, 0])
    spread = torch.tensor([-1.0] + [0.0] * 9)            # p_y ≈ 0.04, every wrong class ≈ 0.11
    peaked = torch.tensor([0.0, 3.0] + [-9.0] * 8)       # p_y ≈ 0.05, class 1 ≈ 0.95
    logits = torch.stack([torch.stack([spread, peaked]), torch.stack([peaked, spread])])  # (restarts, N, classes)
    ce = F.cross_entropy(logits.view(-1, 10), y.repeat(2), reduction="none").view(2, 2)
    assert ce[0, 0] > ce[1, 0] and ce[1, 1] > ce[0, 1]  # the highest CE is the spread one for both examples
    chosen = evaluate.most_wrong_restart(logits, y)
    assert torch.equal(chosen, torch.stack([peaked, peaked]))
    tie = torch.stack([torch.stack([peaked]), torch.stack([peaked + 1])])  # same probabilities
    assert torch.equal(evaluate.most_wrong_restart(tie, y[:1]), tie[0])


def test_every_forward_is_in_the_box_and_within_batch_size(trained):
    """Every input the network sees (start included) lies in [0, 1] and within ε of its image, and at most
    batch_size of them at once (10 images, batches of 4, 4, 2, 3 restarts: chunks of one, of two for the last)."""
    model, x, y = trained
    x = (x[:10] > 0.5).float()  # pixels at 0 and 1: an unprojected start or step leaves the box
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        common.seed_everything(0)
        evaluate.paper_code_metrics(model, x, y[:10], 0.1, 0.05, 3, 3, batch_size=4)
    finally:
        handle.remove()
    assert max(len(s) for s in seen) <= 4 and len(seen) == 2 * (3 * 4 + 1) + (2 * 4 + 1)  # 4 passes a chunk, clean
    for s in seen:
        assert s.min() >= 0 and s.max() <= 1
    attack = [s for s in seen if not any(torch.equal(s, x[i:i + len(s)]) for i in range(0, 10, 4))]
    assert all(((s.view(-1, 1, *x.shape[1:]) - x.view(1, 10, *x.shape[1:])).abs().amax((2, 3, 4)).min(1).values
                <= 0.1 + 1e-6).all() for s in attack)


def test_rerr_counts_the_given_clean_correctness(trained):
    """clean_ok from outside (flatness.py: the unperturbed model's) replaces the model's own clean predictions:
    correct = clean_ok & adversarially correct; the losses do not depend on it. Without it, the model's own."""
    model, x, y = trained
    settings = (EPS, 0.007, 3, 2, 16)
    with torch.no_grad():
        clean = model(x).argmax(1) == y

    def run(clean_ok):
        common.seed_everything(1)
        return evaluate.paper_code_metrics(model, x, y, *settings, clean_ok=clean_ok)
    loss_all, adv_ok = run(torch.ones_like(clean))
    loss_own, own = run(None)
    loss_given, given = run(~clean)
    assert adv_ok.any() and not adv_ok.all(), "weak test data"
    assert torch.equal(own, clean & adv_ok) and torch.equal(given, ~clean & adv_ok)
    assert not torch.equal(given, own)  # the given correctness is not the model's
    assert not run(torch.zeros_like(clean))[1].any()
    assert torch.equal(loss_all, loss_own) and torch.equal(loss_all, loss_given)


# ---------------------------------------------------------------------------------------------
# The command line and the API
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of ours: an untrained width-8 ResNet-18."""
    import train_at
    torch.manual_seed(0)
    model = common.ResNet18(width=8).eval()
    args = vars(train_at.parse_args(["--width", "8", "--device", "cpu"]))
    path = tmp_path_factory.mktemp("run") / "ckpt_last.pt"
    common.save_checkpoint(path, model=model.state_dict(), optimizer={}, scheduler={}, epoch=1, args=args,
                           rng=common.rng_state(), es_best=None, metrics={})
    return path


def hash_before_estimator(settings):
    """settings_hash as it was before --estimator existed: the settings without it (and without norm linf)."""
    kept = {k: v for k, v in settings.items() if k != "estimator" and not (k == "norm" and v == "linf")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def test_command_line_records_the_estimator_and_keeps_old_names(run_main, checkpoint, tiny_data, tmp_path):
    """--estimator paper-code: the settings say paper-code and ε 0.0314, non_default names both, the table says
    so, the numbers are paper_code_metrics's, and the file is another one than ours; ours keeps the name it had
    before the flag existed."""
    flags = [checkpoint, "--n-eval", "8", "--n-clean", "20", "--steps", "1", "--restarts", "2", "--no-autoattack",
             "--device", "cpu", "--data-dir", tiny_data, "--out", tmp_path]
    files = {}
    for estimator in evaluate.ESTIMATORS:
        code, out, err = run_main(evaluate, *flags, "--estimator", estimator)
        assert code == 0, err
        (path,) = re.findall(r"^wrote (.+)$", out, re.M)
        files[estimator] = (Path(path), json.loads(Path(path).read_text()), out)
    path, ours, _ = files["project"]
    assert ours["settings"]["estimator"] == "project" and ours["settings"]["epsilon"] == 8 / 255
    assert path.name.endswith(f"_last_{hash_before_estimator(ours['settings'])}.json")
    assert "estimator" not in ours["non_default"]
    path, theirs, out = files["paper-code"]
    assert theirs["settings"]["estimator"] == "paper-code" and theirs["settings"]["epsilon"] == 0.0314
    assert {"estimator", "epsilon"} <= set(theirs["non_default"])
    assert path.name.endswith(f"_last_{evaluate.settings_hash(theirs['settings'])}.json")
    assert path.name != files["project"][0].name
    assert "estimator paper-code, ε 0.03140" in out

    model, _ = evaluate.model_from_checkpoint(checkpoint, torch.device("cpu"))
    x, y = common.eval_split(tiny_data, "eval", 8, "cpu")
    _, clean_ok = common.clean_metrics(model, x, y)
    common.seed_everything(0)
    loss, ok = evaluate.paper_code_metrics(model, x, y, 0.0314, 0.007, 1, 2, 128, clean_ok=clean_ok)
    assert theirs["pgd"]["rloss"] == loss.double().mean().item() and theirs["pgd"]["rerr"] == int((~ok).sum()) / len(y)


def test_epsilon_default_follows_the_estimator_and_l2_is_refused(run_main, checkpoint):
    """ε 0.0314 under paper-code unless --epsilon is given; --norm l2, given or the checkpoint's, is one error."""
    ours = {"source": "ours", "args": {"norm": "linf"}}
    args = evaluate.resolve_threat(evaluate.parse_args(["-", "--estimator", "paper-code"]), ours)
    assert (args.epsilon, args.attack_step, args.norm) == (0.0314, 0.007, "linf")
    args = evaluate.resolve_threat(evaluate.parse_args(["-", "--estimator", "paper-code", "--epsilon", "8/255"]), ours)
    assert args.epsilon == 8 / 255
    assert evaluate.resolve_threat(evaluate.parse_args(["-"]), ours).epsilon == 8 / 255
    with pytest.raises(common.UsageError, match="paper-code is ℓ∞ only"):
        evaluate.resolve_threat(evaluate.parse_args(["-", "--estimator", "paper-code"]),
                                {"source": "ours", "args": {"norm": "l2"}})
    code, out, err = run_main(evaluate, checkpoint, "--estimator", "paper-code", "--norm", "l2", "--device", "cpu")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --estimator paper-code is ℓ∞ only") and "drop --norm l2" in err


def test_api_estimator_setting(trained):
    """robust_loss_error(estimator="paper-code"): paper_code_metrics's numbers, ε 0.0314 unless given, recorded in
    the settings; an unknown estimator or paper-code with norm l2 is one SettingError."""
    model, x, y = trained
    r = evaluate.robust_loss_error(model, x, y, estimator="paper-code", steps=2, restarts=2, seed=4)
    assert r.settings["estimator"] == "paper-code" and r.settings["epsilon"] == 0.0314
    common.seed_everything(4)
    loss, ok = evaluate.paper_code_metrics(model, x, y, 0.0314, 0.007, 2, 2, 128)
    assert torch.equal(r.losses, loss) and torch.equal(r.robust_ok, ok)
    given = evaluate.robust_loss_error(model, x, y, estimator="paper-code", epsilon=8 / 255, steps=0, restarts=1)
    assert given.settings["epsilon"] == 8 / 255
    assert evaluate.robust_loss_error(model, x, y, steps=0, restarts=1).settings["estimator"] == "project"
    for settings, message in (({"estimator": "paper"}, "estimator must be 'project' or 'paper-code', got 'paper'"),
                              ({"estimator": "paper-code", "norm": "l2"}, "estimator 'paper-code' is ℓ∞ only")):
        with pytest.raises(evaluate.SettingError, match=message) as e:
            evaluate.robust_loss_error(model, x, y, **settings)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
        assert str(e.value).startswith("evaluate.robust_loss_error: ")


# ---------------------------------------------------------------------------------------------
# flatness.py --estimator paper-code: the paper's two measures with the released code's estimator
# ---------------------------------------------------------------------------------------------
class Loud(nn.Module):
    """The model's logits × 1000: the wrong examples' CE far above the capped loss's ceiling of 27.63."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 1000 * self.model(x)


def test_flatness_paper_code_caps_the_loss_of_every_perturbed_model(trained):
    import flatness
    model, x, y = trained
    loud = Loud(model).eval()
    kw = dict(steps=2, ref_restarts=1)
    for measure, settings in ((flatness.average_case, dict(samples=2, xi=0.5)), (flatness.worst_case, dict(restarts=1,
                                                                                                          passes=2))):
        ours = measure(loud, x, y, **settings, **kw)
        theirs = measure(loud, x, y, estimator="paper-code", **settings, **kw)
        assert max(ours.values) > 28 and max(theirs.values) < 27.64 and theirs.reference < ours.reference
        assert theirs.settings["epsilon"] == EPS and theirs.settings["estimator"] == "paper-code"


def test_flatness_paper_code_counts_the_unperturbed_clean_predictions(trained, monkeypatch):
    """Every perturbed model's RErr (average case: paper_code_metrics; worst case: the joint ascent) is counted
    with the clean correctness of the unperturbed model; the joint ascent starts at paper_code_start."""
    import flatness
    model, x, y = trained
    _, clean_ok = common.clean_metrics(model, x, y)
    seen, real_metrics, real_start = [], evaluate.paper_code_metrics, evaluate.paper_code_start
    monkeypatch.setattr(flatness, "paper_code_metrics",
                        lambda m, *a, **k: seen.append((m, a[-1] if len(a) > 7 else None)) or real_metrics(m, *a, **k))
    flatness.average_case(model, x, y, estimator="paper-code", samples=2, steps=1, ref_restarts=1)
    perturbed = [ok for m, ok in seen if isinstance(m, flatness.Perturbed)]
    assert len(perturbed) == 2 and all(torch.equal(ok, clean_ok) for ok in perturbed)
    assert [ok for m, ok in seen if m is model] == [None]  # the reference: its own clean predictions
    starts, given = [], []
    monkeypatch.setattr(flatness, "paper_code_start", lambda x_, eps: starts.append(eps) or real_start(x_, eps))
    real_joint = flatness.joint_ascent
    monkeypatch.setattr(flatness, "joint_ascent", lambda *a, **k: given.append(k["clean_ok"]) or real_joint(*a, **k))
    w = flatness.worst_case(model, x, y, estimator="paper-code", restarts=2, passes=1, steps=1, ref_restarts=1)
    assert starts == [EPS, EPS] and len(given) == 2 and all(torch.equal(ok, clean_ok) for ok in given)
    ours = flatness.worst_case(model, x, y, restarts=2, passes=1, steps=1, ref_restarts=1)
    assert starts == [EPS, EPS] and w.values != ours.values


def test_flatness_cli_estimator(run_main, checkpoint, tiny_data, tmp_path):
    """--estimator paper-code: recorded with ε 0.0314 and named by its own hash; ours keeps its old file names;
    only the paper's two measures and ℓ∞ take it."""
    import shutil
    import flatness
    ckpt = tmp_path / "ckpt_last.pt"
    shutil.copy(checkpoint, ckpt)
    flags = [ckpt, "--mode", "both", "--n-eval", "8", "--steps", "1", "--ref-restarts", "1", "--samples", "1",
             "--restarts", "1", "--passes", "1", "--device", "cpu", "--data-dir", tiny_data]
    files = {}
    for estimator in evaluate.ESTIMATORS:
        code, out, err = run_main(flatness, *flags, "--estimator", estimator)
        assert code == 0, err
        files[estimator] = [Path(p) for p in re.findall(r"^wrote (.+)$", out, re.M)]
    for path in files["project"]:
        r = json.loads(path.read_text())
        assert path.name.endswith(f"_last_{hash_before_estimator(r['settings'])}.json") and "estimator" not in r["non_default"]
    for path in files["paper-code"]:
        r = json.loads(path.read_text())
        assert r["settings"]["estimator"] == "paper-code" and r["settings"]["epsilon"] == 0.0314
        assert {"estimator", "epsilon"} <= set(r["non_default"]) and path not in files["project"]
    for extra, message in ((["--mode", "adaptive-worst"], "it needs --mode average, worst or both"),
                           (["--norm", "l2"], "paper-code is ℓ∞ only")):
        code, out, err = run_main(flatness, ckpt, "--estimator", "paper-code", *extra)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
