"""plots.py's measures table on generated run folders: a row per flatness measure (flatness.py's new modes
included) and per baseline with the right n; a measure built monotone in test RLoss has Kendall τ = Spearman
ρ = 1, an anti-monotone one −1; Kendall's exact p-value equals an enumeration; the granulated Kendall coefficient
(Jiang et al., ICLR 2020, Eq. 4–5) equals a hand computation on a designed grid; a measure's checkpoints are never
mixed across settings (the most common one is kept, the others named); an unknown mode is skipped with a line;
measures.csv parses and fig_measures is written. Evaluations are written by evaluate.py's own functions; the
flatness results by hand in the format flatness.py writes (README "Result files")."""
import csv
import itertools
import json

import numpy as np
import pytest
import scipy.stats

import evaluate
import plots

# (folder, args, test RLoss of ckpt_last.pt, its train RLoss, weight norm Σ‖w‖² of ckpt_last.pt). The AT runs are
# a grid wd × label smoothing (2 × 3); TRADES differs from AT in two axes (method and β), so it is in no group.
RUNS = [("at", {}, 2.0, 0.5, 3.0),
        ("ls1", {"label_smoothing": 0.1}, 2.2, 1.5, 1.0),
        ("ls2", {"label_smoothing": 0.2}, 2.5, 0.9, 2.0),
        ("wd", {"wd": 0.05}, 2.9, 1.2, 5.0),
        ("wd_ls1", {"wd": 0.05, "label_smoothing": 0.1}, 3.1, 0.7, 6.0),
        ("wd_ls2", {"wd": 0.05, "label_smoothing": 0.2}, 3.6, 2.0, 4.0),
        ("trades", {"method": "trades", "beta": 6}, 1.8, 1.0, 7.0)]
ES_SHIFT = 0.35  # ckpt_best.pt (epoch 60): RLoss − 0.35, weight norm + 0.5
BASE_ARGS = {"method": "at", "epochs": 30, "lr": 0.1, "wd": 5e-4, "epsilon": 8 / 255, "lr_schedule": "multistep",
             "label_smoothing": 0.0, "label_noise": 0.0, "clip": 0.0, "ema": 0.0, "act": "relu", "optimizer": "sgd",
             "batch_size": 128, "attack_steps": 7, "width": 16, "train_subset": 2000, "seed": 0, "momentum": 0.9,
             "nesterov": False}
OURS = {"source": "ours", "args": {}}
# flatness.py's settings per mode (the keys plots.py reads, and the mode-specific ones it names)
MODE_SETTINGS = {"average": {"loss": "robust", "subset": "eval", "n_eval": 1000, "xi": 0.5},
                 "worst": {"loss": "robust", "subset": "eval", "n_eval": 1000, "xi": 0.00075},
                 "adaptive-worst": {"loss": "robust", "subset": "eval", "n_eval": 1000, "rho": 0.002,
                                    "sharpness_norm": "linf", "logit_normalise": False},
                 "adaptive-average": {"loss": "robust", "subset": "eval", "n_eval": 1000, "rho": 0.1,
                                      "sharpness_norm": "l2", "logit_normalise": False},
                 "pac-bayes": {"loss": "robust", "subset": "eval", "n_eval": 1000, "target_deviation": 0.1},
                 "pac-bayes-mag": {"loss": "clean", "subset": "eval", "n_eval": 1000, "target_deviation": 0.1,
                                   "magnitude_eps": 0.001},
                 "hessian-trace": {"loss": "clean", "n_hessian": 500, "probes": 100},
                 "hessian": {"n_hessian": 500, "hessian_iters": 100},
                 "sharpness-foo": {"loss": "robust", "subset": "eval"}}  # a mode plots.py does not know


def eval_file(folder, ckpt, rloss, train_rloss, epoch):
    """An evaluate.py result of folder/ckpt with --train, written by evaluate.py's own functions."""
    args = evaluate.parse_args([str(folder / ckpt), "--train"])
    args.data_dir = "/data"
    settings, non_default = evaluate.eval_settings(args, OURS)
    pgd = {"rloss": rloss, "rerr": 0.3 + 0.1 * rloss, "n": args.n_eval}
    aa = {"rerr": 0.31 + 0.1 * rloss, "n": args.n_eval}
    result = {"epoch": epoch, "clean": {"loss": 0.5, "err": 0.2, "n": 10000}, "pgd": pgd, "autoattack": aa,
              "train": {"pgd": {**pgd, "rloss": train_rloss}, "autoattack": aa}}
    evaluate.write_result(evaluate.result_path(folder, settings), settings, non_default, "0" * 64, result)


def flat_file(folder, ckpt, mode, value, weight_norm, epoch, scale=1.0, **changed):
    """A flatness.py result in its format: settings (with `changed` applied; non_default names them), value,
    reference, n, epoch and weight_norm_sq."""
    settings = {"tool": "flatness.py", "mode": mode, "checkpoint": ckpt, "use_ema": False, "source": "ours",
                "arch": None, "data_dir": "/data", "dataset": None, **MODE_SETTINGS[mode], "norm": "linf",
                "epsilon": 8 / 255, "attack_step": 0.007, "batch_size": 128, "seed": 0, "scale": scale,
                "scale_bn_eps": False, **changed}
    if mode == "hessian":
        settings.pop("norm")
    non_default = sorted(k for k in changed) + (["scale"] if scale != 1 else [])
    key = "eigenvalue" if mode == "hessian" else "value"
    evaluate.write_result(evaluate.result_path(folder, settings), settings, non_default, "0" * 64,
                          {key: value, "reference": 1.0, "n": settings.get("n_eval", 500), "epoch": epoch,
                           "weight_norm_sq": weight_norm})


def make_runs(root):
    """Seven runs, each with evaluations (--train) of ckpt_last.pt and ckpt_best.pt and these measures:
    adaptive-worst (RLoss) = 0.1 · test RLoss and pac-bayes (RLoss) = 10 − test RLoss at every checkpoint (besides
    a rescaled and a train-image result that must not count, as at's ckpt_best.pt's worst); adaptive-average (RLoss) at ρ = 0.1 everywhere but
    trades' ckpt_last.pt (ρ = 0.2 only; at's has both, the ρ = 0.2 one on more images); pac-bayes-mag (clean) of
    the last checkpoints, 3 at the default target deviation and 4 at another; worst and hessian of the last ones;
    hessian-trace of two; an unknown mode in at/."""
    for i, (name, extra, rloss, train, weight) in enumerate(RUNS):
        d = root / name
        d.mkdir(parents=True)
        (d / "args.json").write_text(json.dumps({**BASE_ARGS, **extra}))
        for ckpt, r, w, epoch in (("ckpt_last.pt", rloss, weight, 30),
                                  ("ckpt_best.pt", rloss - ES_SHIFT, weight + 0.5, 12)):
            eval_file(d, ckpt, r, train * (1 if ckpt == "ckpt_last.pt" else 0.8), epoch)
            flat_file(d, ckpt, "adaptive-worst", 0.1 * r, w, epoch)
            flat_file(d, ckpt, "pac-bayes", 10 - r, w, epoch)
            if (name, ckpt) != ("trades", "ckpt_last.pt"):
                flat_file(d, ckpt, "adaptive-average", 0.5 * r, w, epoch)
        if name in ("at", "trades"):
            flat_file(d, "ckpt_last.pt", "adaptive-average", 999.0, weight, 30, rho=0.2, n_eval=2000)
        other = {} if i < 3 else {"target_deviation": 0.2}  # the last four runs at another target deviation
        flat_file(d, "ckpt_last.pt", "pac-bayes-mag", 1.0 + i, weight, 30, **other)
        flat_file(d, "ckpt_last.pt", "worst", 0.01 * (i + 1), weight, 30)
        flat_file(d, "ckpt_last.pt", "hessian", 100.0 + i, weight, 30)
        if name in ("at", "wd"):
            flat_file(d, "ckpt_last.pt", "hessian-trace", 1000.0 + i, weight, 30)
    at = root / "at"
    flat_file(at, "ckpt_last.pt", "adaptive-worst", 99.0, 123.0, 30, scale=2.0)  # the §3.2 scale check
    flat_file(at, "ckpt_last.pt", "adaptive-worst", -99.0, 3.0, 30, subset="train-eval")
    flat_file(at, "ckpt_best.pt", "worst", 99.0, 123.0, 12, scale=2.0)  # ckpt_best.pt: only rescaled and
    flat_file(at, "ckpt_best.pt", "worst", -99.0, 3.5, 12, subset="train-eval")  # train-image worst-case results
    flat_file(at, "ckpt_last.pt", "sharpness-foo", 5.0, 3.0, 30)
    return root


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """plots.py on the runs, once; the titles and face colours of fig_measures' panels recorded on the way."""
    root = make_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("figures")
    panels, save = {}, plots.save

    def recording_save(fig, out_, name, written, **kw):
        if name == "fig_measures":
            panels.update({ax.get_title(): [tuple(c) for coll in ax.collections for c in coll.get_facecolor()]
                           for ax in fig.axes if ax.get_title()})
        return save(fig, out_, name, written, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "save", recording_save)
        summary = plots.main([str(root), "--out", str(out), "--formats", "png,pdf", "--dpi", "40"])
    measures = json.loads((out / "measures.json").read_text())
    return {"root": root, "out": out, "summary": summary, "json": measures, "panels": panels,
            "corr": measures["correlations"], "columns": {c["name"]: c for c in measures["columns"]}}


EXPECTED_N = {  # measure → (n over the last checkpoints, n over last + early-stopped) with test RLoss
    "worst (RLoss)": (7, 7), "adaptive-average (RLoss)": (6, 13), "adaptive-worst (RLoss)": (7, 14),
    "pac-bayes (RLoss)": (7, 14), "pac-bayes-mag (clean)": (4, 4), "hessian λ_max (clean)": (7, 7),
    "hessian-trace (clean)": (2, 2), "weight norm Σ‖w_l‖²": (7, 14), "train RLoss": (7, 14)}


def test_a_row_per_measure_and_baseline_with_its_n(table):
    assert list(table["columns"]) == list(EXPECTED_N)  # MEASURE_MODES' order, RLoss before clean, baselines last
    for name, (n_last, n_all) in EXPECTED_N.items():
        for target in plots.TARGETS:
            assert table["corr"]["last"][name][target]["n"] == n_last, (name, target)
            assert table["corr"]["last_and_es"][name][target]["n"] == n_all, (name, target)
    assert [c["type"] for c in table["json"]["columns"]].count("baseline") == 2
    worst = table["columns"]["worst (RLoss)"]  # at's ckpt_best.pt has a rescaled and a train-image result only
    assert "at:best" not in worst["values"] and worst["left_out"] == {}
    md = (table["out"] / "measures.md").read_text()
    for name in EXPECTED_N:
        assert f"| {name}" in md
    assert "exact permutation" in md and "ℓ∞" in md and "n = 14 checkpoints" in md


def test_a_monotone_measure_has_tau_one_and_an_anti_monotone_one_minus_one(table):
    for points in plots.POINT_SETS:
        up = table["corr"][points]["adaptive-worst (RLoss)"]["rloss"]
        down = table["corr"][points]["pac-bayes (RLoss)"]["rloss"]
        assert up["kendall_tau"] == pytest.approx(1) and up["spearman_rho"] == pytest.approx(1)
        assert down["kendall_tau"] == pytest.approx(-1) and down["spearman_rho"] == pytest.approx(-1)
        assert up["granulated"]["Psi"] == pytest.approx(1) and down["granulated"]["Psi"] == pytest.approx(-1)
    # neither the ×2 rescaled model's value (99) nor the train-image one (−99) entered
    assert table["columns"]["adaptive-worst (RLoss)"]["values"]["at:last"] == pytest.approx(0.2)


def test_baselines_are_the_weight_norm_and_train_rloss(table):
    weight, train = table["columns"]["weight norm Σ‖w_l‖²"], table["columns"]["train RLoss"]
    assert weight["values"]["wd:last"] == 5.0 and weight["values"]["wd:best"] == 5.5
    assert train["values"]["ls1:last"] == pytest.approx(1.5) and train["values"]["ls1:best"] == pytest.approx(1.2)
    gap = table["corr"]["last"]["train RLoss"]["gap"]  # test − train RLoss of one evaluation
    y = [r[2] - r[3] for r in RUNS]
    assert gap["pearson_r"] == pytest.approx(scipy.stats.pearsonr([r[3] for r in RUNS], y).statistic)


def enumerated_kendall_p(x, y):
    observed = abs(scipy.stats.kendalltau(x, y).statistic)
    return np.mean([abs(scipy.stats.kendalltau([x[i] for i in perm], y).statistic) >= observed - 1e-12
                    for perm in itertools.permutations(range(len(x)))])


def test_kendall_p_is_exact_for_few_points_and_scipys_above(table):
    c = table["corr"]["last"]["weight norm Σ‖w_l‖²"]["rloss"]
    x, y = [r[4] for r in RUNS], [r[2] for r in RUNS]
    assert c["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(x, y).statistic)
    assert c["kendall_p"] == pytest.approx(enumerated_kendall_p(x, y)) and "exact" in c["p_method"]
    with_ties = plots.correlation([1.0, 1.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 4.0, 3.0])
    assert with_ties["kendall_p"] == pytest.approx(enumerated_kendall_p([1, 1, 2, 3, 5], [2, 1, 4, 4, 3]))
    both = table["corr"]["last_and_es"]["weight norm Σ‖w_l‖²"]["rloss"]  # n = 14
    x2, y2 = x + [w + 0.5 for w in x], y + [r - ES_SHIFT for r in y]
    assert both["kendall_p"] == pytest.approx(scipy.stats.kendalltau(x2, y2).pvalue) and "scipy" in both["p_method"]


def test_granulated_kendall_equals_a_hand_computation_on_a_grid():
    """Axes a ∈ {1, 2, 3}, b ∈ {x, y}, c constant, and one lone point (a=4, b=z). Axis a: group b=x has τ = +1
    (m and t rise together), b=y τ = −1 → ψ_a = 0 over 2 groups. Axis b: a=1 (1,1)→(4,3.5) concordant +1, a=2
    (2,2)→(5,2.5) +1, a=3 (3,3)→(6,1.5) −1 → ψ_b = 1/3 over 3 groups. c: no group. Ψ = (0 + 1/3) / 2 = 1/6."""
    grid = [((1, "x"), 1, 1), ((2, "x"), 2, 2), ((3, "x"), 3, 3), ((1, "y"), 4, 3.5), ((2, "y"), 5, 2.5),
            ((3, "y"), 6, 1.5), ((4, "z"), 7, 0)]
    hyper = [{"a": a, "b": b, "c": "same"} for (a, b), _, _ in grid]
    g = plots.granulated_kendall([m for _, m, _ in grid], [t for _, _, t in grid], hyper)
    assert g["axes"]["a"]["psi"] == pytest.approx(0) and g["axes"]["a"]["groups"] == 2
    assert g["axes"]["b"]["psi"] == pytest.approx(1 / 3) and g["axes"]["b"]["groups"] == 3
    assert g["not_estimable"] == ["c"] and g["Psi"] == pytest.approx(1 / 6)


def test_granulated_kendall_over_the_runs_hyper_parameters(table):
    """The weight norm over the last checkpoints of the wd × label-smoothing grid: along wd every group rises
    with RLoss (3→5, 1→6, 2→4) → ψ_wd = 1 (3 groups); along label smoothing the norms (3, 1, 2) and (5, 6, 4)
    against rising RLoss give τ = −1/3 twice → ψ = −1/3 (2 groups); Ψ = 1/3. TRADES differs from AT in the method
    and β at once, and the last checkpoints in no checkpoint kind: those axes are not estimable."""
    g = table["corr"]["last"]["weight norm Σ‖w_l‖²"]["rloss"]["granulated"]
    assert g["axes"]["wd"] == {"psi": pytest.approx(1), "groups": 3, "undefined": 0}
    assert g["axes"]["label_smoothing"]["psi"] == pytest.approx(-1 / 3) and g["axes"]["label_smoothing"]["groups"] == 2
    assert g["Psi"] == pytest.approx(1 / 3)
    assert sorted(g["not_estimable"]) == ["beta", "checkpoint", "method"]
    assert table["json"]["axes"]["last_and_es"]["not_estimable"] == ["method", "beta"]
    assert "checkpoint" in table["corr"]["last_and_es"]["weight norm Σ‖w_l‖²"]["rloss"]["granulated"]["axes"]


def test_settings_are_never_mixed_and_the_left_out_are_named(table):
    avg = table["columns"]["adaptive-average (RLoss)"]
    assert avg["setting"]["rho"] == 0.1 and "ρ=0.1" in avg["settings"]
    assert avg["values"]["at:last"] == pytest.approx(1.0)  # the paper-protocol result, not ρ = 0.2 on more images
    assert list(avg["left_out"]) == ["trades:last"] and "ρ=0.2" in avg["left_out"]["trades:last"]
    mag = table["columns"]["pac-bayes-mag (clean)"]  # 4 checkpoints at target deviation 0.2, 3 at 0.1: 0.2 kept
    assert mag["setting"]["target_deviation"] == 0.2 and "target_deviation=0.2" in mag["settings"]
    assert sorted(mag["left_out"]) == ["at:last", "ls1:last", "ls2:last"]
    left = table["summary"]["left_out"]
    assert list(left["measures table, adaptive-average (RLoss)"]) == ["trades:last"]
    md = (table["out"] / "measures.md").read_text()
    assert "adaptive-average (RLoss): trades:last (measured with n_eval=2000, ρ=0.2 only)" in md


def test_an_unknown_mode_is_skipped_with_a_line(table):
    lines = [s for s in table["summary"]["skipped"] if "sharpness-foo" in s]
    assert len(lines) == 1 and "unknown to plots.py" in lines[0]
    assert not [n for n in table["columns"] if "foo" in n]


MEASURES_CSV = ["point_set", "measure", "type", "mode", "loss", "settings", "target", "n", "pearson_r", "pearson_p",
                "spearman_rho", "spearman_p", "kendall_tau", "kendall_p", "p_method", "granulated_kendall",
                "psi_per_axis", "not_estimable", "left_out", "note"]


def test_csv_has_a_row_per_point_set_measure_and_target(table):
    with open(table["out"] / "measures.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == MEASURES_CSV
    assert len(rows) == 2 * len(EXPECTED_N) * 3
    row = next(r for r in rows if r["point_set"] == "last" and r["measure"] == "weight norm Σ‖w_l‖²"
               and r["target"] == "rloss")
    assert row["type"] == "baseline" and int(row["n"]) == 7 and float(row["granulated_kendall"]) == pytest.approx(1 / 3)
    assert json.loads(row["psi_per_axis"])["wd"]["groups"] == 3
    few = next(r for r in rows if r["measure"] == "hessian-trace (clean)")
    assert int(few["n"]) == 2 and few["kendall_tau"] == "" and "at least 3" in few["note"]


def test_fig_measures_draws_a_panel_per_measure_of_three_points(table):
    for ext, magic in (("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF")):
        assert (table["out"] / f"fig_measures.{ext}").read_bytes().startswith(magic)
    titles = table["panels"]
    assert len(titles) == len(EXPECTED_N) - 1  # hessian-trace: 2 checkpoints, named instead
    assert any(t.startswith("adaptive-worst (RLoss)\nτ = +1.00 (p = ") and t.endswith("n = 14") for t in titles)
    aw = next(v for t, v in titles.items() if t.startswith("adaptive-worst"))
    assert len(aw) == 14 and len(set(aw)) == 5  # AT grey and one colour per family: wd, ls, wd + ls, TRADES
    assert "hessian-trace (clean)" in table["summary"]["left_out"]["fig_measures"]
    assert "Not drawn in fig_measures: hessian-trace (clean) (2 checkpoint(s)" in \
        (table["out"] / "measures.md").read_text()


def test_a_result_from_before_the_estimator_is_ours(tmp_path):
    """An evaluation written before --estimator existed has no such setting: it reads as estimator "project", so
    it stays comparable with one that records it (Fig. 9's RLoss(last) − RLoss(ES) and the gap need both)."""
    eval_file(tmp_path, "ckpt_last.pt", 2.0, 1.0, 30)
    (path,) = tmp_path.glob("eval_*.json")
    obj = json.loads(path.read_text())
    del obj["settings"]["estimator"]
    path.write_text(json.dumps(obj))
    old = plots.load_result(path, plots.Log())
    eval_file(tmp_path, "ckpt_best.pt", 2.0, 1.0, 20)
    (new_path,) = [p for p in tmp_path.glob("eval_best_*.json")]
    new = plots.load_result(new_path, plots.Log())
    assert old["settings"]["estimator"] == "project"
    assert plots.protocol(old["settings"]) == plots.protocol(new["settings"])
