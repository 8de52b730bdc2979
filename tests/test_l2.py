"""The ℓ2 threat model (--norm l2; README "Conventions", "train_at.py", "evaluate.py", "flatness.py", "plots.py"):
every training script's attack, its per-epoch test and early-stopping metrics run in the ℓ2 ball with the ℓ2
defaults (ε 128/255, step 15/255, 10 steps); evaluate.py and flatness.py take the checkpoint's norm and record it,
AutoAttack runs its L2 version, the worst case's joint ascent keeps δ in the ℓ2 ball, plots.py never draws two norms
in one figure or Table 1; checkpoints and results from before --norm read as ℓ∞ (and keep their file names)."""
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import common
import evaluate
import flatness
import plots
import train_at
import train_awp
import train_mart
import train_misc
import train_trades
from conftest import TINY, fit, separable_data

CPU = torch.device("cpu")
L2_EPS, L2_STEP = 128 / 255, 15 / 255
MODULES = {"at": train_at, "trades": train_trades, "mart": train_mart, "awp": train_awp}


def l2_norms(delta):
    return delta.flatten(1).norm(dim=1)


def test_threat_defaults_fill_only_what_was_not_given():
    for module in MODULES.values():
        a = module.parse_args(["--norm", "l2"])
        assert (a.norm, a.epsilon, a.attack_step, a.attack_steps) == ("l2", L2_EPS, L2_STEP, 10)
        a = module.parse_args([])
        assert (a.norm, a.epsilon, a.attack_step, a.attack_steps) == ("linf", 8 / 255, 0.007, 7)
        a = module.parse_args(["--norm", "l2", "--epsilon", "0.25", "--attack-steps", "3"])
        assert (a.epsilon, a.attack_step, a.attack_steps) == (0.25, L2_STEP, 3)
    a = train_misc.parse_args(["--method", "rotation", "--norm", "l2"])
    assert (a.epsilon, a.attack_step, a.attack_steps) == (L2_EPS, L2_STEP, 10)


# ---------------------------------------------------------------------------------------------
# Training: --norm l2 reaches every attack and the per-epoch metrics
# ---------------------------------------------------------------------------------------------
class Recorder:
    """Wraps a function; records its bound arguments (defaults applied) per call."""

    def __init__(self, real):
        self.real, self.calls = real, []
        self.signature = inspect.signature(real)

    def __call__(self, *a, **kw):
        bound = self.signature.bind(*a, **kw)
        bound.apply_defaults()
        out = self.real(*a, **kw)
        self.calls.append({**bound.arguments, "out": out})
        return out


SCRIPTS = {"at": (train_at, []), "trades": (train_trades, []), "mart": (train_mart, []), "awp": (train_awp, []),
           "rotation": (train_misc, ["--method", "rotation"]), "entropy-sgd": (train_misc, ["--method", "entropy-sgd"]),
           "pgd-tau": (train_misc, ["--method", "pgd-tau", "--tau", "20"])}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_training_script_attacks_in_the_l2_ball_with_the_l2_defaults(name, tiny_data, tmp_path, monkeypatch):
    """One epoch of main() with --norm l2 and nothing else of the attack: every training attack (common.pgd, or
    PGD-τ) gets norm l2, ε 128/255, step 15/255 and 10 steps and returns δ inside the ℓ2 ball; the test and
    early-stopping metrics run under l2; the checkpoint and args.json record it."""
    module, extra = SCRIPTS[name]
    pgd, metrics = Recorder(common.pgd), Recorder(common.epoch_metrics)
    monkeypatch.setattr(common, "pgd", pgd)
    monkeypatch.setattr(common, "epoch_metrics", metrics)
    tau = Recorder(train_misc.pgd_tau)
    monkeypatch.setattr(train_misc, "pgd_tau", tau)
    out = tmp_path / "run"
    module.main([*TINY, "--data-dir", str(tiny_data), "--train-subset", "100", "--epochs", "1", "--norm", "l2",
                 *extra, "--out", str(out)])
    training = [c for c in pgd.calls if c["steps"] != 7] + tau.calls  # (the per-epoch metrics' PGD-7 apart)
    assert training and len(training) >= 2
    for c in training:
        assert (c["norm"], c["eps"], c["alpha"], c["steps"]) == ("l2", L2_EPS, L2_STEP, 10), name
        delta = c["out"][0]
        assert l2_norms(delta).max() <= L2_EPS + 1e-5 and l2_norms(delta).max() > 8 / 255, name
    assert {c["prefix"]: c["norm"] for c in metrics.calls} == {"test_": "l2", "es_": "l2"}
    assert all(c["norm"] == "l2" and c["eps"] == L2_EPS for c in pgd.calls if c["steps"] == 7)  # their PGD-7
    assert evaluate.load_checkpoint(out / "ckpt_last.pt")["args"]["norm"] == "l2"
    assert json.loads((out / "args.json").read_text())["norm"] == "l2"


def test_pgd_tau_starts_and_steps_in_the_l2_ball():
    """PGD-τ (train_misc.py --method pgd-tau) with common.pgd's ℓ2 start and step: δ within ‖δ‖₂ ≤ ε (an ℓ∞ start
    or step of 0.3 on 3×8×8 inputs would leave it), the start too (0 steps), on the sphere after steps that large;
    ℓ∞ unchanged: in the box."""
    torch.manual_seed(0)
    model = common.ResNet18(width=4).eval()
    x, y = separable_data(16, seed=3)
    start, _ = train_misc.pgd_tau(model, x, y, 0.5, 0.3, 0, tau=10, norm="l2")
    assert l2_norms(start).max() <= 0.5 + 1e-5 and l2_norms(start).max() > 0
    delta, _ = train_misc.pgd_tau(model, x, y, 0.5, 0.3, 4, tau=10, norm="l2")
    norms = l2_norms(delta)
    assert norms.max() <= 0.5 + 1e-5 and norms.min() > 0.3
    delta, _ = train_misc.pgd_tau(model, x, y, 0.5, 0.3, 4, tau=10)
    assert delta.abs().max() <= 0.5 + 1e-6 and l2_norms(delta).max() > 1.0


# ---------------------------------------------------------------------------------------------
# evaluate.py and flatness.py: the checkpoint's norm, recorded
# ---------------------------------------------------------------------------------------------
def save_ours(path, model, *flags, drop=()):
    """A checkpoint of ours trained with `flags` (keys of args in `drop` removed: a checkpoint from before them)."""
    args = {k: v for k, v in vars(train_at.parse_args(["--width", "8", "--device", "cpu", *flags])).items()
            if k not in drop}
    path.parent.mkdir(parents=True, exist_ok=True)
    common.save_checkpoint(path, model=model.state_dict(), optimizer={}, scheduler={}, epoch=3, args=args,
                           rng=common.rng_state(), es_best=None, metrics={})
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    model = common.ResNet18(width=8).eval()
    folder = tmp_path_factory.mktemp("ckpts")
    return {"l2": save_ours(folder / "l2" / "ckpt_last.pt", model, "--norm", "l2"),
            "old": save_ours(folder / "old" / "ckpt_last.pt", model, drop=("norm",))}


QUICK = ["--n-eval", "10", "--n-clean", "20", "--steps", "2", "--restarts", "1", "--device", "cpu"]


def wrote(stdout):
    return [Path(p) for p in re.findall(r"^wrote (.+)$", stdout, re.M)]


def test_evaluate_takes_the_checkpoints_norm_and_records_it(checkpoints, tiny_data, monkeypatch, capsys):
    metrics = Recorder(common.robust_metrics)
    monkeypatch.setattr(common, "robust_metrics", metrics)
    evaluate.main([str(checkpoints["l2"]), *QUICK, "--no-autoattack", "--data-dir", str(tiny_data)])
    (path,) = wrote(capsys.readouterr().out)
    s = json.loads(path.read_text())
    assert (s["settings"]["norm"], s["settings"]["epsilon"], s["settings"]["attack_step"]) == ("l2", L2_EPS, L2_STEP)
    assert "norm" not in s["non_default"] and "epsilon" not in s["non_default"]  # the ℓ2 protocol's values
    assert s["settings_hash"] == evaluate.settings_hash(s["settings"]) and s["settings_hash"] in path.name
    assert [(c["norm"], c["eps"]) for c in metrics.calls] == [("l2", L2_EPS)]
    # --norm linf on the same checkpoint: measured under ℓ∞, in a file of its own
    evaluate.main([str(checkpoints["l2"]), *QUICK, "--no-autoattack", "--norm", "linf", "--data-dir", str(tiny_data)])
    (other,) = wrote(capsys.readouterr().out)
    assert other != path and json.loads(other.read_text())["settings"]["epsilon"] == 8 / 255
    assert metrics.calls[-1]["norm"] == "linf"


def test_a_checkpoint_from_before_norm_is_measured_as_linf(checkpoints, tiny_data, capsys):
    evaluate.main([str(checkpoints["old"]), *QUICK, "--no-autoattack", "--data-dir", str(tiny_data)])
    (path,) = wrote(capsys.readouterr().out)
    s = json.loads(path.read_text())["settings"]
    assert (s["norm"], s["epsilon"], s["attack_step"]) == ("linf", 8 / 255, 0.007)
    flatness.main([str(checkpoints["old"]), "--mode", "average", "--n-eval", "10", "--steps", "1", "--ref-restarts",
                   "1", "--samples", "1", "--device", "cpu", "--data-dir", str(tiny_data)])
    (path,) = wrote(capsys.readouterr().out)
    assert json.loads(path.read_text())["settings"]["norm"] == "linf"


def test_a_result_from_before_norm_keeps_its_name_and_is_found(checkpoints, tiny_data, tmp_path, capsys):
    """An ℓ∞ result written before --norm (no `norm` in its settings) has the name an ℓ∞ result has now: the same
    command finds it ("done:") instead of measuring again; plots.py reads it as ℓ∞."""
    flags = [str(checkpoints["old"]), *QUICK, "--no-autoattack", "--seed", "9", "--data-dir", str(tiny_data)]
    evaluate.main(flags)
    (path,) = wrote(capsys.readouterr().out)
    result = json.loads(path.read_text())
    del result["settings"]["norm"]  # as written before --norm
    path.write_text(json.dumps(result))
    assert evaluate.settings_hash(result["settings"]) == result["settings_hash"]
    evaluate.main(flags)
    assert capsys.readouterr().out == f"done: {path} (same settings; --force re-measures)\n"
    entry = plots.load_result(path, plots.Log())
    assert entry["norm"] == "linf" and entry["settings"]["norm"] == "linf"
    l2 = {**result["settings"], "norm": "l2"}
    assert evaluate.settings_hash(l2) != result["settings_hash"]  # ℓ2 results are named apart


def test_flatness_takes_the_checkpoints_norm_for_every_measure(checkpoints, tiny_data, monkeypatch, capsys):
    """Reference, average case (PGD on each perturbed model), worst case (the joint ascent's δ) and the landscape
    under ℓ2; every result records it but the Hessian's (clean CE: no threat model)."""
    metrics, ascent, pgd = Recorder(common.robust_metrics), Recorder(flatness.joint_ascent), Recorder(common.pgd)
    monkeypatch.setattr(common, "robust_metrics", metrics)
    monkeypatch.setattr(flatness, "joint_ascent", ascent)
    monkeypatch.setattr(common, "pgd", pgd)
    base = [str(checkpoints["l2"]), "--n-eval", "10", "--steps", "1", "--ref-restarts", "1", "--device", "cpu",
            "--data-dir", str(tiny_data)]
    flatness.main([*base, "--mode", "both", "--samples", "1", "--restarts", "1", "--passes", "1"])
    flatness.main([*base, "--mode", "landscape", "--directions", "1", "--points", "2", "--n-landscape", "10",
                   "--landscape-steps", "1", "--adversarial-passes", "1"])
    flatness.main([*base, "--mode", "hessian", "--n-hessian", "10", "--hessian-iters", "2"])
    files = {json.loads(p.read_text())["settings"]["mode"]: json.loads(p.read_text())
             for p in wrote(capsys.readouterr().out)}
    for mode in ("average", "worst", "landscape"):
        s = files[mode]["settings"]
        assert (s["norm"], s["epsilon"], s["attack_step"]) == ("l2", L2_EPS, L2_STEP), mode
        assert "norm" not in files[mode]["non_default"], mode
    assert "norm" not in files["hessian"]["settings"]
    assert metrics.calls and all((c["norm"], c["eps"]) == ("l2", L2_EPS) for c in metrics.calls)
    assert ascent.calls and all(c["norm"] == "l2" for c in ascent.calls if c["attack_inputs"])
    assert pgd.calls and all(c["norm"] == "l2" for c in pgd.calls)  # PGD of every measure, the landscape's included


def test_the_joint_ascent_keeps_delta_in_the_l2_ball(monkeypatch):
    """Worst case under ℓ2 (flatness.worst_case_restarts): δ starts and steps as common.pgd's ℓ2 (the start is
    projected away by the first step, so it is checked by its call), the final δ of every restart lies in
    ‖δ‖₂ ≤ ε, on the sphere after steps that large (an ℓ∞ step would leave the ball: a 0.2 sign step on 3×8×8
    inputs is ‖·‖₂ 2.8), and the API records the norm."""
    start, step = Recorder(common.random_start), Recorder(common.ascent_step)
    monkeypatch.setattr(common, "random_start", start)
    monkeypatch.setattr(common, "ascent_step", step)
    torch.manual_seed(0)
    model = common.ResNet18(width=4)
    x, y = separable_data(64, seed=1)
    fit(model, x, y, steps=10, batch_size=32)
    deltas = []
    flatness.worst_case_restarts(model, x[:20], y[:20], xi=0.001, restarts=2, passes=2, batch_size=8, eps=0.4,
                                 alpha=0.2, seed=1, on_restart=lambda nus, d: deltas.append(d.clone()), norm="l2")
    for d in deltas:
        assert l2_norms(d).max() <= 0.4 + 1e-5 and l2_norms(d).median() > 0.3
    assert len(start.calls) == 2 and len(step.calls) == 2 * 2 * 3  # restarts; restarts × passes × batches
    assert all(c["norm"] == "l2" and c["eps"] == 0.4 for c in start.calls + step.calls)
    w = flatness.worst_case(model, x[:10], y[:10], restarts=1, passes=1, steps=1, ref_restarts=1, norm="l2")
    assert (w.settings["norm"], w.settings["epsilon"], w.settings["attack_step"]) == ("l2", L2_EPS, L2_STEP)
    r = evaluate.robust_loss_error(model, x[:10], y[:10], steps=1, restarts=1, norm="l2")
    assert (r.settings["norm"], r.settings["epsilon"]) == ("l2", L2_EPS)


# ---------------------------------------------------------------------------------------------
# AutoAttack's L2 version
# ---------------------------------------------------------------------------------------------
def test_autoattack_runs_its_l2_version(checkpoints, tiny_data, monkeypatch, capsys):
    """evaluate.py on an ℓ2 checkpoint builds AutoAttack with norm 'L2' and ε 128/255 (a spy on the package's
    class); --aa-version paper under L2 has standard L2's parameters without Square; x_adv stays in the ℓ2 ball."""
    import pyautoattack
    built = []

    class Spy(pyautoattack.AutoAttack):
        def __init__(self, model, **kwargs):
            built.append(kwargs)
            super().__init__(model, **kwargs)
    monkeypatch.setattr(pyautoattack, "AutoAttack", Spy)
    evaluate.main([str(checkpoints["l2"]), *QUICK, "--data-dir", str(tiny_data), "--aa-version", "paper"])
    (path,) = wrote(capsys.readouterr().out)
    aa = json.loads(path.read_text())["autoattack"]
    assert [(k["norm"], k["eps"]) for k in built] == [("L2", L2_EPS)]
    assert aa["max_l2"] <= L2_EPS + 1e-5
    model = common.ResNet18(width=8).eval()
    std, _, _ = evaluate.make_autoattack(model, L2_EPS, "standard", "cpu", 0, norm="l2")
    paper, _, _ = evaluate.make_autoattack(model, L2_EPS, "paper", "cpu", 0, norm="l2")
    assert std.norm == paper.norm == "L2" and std.apgd.norm == "L2"
    for attack in ("apgd", "apgd_targeted", "fab"):
        settings = [{k: v for k, v in vars(getattr(a, attack)).items() if not callable(v) and k != "logger"}
                    for a in (paper, std)]
        assert settings[0] == settings[1], attack


# ---------------------------------------------------------------------------------------------
# plots.py: one norm per figure set
# ---------------------------------------------------------------------------------------------
def test_plots_never_mix_norms(tmp_path, monkeypatch):
    """ℓ∞ and ℓ2 runs in one folder: by default the figures, Table 1 and the correlations are the ℓ∞ runs' (the
    paper's), each figure names the ℓ2 runs as left out; --norm l2 draws the ℓ2 runs alone, their plain AT run
    (ε 128/255, PGD-10: the ℓ2 defaults) the baseline labelled "AT"; an ℓ2 evaluation of an ℓ∞ run is skipped.
    A run from before --norm is ℓ∞."""
    from test_plots import BASE_ARGS, eval_file, flat_value, metrics_lines, write
    monkeypatch.setattr(plots, "SAVE", dict(plots.SAVE))  # main() sets the figures' norm there
    root = tmp_path / "runs"
    l2_args = {"norm": "l2", "epsilon": L2_EPS, "attack_step": L2_STEP, "attack_steps": 10}
    runs = {"at": ({}, (), 0.60), "wd": ({"wd": 0.05}, (), 0.55),
            "trades": ({"method": "trades", "beta": 6.0}, (), 0.58),
            "at_l2": (l2_args, ("--norm", "l2"), 0.30), "wd_l2": ({**l2_args, "wd": 0.05}, ("--norm", "l2"), 0.28),
            "trades_l2": ({**l2_args, "method": "trades", "beta": 6.0}, ("--norm", "l2"), 0.29)}
    for i, (name, (extra, flags, rerr)) in enumerate(runs.items()):
        d = root / name
        d.mkdir(parents=True)
        write(d / "args.json", {**BASE_ARGS, **extra})  # BASE_ARGS has no norm: a run from before --norm
        (d / "metrics.jsonl").write_text(metrics_lines())
        eval_file(d, "ckpt_last.pt", rerr, 2.0 + i / 10, rerr - 0.1, flags=flags)
        eval_file(d, "ckpt_best.pt", rerr - 0.05, 1.5 + i / 10, None, epoch=60, flags=flags)
        flat_value(d, "ckpt_last.pt", "average", 1.0 + i / 10, 2.0, flags=flags)
        flat_value(d, "ckpt_last.pt", "worst", 0.1 + i / 100, 2.0, flags=flags)
    eval_file(root / "at", "ckpt_last.pt", 0.99, 9.9, flags=("--norm", "l2"))  # ℓ2 robustness of an ℓ∞ run

    linf = plots.main([str(root), "--out", str(tmp_path / "linf"), "--formats", "png", "--dpi", "40"])
    l2 = plots.main([str(root), "--norm", "l2", "--out", str(tmp_path / "l2"), "--formats", "png", "--dpi", "40"])
    for summary, norm, mine, other in ((linf, "linf", {"at", "wd", "trades"}, {"at_l2", "wd_l2", "trades_l2"}),
                                       (l2, "l2", {"at_l2", "wd_l2", "trades_l2"}, {"at", "wd", "trades"})):
        assert summary["norm"] == norm and {r["run"] for r in summary["runs"]} == mine
        assert set(summary["other_norm"]) == other
        for figure in ("fig1", "fig5", "fig8"):  # in summary.json and in the line the caption shows
            assert other <= set(summary["left_out"][figure]), (norm, figure)
            (line,) = [line for line in summary["skipped"] if line.startswith(f"{figure}: ")]
            assert all(run in line for run in other) and "plots.py --norm" in line, line
        table = json.loads((tmp_path / norm / "table1.json").read_text())
        assert {r["run"] for r in table["rows"]} == mine and table["norm"] == norm
        assert json.loads((tmp_path / norm / "correlations.json").read_text())["norm"] == norm
        (base,) = [r for r in summary["runs"] if r["baseline"]]
        assert base["run"] == ("at" if norm == "linf" else "at_l2") and base["label"] == "AT"
    assert next(r for r in linf["runs"] if r["run"] == "at")["last"]["rloss"] == pytest.approx(2.0)  # not 9.9
    assert any("measured under --norm l2" in line for line in linf["skipped"])
    assert "Threat model: ℓ2" in (tmp_path / "l2" / "table1.md").read_text()
