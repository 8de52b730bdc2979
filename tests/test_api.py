"""The Python API (README "Python API"): flatness.average_case / worst_case and evaluate.robust_loss_error on a
plain nn.Module that is not ours (a Sequential CNN with its own normalisation, [0, 1] inputs). They give the
numbers of the functions the measures are built from, the command lines give the API's numbers (they call it),
the model comes back bit-identical with its modes and requires_grad flags, and a bad setting or input is one
SettingError (a ValueError, and one `error:` line from a command line)."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import common
import evaluate
import flatness
from conftest import fit, separable_data

SIZE = 8  # 8×8 images: the tiny CNN runs the paper's default settings in seconds


class Normalise(nn.Module):
    """A torchvision-style model's own input normalisation (not common.Normalize)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def plain_cnn():
    return nn.Sequential(Normalise((0.4, 0.5, 0.6), (0.3, 0.25, 0.2)),
                         nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def plain():
    """The plain CNN after 60 Adam steps (so the measures are not all ln 10) and 30 held-out images."""
    torch.manual_seed(0)
    model = plain_cnn()
    x, y = separable_data(300, seed=1, size=SIZE)
    fit(model, x, y, steps=60, batch_size=50)
    xt, yt = separable_data(30, seed=2, size=SIZE)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() >= 0.5, "the fixture model did not learn"
    return model, xt, yt


def state_of(model):
    """Everything the API must leave alone: tensors, per-module modes, requires_grad, gradients."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()])


def assert_same_state(model, before):
    tensors, modes, flags, grads = before
    now = model.state_dict()
    assert set(now) == set(tensors) and all(torch.equal(now[k], tensors[k]) for k in tensors), "weights changed"
    assert [m.training for m in model.modules()] == modes, "train/eval modes not restored"
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad not restored"
    assert all(p.grad is None for p in model.parameters()) and grads == [None] * len(grads), "gradients left behind"


# ---------------------------------------------------------------------------------------------
# The API gives the numbers of the functions the measures are made of
# ---------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_api_equals_the_internal_functions(plain):
    model, x, y = plain
    model.eval()
    r = evaluate.robust_loss_error(model, x, y, steps=3, restarts=2, seed=4)
    common.seed_everything(4)
    losses, ok = common.robust_metrics(model, x, y, 8 / 255, 0.007, 3, 2, 128)
    assert r.rloss == losses.double().mean().item() and torch.equal(r.losses, losses)
    assert r.rerr == r.pgd["rerr"] == int((~ok).sum()) / len(y) and torch.equal(r.robust_ok, ok)
    assert r.autoattack is None and r.pgd["n"] == len(y)

    avg = flatness.average_case(model, x, y, samples=3, steps=3, ref_restarts=2, seed=5)
    ref, ref_err = flatness.reference(model, x, y, "robust", 8 / 255, 0.007, 3, 2, 128, 5)
    draws, errs = flatness.average_case_draws(model, x, y, 0.5, 3, "robust", 8 / 255, 0.007, 3, 1, 128, 5)
    assert (avg.reference, avg.reference_err) == (ref, ref_err)
    assert avg.values == draws.tolist() and avg.errs == errs.tolist()
    assert avg.value == draws.mean().item() - ref and avg.value > 0  # ξ = 0.5 hurts a trained model
    assert avg.value_std == pytest.approx(draws.double().std().item())

    worst = flatness.worst_case(model, x, y, xi=0.01, restarts=2, passes=3, joint_batch_size=16, steps=3,
                                ref_restarts=2, seed=6)
    ref, ref_err = flatness.reference(model, x, y, "robust", 8 / 255, 0.007, 3, 2, 128, 6)
    restarts, errs = flatness.worst_case_restarts(model, x, y, 0.01, 2, "robust", 3, 0.01, 16, seed=6)
    assert (worst.reference, worst.values, worst.errs) == (ref, restarts.tolist(), errs.tolist())
    assert worst.value == restarts.max().item() - ref

    given = flatness.average_case(model, x, y, reference=(1.0, 0.5), samples=3, steps=3, seed=5)
    assert (given.reference, given.reference_err, given.values) == (1.0, 0.5, avg.values)  # the caller's reference


def test_defaults_are_the_papers_settings(plain):
    """Without settings: ξ = 0.5, 10 draws (50 for clean CE), ξ = 0.00075, 10 restarts × 20 passes, PGD-20 × 10
    restarts for the references and RLoss, ε = 8/255, step 0.007 (paper §3.3, §4, Table 1)."""
    model, x, y = plain
    x, y = x[:10], y[:10]
    avg, worst = flatness.average_case(model, x, y), flatness.worst_case(model, x, y)
    pgd = {"steps": 20, "ref_restarts": 10, "norm": "linf", "epsilon": 8 / 255, "attack_step": 0.007, "batch_size": 128,
           "seed": 0, "estimator": "project"}
    assert avg.settings == {"xi": 0.5, "samples": 10, "loss": "robust", "restarts_perturbed": 1, **pgd}
    assert worst.settings == {"xi": 0.00075, "restarts": 10, "loss": "robust", "passes": 20, "weight_step": 0.01,
                              "per_batch": False, "joint_batch_size": 128, **pgd}
    assert len(avg.values) == 10 and len(worst.values) == 10
    clean = flatness.average_case(model, x, y, loss="clean")
    assert clean.settings["samples"] == 50 and len(clean.values) == 50
    r = evaluate.robust_loss_error(model, x, y)
    assert r.settings == {"norm": "linf", "epsilon": 8 / 255, "attack_step": 0.007, "steps": 20, "restarts": 10,
                          "batch_size": 128, "seed": 0, "estimator": "project", "autoattack": None}
    assert r.rloss == pytest.approx(avg.reference, rel=1e-6)  # the same PGD-20 × 10 estimator and seed (fp64 mean)


# ---------------------------------------------------------------------------------------------
# The model comes back as it was
# ---------------------------------------------------------------------------------------------
def test_weights_modes_and_flags_untouched(plain):
    """A model in train mode with one BN in eval mode and a frozen layer, called inside torch.no_grad(): every
    measure runs (in eval mode) and leaves weights, BN statistics, modes and requires_grad as they were."""
    model, x, y = plain
    model.train()
    model[2].eval()
    model[1].weight.requires_grad_(False)
    try:
        before = state_of(model)
        with torch.no_grad():
            evaluate.robust_loss_error(model, x, y, steps=2, restarts=1)
            assert_same_state(model, before)
            flatness.average_case(model, x, y, samples=2, steps=2, ref_restarts=1)
            assert_same_state(model, before)
            flatness.worst_case(model, x, y, restarts=1, passes=2, steps=2, ref_restarts=1, joint_batch_size=16)
            assert_same_state(model, before)
            flatness.worst_case(model, x, y, loss="clean", restarts=1, passes=2, ref_restarts=1)
        assert_same_state(model, before)
        assert model.training and not model[2].training
    finally:
        model[1].weight.requires_grad_(True)
        model.eval()


# ---------------------------------------------------------------------------------------------
# The command lines call the API
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A checkpoint of ours (a width-8 ResNet-18) for the command lines."""
    import train_at
    torch.manual_seed(3)
    model = common.ResNet18(width=8).eval()
    args = vars(train_at.parse_args(["--width", "8", "--device", "cpu"]))
    path = tmp_path_factory.mktemp("run") / "ckpt_last.pt"
    common.save_checkpoint(path, model=model.state_dict(), optimizer={}, scheduler={}, epoch=2, args=args,
                           rng=common.rng_state(), es_best=None, metrics={})
    return path


def spy(monkeypatch, module, name):
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_command_lines_call_the_api_and_give_its_numbers(ours, tiny_data, monkeypatch, capsys):
    n = 20
    evals = spy(monkeypatch, evaluate, "robust_loss_error")
    evaluate.main([str(ours), "--n-eval", str(n), "--n-clean", "20", "--steps", "2", "--restarts", "2",
                   "--no-autoattack", "--seed", "3", "--device", "cpu", "--data-dir", str(tiny_data)])
    avgs, worsts = spy(monkeypatch, flatness, "average_case"), spy(monkeypatch, flatness, "worst_case")
    flatness.main([str(ours), "--mode", "both", "--n-eval", str(n), "--steps", "2", "--ref-restarts", "2",
                   "--samples", "2", "--restarts", "2", "--passes", "2", "--seed", "3", "--device", "cpu",
                   "--data-dir", str(tiny_data)])
    files = {json.loads(Path(p).read_text())["settings"]["mode"]: json.loads(Path(p).read_text())
             for p in re.findall(r"^wrote (.+)$", capsys.readouterr().out, re.M)}
    assert len(evals) == len(avgs) == len(worsts) == 1
    assert {k: evals[0][k] for k in ("steps", "restarts", "seed", "autoattack")} == \
        {"steps": 2, "restarts": 2, "seed": 3, "autoattack": None}
    assert (avgs[0]["samples"], worsts[0]["restarts"], worsts[0]["passes"]) == (2, 2, 2)

    model, _ = evaluate.model_from_checkpoint(ours, torch.device("cpu"))
    x, y = common.eval_split(tiny_data, "eval", n, "cpu")
    r = evaluate.robust_loss_error(model, x, y, steps=2, restarts=2, seed=3)
    assert files["eval"]["pgd"]["rloss"] == r.rloss and files["eval"]["pgd"]["rerr"] == r.rerr
    avg = flatness.average_case(model, x, y, samples=2, steps=2, ref_restarts=2, seed=3)
    worst = flatness.worst_case(model, x, y, restarts=2, passes=2, steps=2, ref_restarts=2, seed=3)
    for mode, m in (("average", avg), ("worst", worst)):
        got = files[mode]
        assert (got["value"], got["reference"], got["values"], got["errs"]) == (m.value, m.reference, m.values, m.errs)


# ---------------------------------------------------------------------------------------------
# Bad settings and inputs: one clear error
# ---------------------------------------------------------------------------------------------
BAD = [(flatness.average_case, {"xi": -0.1}, "xi must be a number >= 0"),
       (flatness.average_case, {"samples": 0}, "samples must be an integer >= 1"),
       (flatness.average_case, {"samples": 2.5}, "samples must be an integer >= 1"),
       (flatness.average_case, {"loss": "hinge"}, "loss must be 'robust' or 'clean'"),
       (flatness.average_case, {"eps": 0.03}, "unknown setting 'eps'"),
       (flatness.average_case, {"reference": 1.2}, "reference must be None or a pair"),
       (flatness.worst_case, {"passes": 0}, "passes must be an integer >= 1"),
       (flatness.worst_case, {"weight_step": -1}, "weight_step must be a number >= 0"),
       (flatness.worst_case, {"per_batch": "yes"}, "per_batch must be True or False"),
       (flatness.worst_case, {"epsilon": 8}, r"epsilon must be in \(0, 1\]"),
       (flatness.worst_case, {"restarts_perturbed": 1}, "unknown setting 'restarts_perturbed'"),
       (evaluate.robust_loss_error, {"restarts": 0}, "restarts must be an integer >= 1"),
       (evaluate.robust_loss_error, {"steps": -1}, "steps must be an integer >= 0"),
       (evaluate.robust_loss_error, {"attack_step": 0}, "attack_step must be > 0"),
       (evaluate.robust_loss_error, {"batch_size": 0}, "batch_size must be an integer >= 1"),
       (evaluate.robust_loss_error, {"autoattack": "fast"}, "autoattack must be None, 'standard' or 'paper'"),
       (evaluate.robust_loss_error, {"xi": 0.5}, "unknown setting 'xi'")]


@pytest.mark.parametrize("function,settings,message", BAD, ids=[f"{f.__name__}-{next(iter(s))}" for f, s, _ in BAD])
def test_bad_settings_are_one_error(plain, function, settings, message):
    model, x, y = plain
    with pytest.raises(evaluate.SettingError, match=message) as e:
        function(model, x, y, **settings)
    assert isinstance(e.value, ValueError) and isinstance(e.value, common.UsageError)
    assert "\n" not in str(e.value) and str(e.value).startswith(function.__module__ + "." + function.__name__)


@pytest.mark.parametrize("inputs,message", [
    (lambda x, y: (x * 255, y), r"x must be in \[0, 1\]"),
    (lambda x, y: (x, y.float()), "y must be a 1-D tensor of integer class labels"),
    (lambda x, y: (x, y[:-1]), "the same number"),
    (lambda x, y: (x.numpy(), y), "x and y must be tensors"),
    (lambda x, y: (x.long(), y), "x must be float images")], ids=["range", "float-labels", "lengths", "numpy", "int"])
def test_bad_inputs_are_one_error(plain, inputs, message):
    model, x, y = plain
    bad_x, bad_y = inputs(x, y)
    for function in (flatness.average_case, flatness.worst_case, evaluate.robust_loss_error):
        with pytest.raises(evaluate.SettingError, match=message):
            function(model, bad_x, bad_y)
    with pytest.raises(evaluate.SettingError, match="must be a torch.nn.Module"):
        flatness.average_case(lambda t: t, x, y)
